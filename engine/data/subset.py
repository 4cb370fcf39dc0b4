"""A fixed fraction of a local MDS dataset, written once into the cache (the --data-fraction dial).

The subset holds round(fraction * N) samples, at least one, chosen by a permutation with a
seed of its own: runs of every method and every run seed train on the same pairs, and a
smaller fraction is contained in a larger one. Samples keep their source order and are copied
byte for byte, every column as it is.

Every rank of a run calls this at once, before distributed start. Each writes into a temporary
directory of its own and renames it into place; the first rename wins, the others drop their
copy. A complete subset therefore either exists under its final name or not at all, and a
later call reuses it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from streaming import MDSWriter
from streaming.base.format import reader_from_json

from engine.data.mds import describe_mds, is_remote
from engine.errors import UserError

# Independent of the run seed, so CLIP, DeCLIP and CLIP-Lite runs with any seed share a subset.
SUBSET_SEED = 0x5EB5E7


def ensure_subset(data: str, fraction: float, cache_dir: Path) -> str:
    """The MDS directory holding `fraction` of `data`'s samples; `data` itself for fraction 1."""
    if not 0 < fraction <= 1:
        raise UserError(f"--data-fraction {fraction} must lie in (0, 1]: 1 trains on all the data, "
                        f"0.1 on a fixed tenth of it.")
    if fraction == 1:
        return data
    if is_remote(data):
        raise UserError(f"--data-fraction reads a local MDS directory and {data} is remote: copy it to "
                        f"local disk first and pass that directory as --data.")
    num_samples = describe_mds(data).num_samples
    source = Path(data).resolve()
    index_text = (source / "index.json").read_bytes()
    digest = hashlib.sha256(b"\0".join([str(source).encode(), index_text, repr(float(fraction)).encode()]))
    target = Path(cache_dir) / "subsets" / f"{source.name}-{fraction:g}-{digest.hexdigest()[:16]}"
    if (target / "index.json").is_file():
        return str(target)

    count = max(1, round(fraction * num_samples))
    chosen = np.sort(np.random.default_rng(SUBSET_SEED).permutation(num_samples)[:count])
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _copy_samples(source, json.loads(index_text), chosen, partial)
        if (source / "classes.json").is_file():  # the zero-shot marker describes the subset too
            shutil.copyfile(source / "classes.json", partial / "classes.json")
        try:
            os.rename(partial, target)
        except OSError:
            if not (target / "index.json").is_file():
                raise  # not another process's finished subset: a real failure
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # gone after a rename; our copy if another won
    return str(target)


class CopyWriter(MDSWriter):
    """MDSWriter that also takes a sample already encoded in its own column layout."""

    def encode_sample(self, sample):
        return sample if isinstance(sample, bytes) else super().encode_sample(sample)


def _copy_samples(source: Path, index: dict, chosen: np.ndarray, out: Path) -> None:
    """Write the samples `chosen` (ascending global ids) of the MDS dataset at `source` into `out`."""
    shards = [reader_from_json(str(source), None, info) for info in index["shards"]]
    for shard in shards:
        if not (source / shard.raw_data.basename).is_file():
            raise UserError(f"{source}: shard {shard.raw_data.basename} is missing or stored compressed only; "
                            f"--data-fraction copies uncompressed local shards. Convert the data again with "
                            f"`python launchers/convert.py` (it writes them uncompressed).")
    first = shards[0]
    columns = dict(zip(first.column_names, first.column_encodings))
    starts = np.cumsum([0] + [shard.samples for shard in shards])
    size_limit = index["shards"][0].get("size_limit") or 1 << 26
    with CopyWriter(out=str(out), columns=columns, size_limit=size_limit) as writer:
        layout = (writer.column_names, writer.column_encodings, writer.column_sizes)
        for sample_id in chosen.tolist():
            shard_id = int(np.searchsorted(starts, sample_id, side="right")) - 1
            shard = shards[shard_id]
            raw = shard.get_sample_data(sample_id - int(starts[shard_id]))
            # Raw bytes are valid only in the writer's own column layout (MDSWriter sorts the names);
            # a shard written by another tool in another order is decoded and encoded again.
            same_layout = (shard.column_names, shard.column_encodings, shard.column_sizes) == layout
            writer.write(raw if same_layout else shard.decode_sample(raw))
