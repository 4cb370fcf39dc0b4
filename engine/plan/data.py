"""Part of the planner: the training data as streaming reads it. Which datasets in which
proportions, how many samples an epoch draws, how much of the node's disk remote shards may
take, and the sample order (shuffle algorithm, seed, window, canonical nodes).

The shard cache. Remote shards are downloaded into a cache on each node (shared by its ranks)
and, under a limit, the least recently used ones are evicted. Local data is read in place and
never limited: streaming evicts shards of any stream, so a limit would delete a local
dataset's only copy. The plan's limit is the disk the cache may take; the loader hands
streaming that less the shards other readers may be fetching at the same moment, which
streaming does not count (engine/data/streams.py), and streaming itself refuses less than 4
of the largest shard (raw and zip side by side while it decompresses) plus the indexes.
"""
from __future__ import annotations

import math

from streaming.base.util import bytes_to_int  # the parser of streaming's own cache_limit

from engine.data.streams import (CANONICAL_NODES, FETCHES_PER_READER, PARTITION_ALGO, SHUFFLE_ALGO, SHUFFLE_BLOCK,
                                 STREAMING_MIN_SHARDS, DataFacts, StreamFacts, cache_floor, fetches_in_flight,
                                 node_counts_keeping_order)
from engine.errors import UserError
from engine.files import SHARED_FILESYSTEMS

# Of the free disk where the cache lives: checkpoints, logs and other jobs share that disk.
CACHE_DISK_SHARE = 0.5
CACHE_HINT = "free disk space there, or point CLIPZERO_CACHE at a directory on a larger disk"

MiB = 2**20


def data_decisions(dials, data: DataFacts | None, *, dataset_size: int, local_world_size: int, workers: int,
                   seed: int, nodes: int = 1) -> list[tuple[str, object, str]]:
    """(name, value, reason) of data_streams, cache_limit, shuffle_algo, shuffle_seed,
    shuffle_block and canonical_nodes. `data` None: one local dataset (plans made without data,
    as in the planner's own tests)."""
    return [_data_streams(data, dataset_size), _cache_limit(dials.cache_limit, data, local_world_size, workers, nodes),
            ("shuffle_algo", SHUFFLE_ALGO, "streaming's py1e, named so that the order never follows a change of "
             "default: each shard's samples are spread over a window, so a node reads few shards at a time"),
            ("shuffle_seed", seed, "the run's --seed: the same seed gives the same order on every layout"),
            ("shuffle_block", SHUFFLE_BLOCK, _block_reason(data)),
            ("canonical_nodes", *canonical_nodes(data, nodes))]


def canonical_nodes(data: DataFacts | None, nodes: int) -> tuple[int, str]:
    """The canonical node count and why. Remote data: this run's node count, so that each node
    downloads only its share of the shards; the order then holds on the counts that divide it or
    that it divides (engine/data/streams.py), and a resume keeps it (engine/plan/resume.py).
    Local data is read in place, so a split saves nothing: one, whose order holds on any count."""
    remote = data is not None and any(stream.remote for stream in data.streams)
    if not remote or nodes == 1:
        return CANONICAL_NODES, (
            ("local data, read in place" if not remote else "one node reads all of the remote data") +
            f": one canonical node (partition '{PARTITION_ALGO}'), the sample order is the same on any number "
            f"of nodes")
    return nodes, (f"remote data on {nodes} nodes: each node downloads only its 1/{nodes} of the shards; the "
                   f"sample order is exact on {node_counts_keeping_order(nodes, 2 * nodes)} nodes, which a "
                   f"resume may use, and no other count")


def dataset_reason(data: DataFacts | None) -> str:
    """Why the plan's dataset_size (the epoch the loader draws) is what it is."""
    if data is None or len(data.streams) == 1:
        return "pairs in the training data"
    held = sum(stream.info.num_samples for stream in data.streams)
    return (f"the mixture's epoch, as streaming draws it: as many samples as its {len(data.streams)} datasets "
            f"hold together ({held:,}), shared out by the proportions")


def _data_streams(data: DataFacts | None, dataset_size: int):
    if data is None:
        return "data_streams", (("--data", 1.0, dataset_size),), "one dataset: each sample once per epoch"
    if len(data.streams) == 1:
        stream = data.streams[0]
        return ("data_streams", ((stream.location, 1.0, data.epoch_size),),
                "one dataset: each sample once per epoch" + (", streamed from its URL" if stream.remote else ""))
    rows = tuple((stream.location, round(stream.proportion, 6), drawn)
                 for stream, drawn in zip(data.streams, data.per_epoch))
    repeated = [f"{stream.location} x{drawn / stream.info.num_samples:.2g}"
                for stream, drawn in zip(data.streams, data.per_epoch) if drawn > stream.info.num_samples]
    return "data_streams", rows, (
        "(location, proportion, samples per epoch) of the --data mixture: weights normalised; streaming "
        "floors each share and hands the remainder out one by one, by seed"
        + (f"; drawn beyond their size, so samples repeat within an epoch: {', '.join(repeated)}" if repeated else ""))


def _block_reason(data: DataFacts | None) -> str:
    reason = "streaming's window for one canonical node, named so that the order does not follow its default"
    if data is not None and data.epoch_size <= SHUFFLE_BLOCK:
        reason += f"; the {data.epoch_size:,} samples of an epoch fit one window: shuffled as a whole"
    return reason


