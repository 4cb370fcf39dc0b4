"""`--data` as streaming reads it: one dataset or a weighted mixture, and the sample order.

    --data /data/mds/pairs                       one local MDS directory, read in place
    --data s3://bucket/pairs                     one remote dataset (any URL streaming can read)
    --data s3://bucket/laion:0.7,/data/cc3m:0.3  a mixture: each LOCATION:WEIGHT, comma separated

A weight is the number after a location's last ':'. A path holds ':' only in its URL scheme
("s3://"), whose '//' never parses as a number, so `s3://b/x:0.7` and `/data/a:0.3` split
cleanly. Weights are normalised to proportions. Without any weight the whole value is one
location (a path may then hold commas).

Each stream reads from its own local directory: a local dataset in place, a URL through its
own cache (engine.data.mds.local_copy_dir). streaming builds a mixture's epoch of as many
samples as the streams hold together, drawing floor(epoch x proportion) from each (the few
left over go one each to streams picked by the seed): a stream drawn beyond its size repeats
samples within an epoch, one drawn below it takes another subset each epoch.

The sample order is set here once, for the loader and for the plan that states it.
"""
from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from streaming import Stream

from engine.data.mds import MdsInfo, cache_root, describe_mds, is_remote, local_copy_dir
from engine.errors import UserError
from engine.files import filesystem_type

# streaming's default algorithm, named so that the order never follows a change of default:
# each shard's samples are spread over a window of about SHUFFLE_BLOCK samples, so a node
# reads only the shards of that window at a time.
SHUFFLE_ALGO = "py1e"
# streaming's default window for one canonical node (max(4,000,000 / nodes, 2^18)), named
# for the same reason. A dataset smaller than one window is shuffled as a whole.
SHUFFLE_BLOCK = 4_000_000
# Streaming (py1e) deals the shards, in an order the seed fixes for the run, into `canonical nodes`
# C groups of equal samples (a shard on a boundary is split between two), shuffles each group on
# its own every epoch and interleaves them into one sequence F, which partition 'orig' deals out
# to the physical nodes: node p of P takes F[p::P]. F depends on C, not on P, so every P that
# streaming accepts takes the same F:
#   * P divides C: node p reads the C/P groups c = p (mod P), 1/P of the data: its share;
#   * C divides P: node p reads group p mod C, 1/C of the data (P/C nodes read each group);
#   * any other P: streaming's 'orig' refuses (it cannot stripe groups over such nodes).
# (With P a multiple of C streaming pads each group to a multiple of P/C, and a group shorter than
# the others repeats its last sample: both land in the last C positions of F or after, which a
# loader that ends its epoch at a whole global batch divisible by C never takes.)
# tests/unit/test_canonical_nodes.py checks all of this against streaming's own functions. The
# plan picks C (engine/plan/data.py); with one, the order is the same on every node count.
CANONICAL_NODES = 1
# 'orig' deals the order out as engine/data/loader.py's docstring says. The default, 'relaxed',
# runs 'orig' too whenever one node count divides the other, and otherwise replays another run's
# layout with its own worker order; naming 'orig' keeps the order from depending on that rule.
PARTITION_ALGO = "orig"

MIXTURE_EXAMPLE = "s3://bucket/a:0.7,/data/b:0.3"

# The shard cache. Before fetching a shard, streaming evicts until the shard fits under its
# limit, but it counts a shard only once fetched: the shards other readers fetch meanwhile come
# on top. Each reader (a data worker, or a rank without workers) fetches from three threads at
# once: the one reading a sample whose shard went missing, and its download and "ready" threads,
# which fetch ahead (streaming's _prepare_thread and _ready_thread).
FETCHES_PER_READER = 3
STREAMING_MIN_SHARDS = 4  # streaming refuses a limit under 4 x the largest shard (raw and zip)


@dataclass(frozen=True)
class DataSource:
    """One item of --data: where the dataset is, and its weight in a mixture."""
    location: str
    weight: float | None


