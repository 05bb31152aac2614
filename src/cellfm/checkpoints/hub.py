"""Official CellFM weights from the Hugging Face Hub: fetch once, verify, convert into the cache.

The authors publish MindSpore checkpoints (weights plus Adam moments) in the Hub repository
`ShangguanNingyuan/CellFM`. `download_official("cellfm-80m")` asks the Hub for the file's commit,
size and sha256, checks them against what cellfm pins and the free disk space, and lets
`huggingface_hub.hf_hub_download` fetch the file (its retries with resume inside a run, etag
check, lock and cache layout, under `<cache>/downloads/`). The file's sha256 is checked, the
checkpoint is converted once into our folder format in `<cache>/models/<name>/` (optimizer
moments dropped; the release's official settings, e.g. pad_zero) and deleted unless asked to keep
it. Later loads read that folder and never touch the network.

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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cellfm.checkpoints.folder import write_model_folder
from cellfm.checkpoints.mindspore_ckpt import CheckpointFormatError
from cellfm.checkpoints.official import read_official_checkpoint
from cellfm.vocab import load_vocabulary
from cellfm.wording import arg

HUB_REPO = "ShangguanNingyuan/CellFM"
# Revision of HUB_REPO that downloads use. NOT YET PINNED to a commit: no machine of this project
# could reach the Hub. Replace "main" by the 40-hex commit that `cellfm download` records in
# `<cache>/models/<name>/source.json` ("commit") once a person has checked that file on a machine
# with network, and fill in `size`/`sha256` below from the same file. Overridable per call
# (`revision=`, `--revision`) or with $CELLFM_HUB_REVISION.
HUB_REVISION = "main"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 24
_RETRY = "run the same command again"


@dataclass(frozen=True)
class OfficialWeights:
    """One released checkpoint file. `size`/`sha256` are pinned where known; the Hub's own size
    and sha256 (the LFS etag) are checked in every case."""

    name: str
    filename: str
    description: str
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


def _elsewhere() -> str:
    return f"choose another cache folder ({arg('cache_dir', placeholder='folder')} or $CELLFM_CACHE)"


def _require_free(folder: Path, need: int, what: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise DownloadError(f"not enough disk space in {folder}: {what} needs {_gb(need)}, {_gb(free)} free. "
                            f"Free some space or {_elsewhere()}")


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


@contextmanager
def _hub_errors(spec: OfficialWeights, revision: str, downloading: bool) -> Iterator[None]:
    """huggingface_hub's errors -> one DownloadError that says what to do."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = _endpoint()
    unreachable = (f"could not reach the Hugging Face Hub at {endpoint}. Check the network connection or "
                   "proxy, or set HF_ENDPOINT to a reachable mirror. Without network, copy "
                   f"{spec.filename} onto this machine and run `cellfm convert` on it")
    try:
        yield
    except LocalEntryNotFoundError as err:  # hf_hub_download: no answer and nothing cached
        raise DownloadError(unreachable) from err
    except RevisionNotFoundError as err:
        raise DownloadError(f"revision {revision!r} does not exist in {spec.repo_id} on {endpoint}; pass "
                            f"another one ({arg('revision', placeholder='rev')} or "
                            "$CELLFM_HUB_REVISION)") from err
    except (RepositoryNotFoundError, EntryNotFoundError) as err:
        raise DownloadError(f"{spec.repo_id}/{spec.filename} at revision {revision!r} is not on {endpoint}; "
                            "the release may have moved: check the repository page and pass the right "
                            f"{arg('revision', placeholder='rev')}") from err
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else "?"
        what = f"the download of {spec.filename} failed" if downloading else f"the Hub at {endpoint} failed"
        raise DownloadError(f"{what} (HTTP {status} from the server); try again later: {_RETRY}") from err
    except _transport_errors() as err:
        if not downloading:
            raise DownloadError(f"{unreachable} ({type(err).__name__}: {err})") from err
        raise DownloadError(f"the download of {spec.filename} was interrupted ({type(err).__name__}: {err}); "
                            f"{_RETRY}") from err
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise DownloadError(f"the disk filled up while downloading {spec.filename} ({err.strerror}). "
                                f"Free some space or {_elsewhere()}") from err
        if "Consistency check failed" in str(err):
            raise DownloadError(f"the server sent fewer bytes of {spec.filename} than it announced; "
                                f"{_RETRY}") from err
        raise


def _sha256(path: Path) -> str:
    from tqdm.auto import tqdm

    digest = hashlib.sha256()
    with path.open("rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True,
                                    desc=f"checking {path.name}", leave=False) as bar:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _forget(path: Path) -> None:
    """Delete a file from the huggingface_hub cache: the snapshot entry and the blob it points at."""
    blob = path.resolve()
    path.unlink(missing_ok=True)
    blob.unlink(missing_ok=True)


def _local(spec: OfficialWeights, hub_cache: Path, revision: str) -> Path | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(spec.repo_id, spec.filename, revision=revision, cache_dir=hub_cache,
                                    local_files_only=True))
    except LocalEntryNotFoundError:
        return None


