"""`cellfm download` / `cellfm.load("cellfm-80m")` against a fake Hugging Face Hub on 127.0.0.1.

The fake serves what huggingface_hub really asks for: HEAD/GET `/{repo}/resolve/{revision}/{file}`
answered with a redirect that carries X-Repo-Commit, X-Linked-Etag (the sha256) and X-Linked-Size,
and a second "CDN" server that streams the bytes with Range support. The checkpoint is a small
file of the official MindSpore layout (weights plus Adam moments) written by the test.
"""

from __future__ import annotations

import hashlib
import shutil
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from test_checkpoints import _outputs, official_names
from typer.testing import CliRunner

import cellfm
from cellfm.checkpoints import hub, write_mindspore_checkpoint
from cellfm.cli import _register, app
from cellfm.config import get_preset
from cellfm.model import CellFMModule

REPO = "ShangguanNingyuan/CellFM"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """Hub + CDN on two loopback ports. `break_after`: the CDN sends that many bytes of the next
    GET, drops the connection and answers 503 from then on (the network went away)."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.sha = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
        self.log: list[tuple[str, str, str | None]] = []
        self.break_after: int | None = None
        self.down = False
        self.served_sha: dict[str, str] = {}  # a wrong etag to announce, per file
        self.hub = ThreadingHTTPServer(("127.0.0.1", 0), self._handler(cdn=False))
        self.cdn = ThreadingHTTPServer(("127.0.0.1", 0), self._handler(cdn=True))
        for server in (self.hub, self.cdn):
            threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        self.url = f"http://127.0.0.1:{self.hub.server_address[1]}"
        self.cdn_url = f"http://127.0.0.1:{self.cdn.server_address[1]}"

    def close(self) -> None:
        if self.hub.socket.fileno() < 0:
            return
        for server in (self.hub, self.cdn):
            server.shutdown()
            server.server_close()

    def gets(self) -> list[str | None]:
        """The Range header of each GET the CDN received."""
        return [rng for where, method, rng in self.log if where == "cdn" and method == "GET"]

    def _handler(self, cdn: bool):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self._answer(body=False)

            def do_GET(self):
                self._answer(body=True)

            def _answer(self, body: bool):
                fake.log.append(("cdn" if cdn else "hub", self.command, self.headers.get("Range")))
                if cdn:
                    return self._blob(body)
                prefix = f"/{REPO}/resolve/"
                if not self.path.startswith(prefix):
                    return self._error(404, "RepoNotFound")
                revision, _, filename = self.path[len(prefix):].partition("/")
                if revision not in ("main", COMMIT):
                    return self._error(404, "RevisionNotFound")
                if filename not in fake.files:
                    return self._error(404, "EntryNotFound")
                sha = fake.served_sha.get(filename, fake.sha[filename])
                self.send_response(302)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("X-Linked-Etag", f'"{sha}"')
                self.send_header("X-Linked-Size", str(len(fake.files[filename])))
                self.send_header("ETag", '"0a1b2c3d"')
                self.send_header("Location", f"{fake.cdn_url}/blobs/{filename}?signature=x")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _blob(self, body: bool):
                if fake.down:
                    return self._error(503, None)
                data = fake.files[self.path.split("/")[-1].split("?")[0]]
                start = 0
                rng = self.headers.get("Range")
                if rng:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if not body:
                    return
                if fake.break_after is not None:
                    self.wfile.write(data[start:start + fake.break_after])
                    fake.break_after, fake.down = None, True
                    self.close_connection = True
                    return
                self.wfile.write(data[start:])

            def _error(self, status: int, code: str | None):
                self.send_response(status)
                if code:
                    self.send_header("X-Error-Code", code)
                self.send_header("Content-Length", "0")
                self.end_headers()

        return Handler


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> tuple[CellFMModule, bytes]:
    """A tiny model and its checkpoint bytes in the official layout, Adam moments included."""
    torch.manual_seed(0)
    module = CellFMModule(get_preset("tiny")).eval()
    tensors = official_names(module.state_dict())
    tensors.update({f"{m}.{k}": np.full_like(v, 0.5) for k, v in list(tensors.items())
                    for m in ("moment1", "moment2")})
    tensors["global_step"] = np.array([4321], np.int32)
    path = tmp_path_factory.mktemp("ckpt") / "CellFM_80M_weight.ckpt"
    write_mindspore_checkpoint(tensors, path)
    return module, path.read_bytes()


@pytest.fixture
def fake_hub(tiny_ckpt, tmp_path, monkeypatch):
    from huggingface_hub import constants

    server = FakeHub({"CellFM_80M_weight.ckpt": tiny_ckpt[1]})
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("CELLFM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("CELLFM_HUB_REVISION", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 1 << 20)  # 10 MB by default: > our file
    # the tiny model has 4 heads (the real releases 48, which the checkpoint does not store)
    spec = replace(hub.OFFICIAL_WEIGHTS["cellfm-80m"], n_heads=4)
    monkeypatch.setitem(hub.OFFICIAL_WEIGHTS, "cellfm-80m", spec)
    yield server
    server.close()


def test_load_by_name_downloads_converts_once_then_works_offline(fake_hub, tiny_ckpt, tmp_path, monkeypatch):
    model = cellfm.load("cellfm-80m")
    for a, b in zip(_outputs(tiny_ckpt[0]), _outputs(model.module), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    folder = tmp_path / "cache" / "models" / "cellfm-80m"
    source = hub._read_json(folder / "source.json")
    assert source["commit"] == COMMIT and source["sha256"] == fake_hub.sha["CellFM_80M_weight.ckpt"]
    assert source["size"] == len(tiny_ckpt[1])
    with safe_open(str(folder / "model.safetensors"), "pt") as f:  # optimizer moments dropped
        assert not any(k.startswith(("moment", "global_step")) for k in f.keys())
    left = sorted(p.name for p in (tmp_path / "cache" / "downloads").iterdir())
    assert left == ["CellFM_80M_weight.ckpt.lock"], "checkpoint kept after conversion"
    assert fake_hub.gets() == [None]

    fake_hub.close()  # no network and offline mode: the cached folder is enough
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = cellfm.load("cellfm-80m")
    torch.testing.assert_close(again.module.gene_emb, model.module.gene_emb, rtol=0, atol=0)


def test_cli_download_with_cache_dir_keeps_checkpoint(fake_hub, tiny_ckpt, tmp_path):
    _register()
    cache = tmp_path / "elsewhere"
    result = CliRunner().invoke(app, ["download", "80m", "--cache-dir", str(cache), "--keep-checkpoint"])
    assert result.exit_code == 0, result.output
    folder = cache / "models" / "cellfm-80m"
    assert str(folder) in result.output
    assert (cache / "downloads" / "CellFM_80M_weight.ckpt").read_bytes() == tiny_ckpt[1]
    assert cellfm.load(folder).config.n_heads == 4
    # a second run finds the converted model and asks the Hub nothing
    n = len(fake_hub.log)
    assert CliRunner().invoke(app, ["download", "80m", "--cache-dir", str(cache)]).exit_code == 0
    assert len(fake_hub.log) == n


def test_broken_connection_keeps_part_and_next_run_resumes(fake_hub, tiny_ckpt, tmp_path, monkeypatch):
    import time

    monkeypatch.setattr(time, "sleep", lambda s: None)  # huggingface_hub waits 1 s before a retry
    size = len(tiny_ckpt[1])
    fake_hub.break_after = size // 3
    with pytest.raises(hub.DownloadError, match=r"stopped after .* run the same command again to resume"):
        hub.download_official("80m")
    part = tmp_path / "cache" / "downloads" / "CellFM_80M_weight.ckpt.part"
    kept = part.stat().st_size  # whole chunks that arrived before the break
    assert 0 < kept <= size // 3
    fake_hub.down = False
    folder = hub.download_official("80m")
    assert fake_hub.gets()[-1] == f"bytes={kept}-"
    assert not part.exists()
    assert hub._read_json(folder / "source.json")["sha256"] == fake_hub.sha["CellFM_80M_weight.ckpt"]


def test_partial_file_of_another_version_is_not_resumed(fake_hub, tmp_path):
    downloads = tmp_path / "cache" / "downloads"
    downloads.mkdir(parents=True)
    (downloads / "CellFM_80M_weight.ckpt.part").write_bytes(b"x" * 1000)
    hub._write_json(downloads / "CellFM_80M_weight.ckpt.part.json", {"etag": "f" * 64})
    hub.download_official("80m")
    assert fake_hub.gets() == [None]


def test_corrupt_download_is_deleted(fake_hub, tmp_path):
    fake_hub.served_sha["CellFM_80M_weight.ckpt"] = "e" * 64
    with pytest.raises(hub.DownloadError, match=r"expected e{64}: the file is corrupt and was deleted"):
        hub.download_official("80m")
    assert not any(p.suffix in (".ckpt", ".part") for p in (tmp_path / "cache" / "downloads").iterdir())
    assert not (tmp_path / "cache" / "models" / "cellfm-80m").exists()


def test_pinned_sha256_must_match_the_hub(fake_hub, monkeypatch):
    spec = hub.OFFICIAL_WEIGHTS["cellfm-80m"]
    monkeypatch.setitem(hub.OFFICIAL_WEIGHTS, "cellfm-80m", replace(spec, sha256="d" * 64))
    with pytest.raises(hub.DownloadError, match="but cellfm pins d{64}"):
        hub.download_official("80m")
    assert fake_hub.gets() == []


def test_no_network_offline_and_unknown_revision_errors(fake_hub, monkeypatch, tmp_path):
    with pytest.raises(hub.DownloadError, match=r"revision 'v9' does not exist .* --revision"):
        hub.download_official("80m", revision="v9")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hub.DownloadError, match="HF_HUB_OFFLINE is set and cellfm-80m is not in the cache"):
        cellfm.load("cellfm-80m")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    fake_hub.close()  # nothing listens there any more
    with pytest.raises(hub.DownloadError, match="could not reach the Hugging Face Hub at http://127.0.0.1"):
        hub.download_official("80m")
    assert fake_hub.gets() == []


def test_disk_full_is_refused_before_downloading(fake_hub, monkeypatch, tmp_path):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1000))
    _register()
    result = CliRunner().invoke(app, ["download", "80m", "--cache-dir", str(tmp_path / "c")])
    assert result.exit_code == 1
    assert "not enough disk space" in result.output and "--cache-dir" in result.output
    assert fake_hub.gets() == []


def test_truncated_checkpoint_in_cache_is_named(fake_hub, tiny_ckpt, tmp_path, monkeypatch):
    downloads = tmp_path / "cache" / "downloads"
    downloads.mkdir(parents=True)
    (downloads / "CellFM_80M_weight.ckpt").write_bytes(tiny_ckpt[1][: len(tiny_ckpt[1]) // 2])
    hub._write_json(downloads / "CellFM_80M_weight.ckpt.json", {"revision": "main", "commit": COMMIT})
    with pytest.raises(hub.DownloadError, match="is not a complete cellfm-80m checkpoint .* --force"):
        hub.download_official("80m")
    assert hub.download_official("80m", force=True).is_dir()


def test_unknown_name_lists_the_releases():
    with pytest.raises(ValueError, match="choose one of 80m, 800m"):
        hub.official_weights("8m")
    assert isinstance(hub.default_cache_dir(), Path)


def test_disk_filling_up_midway_keeps_the_part(fake_hub, monkeypatch, tmp_path):
    import errno

    from huggingface_hub import file_download

    def full_disk(url, f, **kwargs):
        f.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(file_download, "http_get", full_disk)
    with pytest.raises(hub.DownloadError, match="filled up while downloading .* resumes on the next run"):
        hub.download_official("80m")
    assert (tmp_path / "cache" / "downloads" / "CellFM_80M_weight.ckpt.part").stat().st_size == 1000