def parse_data(data: str) -> tuple[DataSource, ...]:
    """The datasets --data names, in order; a single one has no weight."""
    if not str(data).strip():
        raise UserError("--data is empty: give an MDS directory, a URL, or a weighted mixture such as "
                        f"{MIXTURE_EXAMPLE} (or leave --data out for the built-in digits).")
    items = [_split_weight(item.strip()) for item in str(data).split(",")]
    weighted = [item for item in items if item.weight is not None]
    if not weighted:
        if len(items) > 1 and not Path(str(data)).exists() and all(_exists(item.location) for item in items):
            raise UserError(f"--data {data}: {len(items)} datasets without weights; a mixture gives each one, "
                            f"e.g. {MIXTURE_EXAMPLE}.")
        return (DataSource(str(data), None),)
    if len(weighted) < len(items):
        bare = [item.location or "(empty)" for item in items if item.weight is None]
        tails = [item.location.removeprefix(_scheme(item.location)).rpartition(":") for item in items
                 if item.weight is None]
        unreadable = [f"'{tail}'" for _, colon, tail in tails if colon and tail and "/" not in tail]
        raise UserError(f"--data {data}: {', '.join(bare)} has no weight"
                        + (f" ({', '.join(unreadable)} is not a number)" if unreadable else "")
                        + f"; in a mixture give each dataset one, e.g. {MIXTURE_EXAMPLE}.")
    for item in items:
        if not item.location:
            raise UserError(f"--data {data}: a weight without a dataset before it; write LOCATION:WEIGHT, "
                            f"e.g. {MIXTURE_EXAMPLE}.")
        if not (math.isfinite(item.weight) and item.weight > 0):
            raise UserError(f"--data {data}: the weight of {item.location} is {item.weight:g}; give each "
                            f"dataset a positive weight, or leave the dataset out.")
    locations = [item.location.rstrip("/") for item in items]
    repeated = sorted({location for location in locations if locations.count(location) > 1})
    if repeated:
        raise UserError(f"--data {data}: {', '.join(repeated)} appears more than once; name each dataset "
                        f"once, with its total weight.")
    if len(items) == 1:  # one dataset is all of the epoch, whatever its weight
        return (DataSource(items[0].location, None),)
    return tuple(items)


def _scheme(location: str) -> str:
    """The URL scheme with its '://' ('' for a path)."""
    scheme, found, _ = location.partition("://")
    return scheme + found if found else ""


def _exists(location: str) -> bool:
    return bool(_scheme(location)) or Path(location).exists()


def _split_weight(item: str) -> DataSource:
    location, colon, weight = item.rpartition(":")
    if colon and not weight.startswith("/"):
        try:
            return DataSource(location.strip(), float(weight))
        except ValueError:
            pass
    return DataSource(item, None)


@dataclass(frozen=True)
class StreamFacts:
    """One dataset of --data, checked, with where its shards are read from."""
    location: str
    remote: bool
    local: Path                 # the dataset itself, or a URL's cache
    proportion: float | None    # its share of a mixture's epoch; None for a single dataset
    info: MdsInfo


def describe_streams(data: str, local_cache: Path | None = None) -> tuple[StreamFacts, ...]:
    """Every dataset --data names, each checked by describe_mds (columns, encodings); fails
    with the fix on the first that is not usable MDS."""
    sources = parse_data(data)
    total = sum(source.weight or 0 for source in sources)
    return tuple(StreamFacts(location=source.location, remote=is_remote(source.location),
                             local=local_copy_dir(source.location, local_cache),
                             proportion=source.weight / total if source.weight else None,
                             info=describe_mds(source.location, local_cache))
                 for source in sources)


@dataclass(frozen=True)
class DataFacts:
    """What the planner needs to know of the training data."""
    streams: tuple[StreamFacts, ...]
    per_epoch: tuple[int, ...]  # samples streaming draws from each stream in one epoch
    cache_dir: Path             # where remote shards are cached on this node
    cache_free_bytes: int       # free disk there, plus the shards of these streams cached already
    cache_filesystem: str = ""  # its file system's type, e.g. "ext4", "nfs4" ("" unknown)

    @property
    def epoch_size(self) -> int:
        return sum(self.per_epoch)


def data_facts(data: str, seed: int, local_cache: Path | None = None) -> DataFacts:
    """Describe --data for the plan: its streams, the epoch streaming will draw from them (by
    streaming's own weighting, with the run seed) and the disk its remote shards may use."""
    streams = describe_streams(data, local_cache)
    cache_dir = Path(local_cache) if local_cache is not None else cache_root() / "mds"
    cached = sum(bytes_under(stream.local) for stream in streams if stream.remote)
    per_epoch = _per_epoch(streams, seed)
    unused = [stream.location for stream, count in zip(streams, per_epoch) if count == 0]
    if unused:
        raise UserError(f"--data {data}: the weight of {', '.join(unused)} draws no sample in an epoch of "
                        f"{sum(per_epoch):,}; raise it, or leave the dataset out.")
    existing = _existing_ancestor(cache_dir)
    return DataFacts(streams=streams, per_epoch=per_epoch, cache_dir=cache_dir,
                     cache_free_bytes=shutil.disk_usage(existing).free + cached,
                     cache_filesystem=filesystem_type(existing))