def fetch_checkpoint(spec: OfficialWeights, hub_cache: Path, revision: str,
                     force: bool = False) -> tuple[Path, dict]:
    """The checkpoint file (downloaded by `hf_hub_download` into `hub_cache`, or found there) and
    its provenance; its sha256 is checked against the pin or the Hub's LFS etag."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache

    endpoint = _endpoint()
    commit, expected = None, spec.sha256
    if _offline():
        path = None if force else _local(spec, hub_cache, revision)
        if path is None:
            raise DownloadError(
                f"HF_HUB_OFFLINE is set and {spec.name} is not in the cache {hub_cache.parent}. Unset "
                "HF_HUB_OFFLINE, or on a machine with network run "
                f"`cellfm download {spec.name[7:]}` and copy its cache folder here (or set $CELLFM_CACHE "
                "to it)")
    else:
        try:
            with _hub_errors(spec, revision, downloading=False):
                url = hf_hub_url(spec.repo_id, spec.filename, revision=revision, endpoint=endpoint)
                meta = get_hf_file_metadata(url, endpoint=endpoint)
        except DownloadError as err:  # no network: a checkpoint kept from an earlier run still serves
            path = None if force or "could not reach" not in str(err) else _local(spec, hub_cache, revision)
            if path is None:
                raise
        else:
            if meta.size is None or meta.commit_hash is None or meta.etag is None:
                raise DownloadError(f"{endpoint} did not report the size, commit and etag of "
                                    f"{spec.filename}; HF_ENDPOINT must point at a Hugging Face Hub (or a "
                                    "faithful mirror)")
            served = meta.etag.lower() if _SHA256.match(meta.etag.lower()) else None  # LFS etag = sha256
            for what, pinned, value in (("size", spec.size, meta.size), ("sha256", spec.sha256, served)):
                if pinned is not None and value is not None and pinned != value:
                    raise DownloadError(f"{endpoint} serves {spec.filename} with {what} {value}, but "
                                        f"cellfm pins {pinned} for {spec.name}: the release changed; check "
                                        "it before trusting it")
            commit, expected = meta.commit_hash, spec.sha256 or served
            cached = try_to_load_from_cache(spec.repo_id, spec.filename, cache_dir=hub_cache, revision=commit)
            if force or not isinstance(cached, str):
                _require_free(hub_cache, meta.size, f"downloading {spec.filename}")
            with _hub_errors(spec, revision, downloading=True):
                path = Path(hf_hub_download(spec.repo_id, spec.filename, revision=revision,
                                            cache_dir=hub_cache, endpoint=endpoint, force_download=force))
    blob = path.resolve().name
    expected = expected or (blob if _SHA256.match(blob) else None)  # offline: the blob is named by its etag
    digest = _sha256(path)
    if expected is not None and digest != expected:
        _forget(path)
        raise DownloadError(f"{spec.filename} has sha256 {digest}, expected {expected}: the file is corrupt "
                            f"and was deleted; {_RETRY}")
    info = {"repo_id": spec.repo_id, "filename": spec.filename, "revision": revision,
            "commit": commit or path.parent.name, "size": path.stat().st_size, "sha256": digest,
            "endpoint": endpoint}
    return path, info


def _convert(ckpt: Path, out: Path, spec: OfficialWeights, info: dict) -> None:
    """Checkpoint -> our folder with the release's official settings (written atomically)."""
    try:
        config, state = read_official_checkpoint(ckpt, release=spec.name)
    except (CheckpointFormatError, ValueError) as err:
        raise DownloadError(f"{ckpt} is not a complete {spec.name} checkpoint ({err}); download it again "
                            f"({arg('force', True)})") from err
    need = sum(t.numel() * t.element_size() for t in state.values())
    _require_free(out.parent, need, f"the converted {spec.name}")
    source = {**info, "name": spec.name, "optimizer_state": "dropped",
              "licence": "CC BY-NC-ND 4.0: for use on this machine; do not redistribute"}
    try:
        write_model_folder(out, config, state, load_vocabulary(config.vocabulary), overwrite=True,
                           extra_json={"source.json": source})
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise DownloadError(f"the disk holding {out.parent} filled up while converting {spec.name}. Free "
                                f"some space or {_elsewhere()}") from err
        raise


def _is_current(out: Path, revision: str | None) -> bool:
    source = _read_json(out / "source.json")
    return bool(source) and (revision is None or revision in (source["revision"], source["commit"]))


def download_official(name: str, cache_dir: str | Path | None = None, *, revision: str | None = None,
                      force: bool = False, keep_checkpoint: bool = False) -> Path:
    """Fetch and convert an official model once; returns its folder in the cache.

    A converted copy already in the cache is returned without network access unless `revision`
    names another one or `force` is set. `keep_checkpoint` keeps the downloaded `.ckpt` (in the
    huggingface_hub cache layout under `<cache>/downloads/`; `source.json` says where).
    """
    from filelock import FileLock

    spec = official_weights(name)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    out = root / "models" / spec.name
    if not force and _is_current(out, revision):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out.parent / f".{spec.name}.lock")):
        if not force and _is_current(out, revision):  # another process converted it meanwhile
            return out
        rev = revision or os.environ.get("CELLFM_HUB_REVISION") or spec.revision
        ckpt, info = fetch_checkpoint(spec, root / "downloads", rev, force=force)
        if keep_checkpoint:
            info["checkpoint"] = str(ckpt)
        _convert(ckpt, out, spec, info)
    if not keep_checkpoint:
        _forget(ckpt)
    return out
