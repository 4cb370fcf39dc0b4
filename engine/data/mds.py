"""What an MDS dataset holds, read from its index alone, and where its local copy lives.

The engine sizes the run (steps per epoch, eval kinds) before any worker starts, so this reads
only `index.json` (and `classes.json`, the project's marker that a dataset supports zero-shot
classification). For a remote URL just those small files are fetched, with streaming's own
downloader: index.json into the local cache the training loader later fills with shards,
classes.json beside it (streaming counts only its own files against the cache limit, so a
file of ours inside would let the directory outgrow the limit the plan set).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from streaming.base.storage import CloudDownloader

from engine.errors import UserError

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("jpg", "txt")
# The loader hands raw image bytes to DALI; streaming's image encodings would decode on the CPU.
REQUIRED_ENCODINGS = {"jpg": "bytes", "txt": "str"}
CONVERT_HINT = "convert your data with `python launchers/convert.py <your data> <mds dir>`"


@dataclass(frozen=True)
class MdsInfo:
    location: str
    num_samples: int
    columns: dict[str, str]      # column name -> MDS encoding
    classes: dict | None         # classes.json content when present
    index_bytes: int             # index.json, which streaming counts against its cache limit
    shard_bytes: int             # every shard decompressed: what a full local copy holds
    largest_shard_bytes: int     # one shard's peak while it decompresses (raw + zip)

    @property
    def full_copy_bytes(self) -> int:
        """Disk a complete local copy takes, with room for the last shard to decompress: a
        streaming cache limit this large never evicts a shard."""
        return self.index_bytes + self.shard_bytes + self.largest_shard_bytes


def cache_root() -> Path:
    """`$CLIPZERO_CACHE`, else ~/.cache/clipzero: the built-in dataset and remote shards live here."""
    root = os.environ.get("CLIPZERO_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "clipzero"


def is_remote(data: str) -> bool:
    """True for URLs such as s3://, gs://, hf://, which streaming downloads; paths are local."""
    return len(urllib.parse.urlparse(str(data)).scheme) > 1


def local_copy_dir(data: str, local_cache: Path | None = None) -> Path:
    """Where the shards of `data` are read from: the directory itself, or a cache for a URL.

    The cache name hashes the URL, so two datasets never share (and fight over) one cache.
    """
    if not is_remote(data):
        return Path(data)
    if local_cache is None:
        local_cache = cache_root() / "mds"
    digest = hashlib.sha1(data.rstrip("/").encode()).hexdigest()[:16]
    return Path(local_cache) / digest


def describe_mds(data: str, local_cache: Path | None = None) -> MdsInfo:
    """Read an MDS dataset's index and check it has what CLIP pretraining needs."""
    data = str(data)
    local = local_copy_dir(data, local_cache)
    if is_remote(data):
        _fetch_small_files(data, local)
    else:
        if not local.exists():
            raise UserError(f"dataset {data}: no such file or directory; give an MDS directory, or {CONVERT_HINT}.")
        if not (local / "index.json").is_file():
            raise UserError(f"dataset {data}: no index.json there, so it is not an MDS dataset; {CONVERT_HINT}.")

    index = json.loads((local / "index.json").read_text())
    columns = _columns(index, data)
    missing = [name for name in REQUIRED_COLUMNS if name not in columns]
    if missing:
        raise UserError(
            f"dataset {data}: missing column(s) {missing}; found {sorted(columns)}. "
            f"CLIP pretraining needs image bytes in `jpg` and a caption in `txt`: {CONVERT_HINT}.")
    for name, encoding in REQUIRED_ENCODINGS.items():
        if columns[name] != encoding:
            raise UserError(
                f"dataset {data}: column `{name}` is encoded as '{columns[name]}', expected '{encoding}' "
                f"(raw bytes go to the GPU decoder): {CONVERT_HINT}.")

    classes_file = _classes_file(data, local)
    classes = json.loads(classes_file.read_text()) if classes_file.is_file() else None
    shards = index["shards"]
    raw = [int(shard["raw_data"]["bytes"]) for shard in shards]
    zipped = [int((shard.get("zip_data") or {}).get("bytes", 0)) for shard in shards]
    return MdsInfo(location=data, num_samples=sum(int(shard["samples"]) for shard in shards),
                   columns=columns, classes=classes, index_bytes=(local / "index.json").stat().st_size,
                   shard_bytes=sum(raw), largest_shard_bytes=max(r + z for r, z in zip(raw, zipped)))


def _classes_file(data: str, local: Path) -> Path:
    """In a local dataset's directory; beside (not in) a remote dataset's shard cache."""
    return local.with_name(f"{local.name}.classes.json") if is_remote(data) else local / "classes.json"


def _columns(index: dict, data: str) -> dict[str, str]:
    shards = index.get("shards") or []
    if not shards:
        raise UserError(f"dataset {data}: index.json lists no shards (an empty dataset); {CONVERT_HINT}.")
    first = shards[0]
    if first.get("format") != "mds":
        raise UserError(f"dataset {data}: shards are in '{first.get('format')}' format, not MDS; {CONVERT_HINT}.")
    return dict(zip(first["column_names"], first["column_encodings"]))


def _fetch_small_files(url: str, local: Path) -> None:
    """Fetch index.json (required) and classes.json (optional) unless the cache has them.

    An index already in the cache is kept, as streaming itself keeps it: the run must read
    the same index that describe_mds() reported on. A missing classes.json is asked for again
    at each start, so that one failed request does not leave a labelled set unlabelled for good.
    """
    if not (local / "index.json").is_file():
        try:
            _download(f"{url.rstrip('/')}/index.json", local / "index.json")
        except Exception as error:  # each cloud client raises its own types; all mean "could not fetch"
            raise UserError(
                f"dataset {url}: could not download index.json ({type(error).__name__}: {error}). "
                f"Check the URL and your storage credentials, or {CONVERT_HINT}.") from error
    classes = _classes_file(url, local)
    if classes.is_file():
        return
    try:
        _download(f"{url.rstrip('/')}/classes.json", classes)
    except FileNotFoundError:  # streaming's clients say so for a missing object: a retrieval-only set
        pass
    except Exception as error:  # another failure: say so, since zero-shot on this set is then left out
        logger.warning("dataset %s: could not download classes.json (%s: %s); zero-shot evaluation on it is "
                       "left out this run", url, type(error).__name__, error)


def _download(url: str, destination: Path) -> None:
    """Download under a name of this process, then rename: ranks of one node fetch at once."""
    partial = destination.with_name(f"{destination.name}.{os.getpid()}")
    CloudDownloader.direct_download(url, str(partial))
    os.replace(partial, destination)