def _per_epoch(streams: tuple[StreamFacts, ...], seed: int) -> tuple[int, ...]:
    weighted = _streams(streams)
    Stream.apply_weights(weighted, np.array([s.info.num_samples for s in streams], np.int64), None, seed)
    return tuple(int(stream.choose) for stream in weighted)


def _streams(streams: tuple[StreamFacts, ...]) -> list:
    return [Stream(remote=stream.location if stream.remote else None, local=str(stream.local),
                   proportion=stream.proportion) for stream in streams]


def keeps_sample_order(canonical_nodes: int, nodes: int) -> bool:
    """Whether `nodes` physical nodes take the same sample order as `canonical_nodes` do (one
    divides the other; streaming refuses any other count)."""
    return canonical_nodes % nodes == 0 or nodes % canonical_nodes == 0


def share_per_node(canonical_nodes: int, nodes: int) -> float:
    """The part of the data one of `nodes` nodes reads in an epoch (about: a shard on a group
    boundary is read by both groups' nodes)."""
    return 1 / min(canonical_nodes, nodes)


def node_counts_keeping_order(canonical_nodes: int, up_to: int) -> str:
    """The node counts of keeps_sample_order, for a message: the divisors, and the multiples up
    to `up_to` (at least two of them), e.g. "1, 2, 4 or a multiple of 4 (8, 12, ...)"."""
    divisors = [n for n in range(1, canonical_nodes + 1) if canonical_nodes % n == 0]
    multiples = list(range(2 * canonical_nodes, max(up_to, 3 * canonical_nodes) + 1, canonical_nodes))
    return (", ".join(map(str, divisors)) + f" or a multiple of {canonical_nodes} ("
            + ", ".join(map(str, multiples)) + ", ...)")


def fetches_in_flight(local_world_size: int, workers: int) -> int:
    """Shard fetches a node may have under way at once (see FETCHES_PER_READER)."""
    return FETCHES_PER_READER * local_world_size * max(1, workers)


def cache_floor(streams: tuple[StreamFacts, ...], in_flight: int) -> int:
    """The least disk a node's shard cache can work in: streaming's own minimum, once the
    fetches in flight beside the one it makes room for are set aside."""
    largest = max(stream.info.largest_shard_bytes for stream in streams)
    return sum(stream.info.index_bytes for stream in streams) + (STREAMING_MIN_SHARDS + in_flight - 1) * largest + 1


def streaming_arguments(streams: tuple[StreamFacts, ...], *, micro_batch: int, seed: int,
                        cache_limit: int | None, in_flight: int = FETCHES_PER_READER,
                        shuffle_algo: str = SHUFFLE_ALGO, shuffle_block: int = SHUFFLE_BLOCK,
                        canonical_nodes: int = CANONICAL_NODES) -> dict:
    """Keyword arguments of StreamingDataset for these streams, in the order the plan states
    (`seed`, `shuffle_algo`, `shuffle_block`, `canonical_nodes`: the plan's, this module's
    constants by default); `cache_limit` is the disk the node's cache may take (the plan's),
    with `in_flight` fetches."""
    streaming_limit = None
    # A limit that holds every shard never evicts one: streaming need not keep count.
    if cache_limit is not None and cache_limit < sum(stream.info.full_copy_bytes for stream in streams):
        in_place = [stream.location for stream in streams if not stream.remote]
        if in_place:
            # streaming evicts the least recently used shard of ANY stream, local ones included:
            # with a limit it would delete shards of a dataset that has no other copy.
            raise UserError(f"a cache limit applies to remote data only; {', '.join(in_place)} is read in "
                            f"place and streaming would delete its shards to keep the limit.")
        floor = cache_floor(streams, in_flight)
        if cache_limit < floor:
            raise UserError(f"a cache limit of {cache_limit:,} bytes is below the {floor:,} that {in_flight} shard "
                            f"fetches at once need: raise it (--cache-limit), or use fewer data workers.")
        largest = max(stream.info.largest_shard_bytes for stream in streams)
        streaming_limit = cache_limit - (in_flight - 1) * largest
    return dict(streams=_streams(streams), batch_size=micro_batch, cache_limit=streaming_limit,
                shuffle=True, shuffle_algo=shuffle_algo, shuffle_seed=seed, shuffle_block_size=shuffle_block,
                num_canonical_nodes=canonical_nodes, partition_algo=PARTITION_ALGO)


def bytes_under(folder: Path) -> int:
    """Bytes of the files under `folder` now (a live run may be evicting some meanwhile)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except FileNotFoundError:  # evicted meanwhile by a live run
                pass
    return total


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path