def _cache_limit(given: str | None, data: DataFacts | None, local_world_size: int, workers: int, nodes: int):
    name = "cache_limit"
    streams = data.streams if data is not None else ()
    remote = [stream for stream in streams if stream.remote]
    in_place = [stream.location for stream in streams if not stream.remote] or ["--data"]
    if given is not None and len(remote) < len(streams or [None]):
        raise UserError(f"--cache-limit applies to remote data; {', '.join(in_place)} is read in place and "
                        f"streaming would delete its shards to keep a limit: drop --cache-limit.")
    if not remote:
        return name, None, "local data: read in place"
    if nodes > 1 and data.cache_filesystem in SHARED_FILESYSTEMS:
        # Streaming keeps a cache per node: its index of what is there and its evictions live in
        # the node's shared memory, so nodes on one directory delete shards the others read.
        raise UserError(f"the shard cache {data.cache_dir} is on a {data.cache_filesystem} file system, which the "
                        f"{nodes} nodes likely share, and each node keeps and evicts its own cache: point "
                        f"CLIPZERO_CACHE at a disk of each node's own (e.g. /tmp/clipzero or $SLURM_TMPDIR).")
    need = sum(stream.info.full_copy_bytes for stream in remote)
    free, where = data.cache_free_bytes, data.cache_dir
    if len(remote) < len(streams):
        if need > free:
            raise UserError(
                f"the remote datasets of this mixture need {_size(need)} of cache at {where} and {_size(free)} is free; "
                f"a mixture with local data cannot limit its cache (streaming would evict shards of the local "
                f"{', '.join(in_place)} too): {CACHE_HINT}, or upload the local datasets as well.")
        return name, None, (f"no limit: a limit would let streaming evict shards of the local {', '.join(in_place)}; "
                            f"the remote datasets' {_size(need)} fit in the {_size(free)} free at {where}")
    in_flight = fetches_in_flight(local_world_size, workers)
    floor = cache_floor(tuple(remote), in_flight)
    why_floor = (f"{STREAMING_MIN_SHARDS + in_flight - 1} of the largest shard "
                 f"({_size(max(stream.info.largest_shard_bytes for stream in remote))}): streaming's "
                 f"{STREAMING_MIN_SHARDS}, plus {in_flight - 1} more fetched at once by {local_world_size} rank(s) x "
                 f"{max(1, workers)} worker(s) on the node, up to {FETCHES_PER_READER} each; and the indexes")
    if given is not None:
        limit = _parse_size(given)
        if limit < min(floor, need):  # a limit that holds all the data evicts nothing: no floor
            raise UserError(f"--cache-limit {given} is below the {_size(floor)} this node reads at once "
                            f"({why_floor}): give --cache-limit {_as_flag(min(floor, need))} or more.")
        if limit > free:
            raise UserError(f"--cache-limit {given} is more than the {_size(free)} free at {where}: lower it, "
                            f"or {CACHE_HINT}.")
        return name, limit, "--cache-limit given" + (f"; the remote data ({_size(need)}) fits whole" if limit >= need
                                                     else _refetch_note(limit, need, remote))
    share = int(free * CACHE_DISK_SHARE)
    if need <= share:
        return name, need, (f"the whole remote data fits: {_size(need)}, within half of the {_size(free)} free "
                            f"at {where}")
    if share < floor:
        raise UserError(f"the shard cache at {where} may take {_size(share)} (half of the {_size(free)} free there), "
                        f"less than the {_size(floor)} this node reads at once ({why_floor}): {CACHE_HINT}.")
    return name, share, (f"half of the {_size(free)} free at {where}; the remote data needs {_size(need)}, so the "
                         f"least recently used shards are evicted" + _refetch_note(share, need, remote))


def _refetch_note(limit: int, need: int, remote: list[StreamFacts]) -> str:
    """py1e reads every shard whose window covers the position, about a window of samples."""
    if limit >= need:
        return ""
    samples = sum(stream.info.num_samples for stream in remote)
    window = min(need, math.ceil(need * SHUFFLE_BLOCK / samples))
    if limit >= window:
        return ""
    return (f"; below the {_size(window)} a shuffle window of {min(samples, SHUFFLE_BLOCK):,} samples spans, so "
            f"shards are downloaded again within an epoch")


def _parse_size(text: str) -> int:
    try:
        value = int(bytes_to_int(text))
    except ValueError:
        value = -1
    if value < 1:
        raise UserError(f"--cache-limit {text!r} is not a size: give bytes or a size such as 500mb or 20gb.")
    return value


def _as_flag(n_bytes: int) -> str:
    """The least --cache-limit that holds `n_bytes`, in whole mb (kb when under one)."""
    return f"{math.ceil(n_bytes / MiB)}mb" if n_bytes >= MiB else f"{math.ceil(n_bytes / 2**10)}kb"


def _size(n_bytes: float) -> str:
    """Binary units, spelled as --cache-limit reads them (1 gb = 2^30 bytes)."""
    for unit, scale in (("TB", 2**40), ("GB", 2**30), ("MB", MiB), ("KB", 2**10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.3g} {unit}"
    return f"{int(n_bytes)} B"
