"""Official CellFM weights from the Hugging Face Hub: fetch once, verify, convert into the cache.

The authors publish MindSpore checkpoints (weights plus Adam moments) in the Hub repository
`ShangguanNingyuan/CellFM`. `download_official("cellfm-80m")` asks the Hub (through
`huggingface_hub`) for the file's commit, size and sha256, downloads it into
`<cache>/downloads/` as a `.part` file that a later run resumes, checks size and sha256, converts
it once into our folder format in `<cache>/models/<name>/` (optimizer moments dropped) and deletes
the checkpoint unless asked to keep it. Later loads read that folder and never touch the network.

The cache is `cache_dir`, else `$CELLFM_CACHE`, else `$XDG_CACHE_HOME/cellfm` (`~/.cache/cellfm`).
`HF_ENDPOINT` and `HF_HUB_OFFLINE` are read at call time.

Licence: the weights are CC BY-NC-ND 4.0. Converted copies are for the user's own machine; this
module downloads and converts, and must never upload or bundle weights.
"""

from __future__ import annotations

import errno
import hashlib
import importlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from cellfm.cellfm import CellFM

HUB_REPO = "ShangguanNingyuan/CellFM"
# Revision of HUB_REPO that downloads use. NOT YET PINNED to a commit: no machine of this project
# could reach the Hub. Replace "main" by the 40-hex commit that `cellfm download` records in
# `<cache>/models/<name>/source.json` ("commit") once a person has checked that file on a machine
# with network, and fill in `size`/`sha256` below from the same file. Overridable per call
# (`revision=`, `--revision`) or with $CELLFM_HUB_REVISION.
HUB_REVISION = "main"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 24


@dataclass(frozen=True)
class OfficialWeights:
    """One released checkpoint. `size`/`sha256` are pinned where known; the Hub's own sha256
    (the LFS etag) and size are checked in every case."""

    name: str
    filename: str
    description: str
    n_heads: int = 48
    size: int | None = None
    sha256: str | None = None
    repo_id: str = HUB_REPO
    revision: str = HUB_REVISION


OFFICIAL_WEIGHTS: dict[str, OfficialWeights] = {
    "cellfm-80m": OfficialWeights("cellfm-80m", "CellFM_80M_weight.ckpt",
                                  "CellFM-80M, 2 layers, d=1536 (about 1.03 GB to download)"),
    "cellfm-800m": OfficialWeights("cellfm-800m", "base_weight.ckpt",
                                   "CellFM-800M, 40 layers, d=1536 (about 9.66 GB to download)"),
}


class DownloadError(RuntimeError):
    """Fetching or converting official weights failed; the message says what to do."""


def official_weights(name: str) -> OfficialWeights:
    """The release called `name`: "80m", "800m", "cellfm-80m" or "cellfm-800m"."""
    key = name.lower()
    key = key if key.startswith("cellfm-") else f"cellfm-{key}"
    if key not in OFFICIAL_WEIGHTS:
        raise ValueError(f"unknown official model {name!r}; choose one of 80m, 800m")
    return OFFICIAL_WEIGHTS[key]


def is_official_name(name: str) -> bool:
    return str(name).lower() in OFFICIAL_WEIGHTS


