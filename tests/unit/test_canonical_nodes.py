"""Which node counts keep the sample order of a canonical node count, and which shards each node
reads: established with streaming's own partition ('orig') and shuffle ('py1e') functions, put
together as StreamingDataset puts them (streaming/base/batching/random.py), for whole epochs of
a dataset of many uneven shards. engine/data/streams.py states the rule these tests hold it to."""
import numpy as np
import pytest
from streaming.base.partition import get_partitions
from streaming.base.shuffle import get_shuffle

from engine.data.streams import (PARTITION_ALGO, SHUFFLE_ALGO, SHUFFLE_BLOCK, keeps_sample_order,
                                 node_counts_keeping_order, share_per_node)

SEED, EPOCH = 5, 3
# 150 shards of 13 to 19 samples; 2,401 samples leave a remainder for every canonical count tried,
# so spans of uneven length (streaming repeats the last sample of a short one) are exercised.
SHARDS = np.random.default_rng(0).integers(12, 20, size=150)
SHARDS[-1] = 2401 - SHARDS[:-1].sum()
SAMPLES = int(SHARDS.sum())
GLOBAL_BATCH = 240  # divisible by every node count x ranks below; 2,401 % 240 = 1: the tail is 1 sample
STEPS = SAMPLES // GLOBAL_BATCH


def epoch(canonical: int, nodes: int, ranks: int = 1, *, accum: int = 1, steps_done: int = 0) -> np.ndarray:
    """Sample ids of the epoch as (node, rank, micro-batch, sample), after `steps_done` optimizer
    steps, for micro-batches of GLOBAL_BATCH / (nodes x ranks x accum) and one worker."""
    micro = GLOBAL_BATCH // (nodes * ranks * accum)
    ids = get_partitions(PARTITION_ALGO, SAMPLES, canonical, nodes, ranks, 1, micro, steps_done * GLOBAL_BATCH)
    shuffle = get_shuffle(SHUFFLE_ALGO, SHARDS, canonical, SEED, EPOCH, SHUFFLE_BLOCK)
    return np.where(ids != -1, shuffle[ids], -1)[:, :, 0]


def steps(ids: np.ndarray, accum: int = 1) -> list[list[int]]:
    """The sorted samples of each whole optimizer step (`accum` micro-batches on every rank), as
    engine/data/loader.py takes them: the tail past the last whole step dropped."""
    count = ids.shape[2] // accum
    taken = [sorted(ids[:, :, t * accum:(t + 1) * accum].ravel().tolist()) for t in range(count)]
    return [step for step in taken if len(step) == GLOBAL_BATCH and -1 not in step]


@pytest.mark.parametrize("canonical", [1, 2, 4, 6])
def test_node_counts_that_divide_or_are_divided_by_the_canonical_count_take_its_steps(canonical):
    on_canonical = steps(epoch(canonical, canonical))
    assert len(on_canonical) == STEPS
    taken = [i for step in on_canonical for i in step]
    assert len(taken) == len(set(taken))  # no sample twice within the epoch's whole steps
    for nodes in range(1, 13):
        if GLOBAL_BATCH % (2 * nodes):
            continue
        if not keeps_sample_order(canonical, nodes):
            with pytest.raises(ValueError, match="evenly divisible"):
                epoch(canonical, nodes)
            continue
        for ranks, accum in ((1, 1), (2, 3) if GLOBAL_BATCH % (6 * nodes) == 0 else (2, 1)):
            assert steps(epoch(canonical, nodes, ranks, accum=accum), accum) == on_canonical, (nodes, ranks, accum)
    # The counts streaming accepts are exactly those the message names.
    accepted = [n for n in range(1, 4 * canonical + 1) if keeps_sample_order(canonical, n)]
    named = node_counts_keeping_order(canonical, 4 * canonical)
    assert named.startswith(", ".join(str(n) for n in accepted if n <= canonical))
    assert all(f"{n}" in named for n in accepted)


@pytest.mark.parametrize("canonical, began_on, resumed_on", [(2, 2, 1), (4, 4, 2), (4, 2, 8), (1, 1, 3), (6, 3, 12)])
def test_a_resume_on_a_count_that_keeps_the_order_takes_the_remaining_steps(canonical, began_on, resumed_on):
    done = 4
    before = steps(epoch(canonical, began_on))
    after = steps(epoch(canonical, resumed_on, 2, steps_done=done))
    assert after == before[done:]


def _shards_read(ids: np.ndarray) -> list[set[int]]:
    """Per node, the shards its samples lie in."""
    ends = np.cumsum(SHARDS)
    return [set(np.searchsorted(ends, node[node != -1], side="right").tolist()) for node in ids]


@pytest.mark.parametrize("canonical, nodes", [(2, 2), (4, 4), (4, 2), (2, 4), (1, 2), (1, 4)])
def test_each_node_reads_its_share_of_the_shards(canonical, nodes):
    read = _shards_read(epoch(canonical, nodes, 2))
    assert set().union(*read) == set(range(len(SHARDS)))
    share = share_per_node(canonical, nodes)
    for shards in read:
        # A canonical node's group holds 1/canonical of the samples, in whole shards but the two
        # at its ends, which it shares with its neighbours.
        assert SHARDS[sorted(shards)].sum() <= share * SAMPLES + 2 * SHARDS.max(), (len(shards), share)
    if canonical == nodes:
        # Disjoint but for the shards on a span boundary, which both neighbours read.
        assert sum(map(len, read)) <= len(SHARDS) + canonical - 1
    if canonical == 1:
        # The price of one group: every node reads nearly every shard (all but the few none of
        # whose samples fell to it).
        assert all(len(shards) > 0.9 * len(SHARDS) for shards in read)
