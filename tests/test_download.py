"""`cellfm download` / `cellfm.load("cellfm-80m")` against a fake Hugging Face Hub on 127.0.0.1.

The fake serves what `huggingface_hub.hf_hub_download` really asks for: HEAD/GET
`/{repo}/resolve/{revision}/{file}` answered with a redirect that carries X-Repo-Commit,
X-Linked-Etag (the sha256) and X-Linked-Size, and a second "CDN" server that streams the bytes with
Range support. Nothing announces Xet storage, so no other host is contacted. The checkpoint is a
small file of the official MindSpore layout (weights plus Adam moments) written by the test.
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
from cellfm.checkpoints import hub, official, write_mindspore_checkpoint
from cellfm.cli import _register, app
from cellfm.config import get_preset
from cellfm.model import CellFMModule

REPO = "ShangguanNingyuan/CellFM"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """Hub + CDN on two loopback ports. `break_after`: the CDN sends that many bytes of the next
    GET and drops the connection; with `down_after_break` it answers 503 from then on (the network
    went away)."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.sha = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
        self.log: list[tuple[str, str, str | None]] = []
        self.break_after: int | None = None
        self.down = False
        self.down_after_break = False
        self.commit = COMMIT  # a new upload is a new commit
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
                if revision not in ("main", fake.commit):
                    return self._error(404, "RevisionNotFound")
                if filename not in fake.files:
                    return self._error(404, "EntryNotFound")
                sha = fake.served_sha.get(filename, fake.sha[filename])
                self.send_response(302)
                self.send_header("X-Repo-Commit", fake.commit)
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
                    fake.break_after, fake.down = None, fake.down_after_break
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
    """A tiny model (pad_zero=False, as the 80M release's Config_80M) and its checkpoint bytes in
    the official layout, Adam moments included."""
    torch.manual_seed(0)
    module = CellFMModule(get_preset("tiny").replace(pad_zero=False)).eval()
    with torch.no_grad():
        module.zero_emb.normal_(0, 1.0)
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
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("CELLFM_HUB_REVISION", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_PROGRESS_BARS", True)
    # the tiny model is 32 wide with 4 heads (the real release: 1536 and 48, not stored in the file)
    release = replace(official.OFFICIAL_RELEASES["cellfm-80m"], n_heads=4, d_model=32)
    monkeypatch.setitem(official.OFFICIAL_RELEASES, "cellfm-80m", release)
    yield server
    server.close()


def _zero_batch():
    g = torch.Generator().manual_seed(5)
    ids, vals = torch.randint(1, 27855, (2, 24), generator=g), torch.rand(2, 24, generator=g) * 3
    vals[:, ::4] = 0  # zero-valued genes: their embedding depends on pad_zero
    return ids, vals, torch.ones(2, 24, dtype=torch.bool)


def _blobs(root: Path) -> list[Path]:
    return [p for p in root.rglob("blobs/*") if p.is_file()]


def test_load_by_name_downloads_converts_once_then_works_offline(fake_hub, tiny_ckpt, tmp_path, monkeypatch):
    model = cellfm.load("cellfm-80m")
    assert not model.config.pad_zero and not model.config.add_zero  # the 80M release's official config
    with torch.no_grad():
        for a, b in zip(_outputs(tiny_ckpt[0]), _outputs(model.module), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        want = tiny_ckpt[0](*_zero_batch()).cell_emb
        torch.testing.assert_close(model.module(*_zero_batch()).cell_emb, want, rtol=0, atol=0)
    folder = tmp_path / "cache" / "models" / "cellfm-80m"
    source = hub._read_json(folder / "source.json")
    assert source["commit"] == COMMIT and source["sha256"] == fake_hub.sha["CellFM_80M_weight.ckpt"]
    assert source["size"] == len(tiny_ckpt[1])
    with safe_open(str(folder / "model.safetensors"), "pt") as f:  # optimizer moments dropped
        assert not any(k.startswith(("moment", "global_step")) for k in f.keys())
    assert _blobs(tmp_path / "cache" / "downloads") == [], "checkpoint kept after conversion"
    assert fake_hub.gets() == [None]

    fake_hub.close()  # no network and offline mode: the cached folder is enough
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = cellfm.load("cellfm-80m")
    torch.testing.assert_close(again.module.gene_emb, model.module.gene_emb, rtol=0, atol=0)
    assert cellfm.CellFM.load("cellfm-80m", pad_zero=True).config.pad_zero  # the override reaches the config


def test_cli_download_with_cache_dir_keeps_checkpoint(fake_hub, tiny_ckpt, tmp_path, monkeypatch):
    _register()
    cache = tmp_path / "elsewhere"
    result = CliRunner().invoke(app, ["download", "80m", "--cache-dir", str(cache), "--keep-checkpoint"])
    assert result.exit_code == 0, result.output
    folder = cache / "models" / "cellfm-80m"
    assert str(folder) in result.output
    kept = Path(hub._read_json(folder / "source.json")["checkpoint"])
    assert kept.read_bytes() == tiny_ckpt[1]
    assert cellfm.load(folder).config.n_heads == 4
    # a second run finds the converted model and asks the Hub nothing
    n = len(fake_hub.log)
    assert CliRunner().invoke(app, ["download", "80m", "--cache-dir", str(cache)]).exit_code == 0
    assert len(fake_hub.log) == n
    # the kept checkpoint converts again without network, offline or not
    shutil.rmtree(folder)
    fake_hub.close()
    assert hub.download_official("80m", cache, keep_checkpoint=True).is_dir()
    shutil.rmtree(folder)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.download_official("80m", cache).is_dir()
    assert fake_hub.gets() == [None]


def test_dropped_connection_is_resumed_within_the_run(fake_hub, tiny_ckpt, monkeypatch):
    import time

    from huggingface_hub import constants

    monkeypatch.setattr(time, "sleep", lambda s: None)  # huggingface_hub waits 1 s before a retry
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 1024)
    size = len(tiny_ckpt[1])
    fake_hub.break_after = size // 3
    folder = hub.download_official("80m")
    first, second = fake_hub.gets()
    assert first is None and second.startswith("bytes=")
    assert 0 < int(second.removeprefix("bytes=").rstrip("-")) <= size // 3
    assert hub._read_json(folder / "source.json")["sha256"] == fake_hub.sha["CellFM_80M_weight.ckpt"]


def test_network_gone_midway_says_run_again_and_leaves_nothing(fake_hub, tiny_ckpt, tmp_path, monkeypatch):
    import time

    from huggingface_hub import constants

    monkeypatch.setattr(time, "sleep", lambda s: None)
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 1024)
    fake_hub.break_after, fake_hub.down_after_break = len(tiny_ckpt[1]) // 3, True
    with pytest.raises(hub.DownloadError, match=r"failed \(HTTP 503 from the server\).*run the same command"):
        hub.download_official("80m")
    assert _blobs(tmp_path / "cache") == [] and not (tmp_path / "cache" / "models" / "cellfm-80m").exists()
    assert not list((tmp_path / "cache").rglob("*.incomplete"))