def default_cache_dir() -> Path:
    if os.environ.get("CELLFM_CACHE"):
        return Path(os.environ["CELLFM_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "cellfm"


def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    return env or constants.HF_HUB_OFFLINE


def _endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _require_free(folder: Path, need: int, what: str) -> None:
    free = shutil.disk_usage(folder).free
    if free < need:
        raise DownloadError(
            f"not enough disk space in {folder}: {what} needs {_gb(need)}, {_gb(free)} free. Free some "
            "space or choose another cache folder (cache_dir= in Python, --cache-dir on the command "
            "line, or $CELLFM_CACHE)")


def _disk_full(folder: Path, what: str, err: OSError) -> DownloadError:
    return DownloadError(f"the disk holding {folder} filled up while {what} ({err.strerror}). Free some "
                         "space or choose another cache folder (cache_dir= / --cache-dir / $CELLFM_CACHE); "
                         "a partial download is kept and resumes on the next run")


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection/timeout errors of whichever HTTP client the installed huggingface_hub uses."""
    found = []
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                         ("requests", "ConnectionError"), ("requests", "Timeout")):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


@dataclass(frozen=True)
class RemoteFile:
    url: str
    commit: str
    size: int
    sha256: str | None
    etag: str


def remote_file(spec: OfficialWeights, revision: str) -> RemoteFile:
    """The Hub's metadata for the checkpoint (one HEAD request), checked against the pins."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = _endpoint()
    url = hf_hub_url(spec.repo_id, spec.filename, revision=revision, endpoint=endpoint)
    try:
        meta = get_hf_file_metadata(url, endpoint=endpoint)
    except RevisionNotFoundError as err:
        raise DownloadError(f"revision {revision!r} does not exist in {spec.repo_id} on {endpoint}; pass "
                            "another one (revision= / --revision / $CELLFM_HUB_REVISION)") from err
    except (RepositoryNotFoundError, EntryNotFoundError) as err:
        raise DownloadError(f"{spec.repo_id}/{spec.filename} at revision {revision!r} is not on {endpoint} "
                            f"(HTTP {err.response.status_code}); the release may have moved: check the "
                            "repository page and pass the right revision= / --revision") from err
    except HfHubHTTPError as err:
        raise DownloadError(f"the Hub at {endpoint} answered HTTP {err.response.status_code} for {url}; "
                            "try again later") from err
    except _transport_errors() as err:
        raise DownloadError(
            f"could not reach the Hugging Face Hub at {endpoint} ({type(err).__name__}: {err}). Check the "
            "network connection or proxy, or set HF_ENDPOINT to a reachable mirror. Without network, copy "
            f"{spec.filename} onto this machine and run `cellfm convert` on it") from err
    if meta.size is None or meta.commit_hash is None or meta.etag is None:
        raise DownloadError(f"{endpoint} did not report the size, commit and etag of {spec.filename}; "
                            "HF_ENDPOINT must point at a Hugging Face Hub (or a faithful mirror)")
    sha = meta.etag.lower() if _SHA256.match(meta.etag.lower()) else None  # LFS etag = sha256
    for what, pinned, served in (("size", spec.size, meta.size), ("sha256", spec.sha256, sha)):
        if pinned is not None and served is not None and pinned != served:
            raise DownloadError(f"{endpoint} serves {spec.filename} with {what} {served}, but cellfm pins "
                                f"{pinned} for {spec.name}: the release changed; check it before trusting it")
    location = meta.location if meta.xet_file_data is None else url
    return RemoteFile(location, meta.commit_hash, meta.size, sha or spec.sha256, meta.etag)


def _sha256(path: Path) -> str:
    from tqdm.auto import tqdm

    digest = hashlib.sha256()
    with path.open("rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True,
                                    desc=f"checking {path.name}", leave=False) as bar:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def fetch_checkpoint(spec: OfficialWeights, folder: Path, revision: str,
                     force: bool = False) -> tuple[Path, dict]:
    """Download the checkpoint into `folder` (resuming a `.part` left by an interrupted run) and
    verify it. Returns the file and its provenance (repo, revision, commit, size, sha256)."""
    from filelock import FileLock

    folder.mkdir(parents=True, exist_ok=True)
    final, part = folder / spec.filename, folder / f"{spec.filename}.part"
    info_file, part_info_file = folder / f"{spec.filename}.json", folder / f"{spec.filename}.part.json"
    with FileLock(str(folder / f"{spec.filename}.lock")):
        info = _read_json(info_file)
        if final.is_file() and info and not force and (revision in (info["revision"], info["commit"])
                                                        or _offline()):
            return final, info
        if _offline():
            raise DownloadError(
                f"HF_HUB_OFFLINE is set and {spec.name} is not in the cache {folder.parent}. Unset "
                f"HF_HUB_OFFLINE, or on a machine with network run `cellfm download {spec.name[7:]}` and "
                f"copy its cache folder here (or set $CELLFM_CACHE to it)")
        remote = remote_file(spec, revision)
        part_info = _read_json(part_info_file)
        have = part.stat().st_size if part.is_file() else 0
        if force or part_info is None or part_info.get("etag") != remote.etag or have > remote.size:
            have = 0  # a part of another file version (or none): start over
        _require_free(folder, remote.size - have, f"downloading {spec.filename}")
        _write_json(part_info_file, {"etag": remote.etag, "size": remote.size, "commit": remote.commit})
        _download(remote, part, have, spec.filename)
        got = part.stat().st_size
        if got != remote.size:
            raise DownloadError(f"{part} has {got:,} of {remote.size:,} bytes: the download stopped early; "
                                "run the same command again to resume it")
        digest = _sha256(part)
        if remote.sha256 is not None and digest != remote.sha256:
            part.unlink()
            part_info_file.unlink(missing_ok=True)
            raise DownloadError(f"{spec.filename} downloaded with sha256 {digest}, expected {remote.sha256}: "
                                "the file is corrupt and was deleted; run the same command again")
        os.replace(part, final)
        part_info_file.unlink(missing_ok=True)
        info = {"repo_id": spec.repo_id, "filename": spec.filename, "revision": revision,
                "commit": remote.commit, "size": remote.size, "sha256": digest, "endpoint": _endpoint()}
        _write_json(info_file, info)
        return final, info


def _download(remote: RemoteFile, part: Path, have: int, filename: str) -> None:
    """GET (with a Range from byte `have`) into `part`; huggingface_hub retries dropped
    connections itself and shows the progress bar. Whatever arrived stays in `part`."""
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.file_download import http_get

    def interrupted(why: str) -> DownloadError:
        done = part.stat().st_size if part.is_file() else 0
        return DownloadError(f"the download of {filename} stopped after {done:,} of {remote.size:,} bytes "
                             f"({why}); the partial file {part} is kept: run the same command again to "
                             "resume it")

    try:
        with part.open("r+b" if have else "wb") as f:
            f.seek(have)
            f.truncate()
            http_get(remote.url, f, resume_size=have, expected_size=remote.size,
                     displayed_filename=filename)
    except HfHubHTTPError as err:
        raise interrupted(f"HTTP {err.response.status_code} from the server") from err
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise _disk_full(part.parent, f"downloading {filename}", err) from err
        if "Consistency check failed" in str(err):
            raise interrupted("the server sent fewer bytes than announced") from err
        raise
    except _transport_errors() as err:
        raise interrupted(f"{type(err).__name__}: {err}") from err


def _convert(ckpt: Path, out: Path, spec: OfficialWeights, info: dict) -> None:
    """Checkpoint -> our folder, written in a temporary folder beside `out` and renamed at the end."""
    from cellfm.checkpoints.mindspore_ckpt import CheckpointFormatError
    from cellfm.checkpoints.official import load_official_checkpoint

    try:
        model = load_official_checkpoint(ckpt, n_heads=spec.n_heads)
    except (CheckpointFormatError, ValueError) as err:
        raise DownloadError(f"{ckpt} is not a complete {spec.name} checkpoint ({err}); download it again "
                            "(force=True in Python, --force on the command line)") from err
    out.parent.mkdir(parents=True, exist_ok=True)
    need = sum(t.numel() * t.element_size() for t in model.module.state_dict().values())
    _require_free(out.parent, need, f"the converted {spec.name}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}.", dir=out.parent))
    try:
        model.save(tmp, overwrite=True)
        _write_json(tmp / "source.json", {**info, "name": spec.name, "optimizer_state": "dropped",
                                          "licence": "CC BY-NC-ND 4.0: for use on this machine; do not "
                                                     "redistribute"})
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise _disk_full(out.parent, f"converting {spec.name}", err) from err
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def download_official(name: str, cache_dir: str | Path | None = None, *, revision: str | None = None,
                      force: bool = False, keep_checkpoint: bool = False) -> Path:
    """Fetch and convert an official model once; returns its folder in the cache.

    A converted copy already in the cache is returned without network access unless `revision`
    names another one or `force` is set. `keep_checkpoint` keeps the downloaded `.ckpt` beside it.
    """
    spec = official_weights(name)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    out = root / "models" / spec.name
    source = _read_json(out / "source.json")
    if source and not force and (revision is None or revision in (source["revision"], source["commit"])):
        return out
    rev = revision or os.environ.get("CELLFM_HUB_REVISION") or spec.revision
    ckpt, info = fetch_checkpoint(spec, root / "downloads", rev, force=force)
    _convert(ckpt, out, spec, info)
    if not keep_checkpoint:
        ckpt.unlink()
        (ckpt.parent / f"{ckpt.name}.json").unlink(missing_ok=True)
    return out


def load_official(name: str, cache_dir: str | Path | None = None,
                  device: str | torch.device | None = None) -> CellFM:
    """`cellfm.load("cellfm-80m")`: the converted model from the cache, fetched on first use."""
    from cellfm.cellfm import CellFM

    return CellFM.load(download_official(name, cache_dir), device=device)