def test_corrupt_download_is_deleted(fake_hub, tmp_path):
    fake_hub.served_sha["CellFM_80M_weight.ckpt"] = "e" * 64
    with pytest.raises(hub.DownloadError, match=r"expected e{64}: the file is corrupt and was deleted"):
        hub.download_official("80m")
    assert _blobs(tmp_path / "cache") == []
    assert not (tmp_path / "cache" / "models" / "cellfm-80m").exists()


def test_pinned_sha256_must_match_the_hub(fake_hub, monkeypatch):
    spec = hub.OFFICIAL_WEIGHTS["cellfm-80m"]
    monkeypatch.setitem(hub.OFFICIAL_WEIGHTS, "cellfm-80m", replace(spec, sha256="d" * 64))
    with pytest.raises(hub.DownloadError, match="but cellfm pins d{64}"):
        hub.download_official("80m")
    assert fake_hub.gets() == []


def test_no_network_offline_and_unknown_revision_errors(fake_hub, monkeypatch, tmp_path):
    with pytest.raises(hub.DownloadError, match=r"revision .v9. does not exist .*revision=<rev>"):
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
    assert "not enough disk space" in result.output and "--cache-dir FOLDER" in result.output
    assert fake_hub.gets() == []


def test_incomplete_checkpoint_is_named_and_force_fetches_it_again(fake_hub, tiny_ckpt, tmp_path):
    good = tiny_ckpt[1]
    fake_hub.files["CellFM_80M_weight.ckpt"] = good[: len(good) // 2]  # the Hub itself serves half a file
    fake_hub.sha["CellFM_80M_weight.ckpt"] = hashlib.sha256(good[: len(good) // 2]).hexdigest()
    with pytest.raises(hub.DownloadError, match=r"is not a complete cellfm-80m checkpoint .*\(force=True\)"):
        hub.download_official("80m")
    fake_hub.files["CellFM_80M_weight.ckpt"] = good  # the authors upload it again
    fake_hub.sha["CellFM_80M_weight.ckpt"] = hashlib.sha256(good).hexdigest()
    fake_hub.commit = "f" * 40
    assert hub.download_official("80m", force=True).is_dir()


def test_checkpoint_damaged_in_the_cache_is_deleted_then_fetched_again(fake_hub, tmp_path):
    folder = hub.download_official("80m", keep_checkpoint=True)
    kept = Path(hub._read_json(folder / "source.json")["checkpoint"]).resolve()
    kept.write_bytes(kept.read_bytes()[:1000])
    shutil.rmtree(folder)
    with pytest.raises(hub.DownloadError, match="the file is corrupt and was deleted"):
        hub.download_official("80m")
    assert hub.download_official("80m").is_dir()
    assert fake_hub.gets() == [None, None]


def test_unknown_name_lists_the_releases():
    with pytest.raises(ValueError, match="choose one of 80m, 800m"):
        hub.official_weights("8m")
    assert isinstance(hub.default_cache_dir(), Path)


def test_disk_filling_up_midway_is_named(fake_hub, monkeypatch, tmp_path):
    import errno

    from huggingface_hub import file_download

    def full_disk(url, f, **kwargs):
        f.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(file_download, "http_get", full_disk)
    with pytest.raises(hub.DownloadError, match="disk filled up while downloading .*cache_dir=<folder>"):
        hub.download_official("80m")
    assert _blobs(tmp_path / "cache") == [] and not list((tmp_path / "cache").rglob("*.incomplete"))
