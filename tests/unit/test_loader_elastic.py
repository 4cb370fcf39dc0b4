"""TrainLoader across world layouts: epochs end at optimizer steps, each step's samples do not depend
on the ranks or nodes, and a position saved on one world size resumes on another.

Several nodes are simulated in this process, one rank after another: each rank is built and run
with RANK/WORLD_SIZE set and LOCAL_WORLD_SIZE=1 (its own node, so it is its node's streaming
leader and waits on nobody). Ranks sharing a node cannot run one after another in one process
(streaming's shared barrier waits for every rank of the node), so that layout runs as two real
rank processes on one node. One optimizer step is `grad_accum` micro-batches on every rank; its
samples are the union over ranks and micro-batches.
"""
import json
import os
import socket
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import pytest
import streaming.base.dataset
import streaming.base.util

from engine.data.loader import TrainLoader
from engine.data.spec import DataSpec
from engine.data.text import ClipTokenizer
from engine.errors import UserError

REPO = Path(__file__).resolve().parents[2]
DIGITS = 1497
GLOBAL_BATCH = 128   # 11 steps per epoch; 1497 // 32 = 46 micro-batches of 32, which 4 does not divide
STEPS_PER_EPOCH = DIGITS // GLOBAL_BATCH
STEPS = STEPS_PER_EPOCH + 2  # into epoch 1
SEED = 5
OPTIONS = dict(image_size=16, spec=DataSpec(), seed=SEED, decode_device="cpu")


@pytest.fixture(scope="module")
def tokenizer():
    return ClipTokenizer()


@contextmanager
def _as_rank(rank: int, world: int):
    """Environment of `rank` of `world` ranks, one rank per node."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in (("RANK", rank), ("WORLD_SIZE", world), ("LOCAL_WORLD_SIZE", 1), ("LOCAL_RANK", 0)):
            patch.setenv(name, str(value))
        # With WORLD_SIZE > 1 streaming would start a process group of its own and wait for the
        # other ranks; one rank per node needs none.
        patch.setattr(streaming.base.dataset, "maybe_init_dist", lambda: False)
        patch.setattr(streaming.base.util, "maybe_init_dist", lambda: False)
        yield


@dataclass
class Run:
    """What every rank of one run saw: sample ids per micro-batch, and the state before and after each."""

    grad_accum: int
    ids: list[list[list[int]]]       # [rank][micro-batch] -> sample ids
    before: list[list[dict]]         # [rank][micro-batch] -> state before it (its epoch is the batch's)
    after: list[list[dict]]          # [rank][micro-batch] -> state after it
    steps_per_epoch: int
    batches_per_epoch: int

    def steps(self) -> list[list[int]]:
        """Sorted sample ids of each optimizer step, over all ranks and the step's micro-batches."""
        count = len(self.ids[0]) // self.grad_accum
        return [sorted(i for rank in self.ids for batch in rank[t * self.grad_accum:(t + 1) * self.grad_accum]
                       for i in batch) for t in range(count)]

    def step_epochs(self) -> list[set[int]]:
        """The epochs that each optimizer step's micro-batches come from, over all ranks."""
        count = len(self.ids[0]) // self.grad_accum
        return [{s["epoch"] for rank in self.before for s in rank[t * self.grad_accum:(t + 1) * self.grad_accum]}
                for t in range(count)]

    def state_after_step(self, step: int) -> dict:
        states = [rank[(step + 1) * self.grad_accum - 1] for rank in self.after]
        assert all(state == states[0] for state in states)  # the same on every rank
        return json.loads(json.dumps(states[0]))


def _run(data, tokenizer, *, nodes: int, micro_batch: int, grad_accum: int, steps: int, resume: dict | None = None,
         **options) -> Run:
    """`steps` optimizer steps on `nodes` nodes of one rank each, the ranks run one after another."""
    ids, before, after = [], [], []
    for rank in range(nodes):
        with _as_rank(rank, nodes):
            loader = TrainLoader.from_data(str(data), micro_batch=micro_batch, grad_accum=grad_accum, workers=0,
                                           tokenizer=tokenizer, rank=rank, world_size=nodes, **{**OPTIONS, **options})
            if resume is not None:
                loader.load_state_dict(resume)
            rank_ids, rank_before, rank_after = [], [], []
            state = loader.state_dict()
            for batch in islice(iter(loader), steps * grad_accum):
                assert batch["sample_id"].shape == (micro_batch,)
                rank_ids.append(batch["sample_id"].tolist())
                rank_before.append(state)
                state = loader.state_dict()
                rank_after.append(state)
            per_epoch = loader.steps_per_epoch, loader.batches_per_epoch
            del loader  # its iterator is gone already: nothing of this rank runs on
        ids.append(rank_ids)
        before.append(rank_before)
        after.append(rank_after)
    return Run(grad_accum, ids, before, after, *per_epoch)


@pytest.fixture(scope="module")
def reference(digits, tokenizer):
    """One rank, micro-batch 32 x 4 accumulated: STEPS uninterrupted steps."""
    return _run(digits.train, tokenizer, nodes=1, micro_batch=32, grad_accum=4, steps=STEPS)


def _epoch0(run_steps):
    return [i for step in run_steps[:STEPS_PER_EPOCH] for i in step]


# ---- 1. epochs end at optimizer steps -----------------------------------------------------------------------------

def _assert_epochs_end_at_steps(run: Run, steps_per_epoch: int, global_batch: int):
    assert run.steps_per_epoch == steps_per_epoch and run.batches_per_epoch == steps_per_epoch * run.grad_accum
    epochs = run.step_epochs()
    assert all(len(e) == 1 for e in epochs), f"a step mixes epochs: {epochs}"
    assert [e.pop() for e in epochs] == [0] * steps_per_epoch + [1] * (len(epochs) - steps_per_epoch)
    steps = run.steps()
    assert all(len(step) == global_batch for step in steps)
    epoch0 = [i for step in steps[:steps_per_epoch] for i in step]
    assert len(set(epoch0)) == len(epoch0) == steps_per_epoch * global_batch  # the tail dropped, nothing twice
    # The new epoch starts at a step: its first step is a fresh draw, overlapping the last epoch.
    assert set(steps[steps_per_epoch]) & set(epoch0)


def test_the_reference_split_ends_its_epoch_at_a_step(reference):
    # --global-batch 128 --micro-batch 32 on the digits: 44 micro-batches per epoch, not 46.
    _assert_epochs_end_at_steps(reference, STEPS_PER_EPOCH, GLOBAL_BATCH)
    assert reference.batches_per_epoch == 44


@pytest.mark.parametrize("micro_batch, grad_accum", [(16, 8), (48, 3), (40, 5)])
def test_no_optimizer_step_holds_samples_of_two_epochs(digits, tokenizer, micro_batch, grad_accum):
    global_batch = micro_batch * grad_accum
    steps_per_epoch = DIGITS // global_batch
    run = _run(digits.train, tokenizer, nodes=1, micro_batch=micro_batch, grad_accum=grad_accum,
               steps=steps_per_epoch + 1, image_size=8)
    _assert_epochs_end_at_steps(run, steps_per_epoch, global_batch)


def test_a_dataset_smaller_than_one_global_batch_is_refused(digits, tokenizer):
    with _as_rank(0, 1), pytest.raises(UserError, match="fewer than one global batch of 1536"):
        TrainLoader.from_data(str(digits.train), micro_batch=512, grad_accum=3, workers=0, tokenizer=tokenizer, rank=0,
                              world_size=1, **OPTIONS)


# ---- 2. the samples of a step do not depend on the layout -----------------------------------------------------------

@pytest.fixture(scope="module")
def two_nodes(digits, tokenizer):
    return _run(digits.train, tokenizer, nodes=2, micro_batch=16, grad_accum=4, steps=STEPS)


@pytest.fixture(scope="module")
def four_nodes(digits, tokenizer):
    return _run(digits.train, tokenizer, nodes=4, micro_batch=32, grad_accum=1, steps=STEPS)


def test_step_samples_are_the_same_on_two_and_four_nodes(reference, two_nodes, four_nodes):
    for run in (two_nodes, four_nodes):
        assert run.steps_per_epoch == STEPS_PER_EPOCH
        assert run.steps() == reference.steps()
        _assert_epochs_end_at_steps(run, STEPS_PER_EPOCH, GLOBAL_BATCH)
    # Ranks hold disjoint shares of every step.
    for run in (two_nodes, four_nodes):
        for t in range(STEPS):
            shares = [set(i for b in rank[t * run.grad_accum:(t + 1) * run.grad_accum] for i in b) for rank in run.ids]
            assert sum(map(len, shares)) == len(set().union(*shares)) == GLOBAL_BATCH


def test_on_one_rank_the_micro_batch_split_keeps_even_the_order(reference, digits, tokenizer):
    whole = _run(digits.train, tokenizer, nodes=1, micro_batch=128, grad_accum=1, steps=STEPS)
    flat = lambda run: [i for batch in run.ids[0] for i in batch]
    assert flat(whole) == flat(reference)


def test_order_within_a_step_does_change_with_the_ranks(reference, two_nodes):
    # What the report says: sets are kept, order (rank-major, micro-batch by micro-batch) is not.
    gathered = [i for b in range(4) for rank in two_nodes.ids for i in rank[b]]
    assert sorted(gathered) == reference.steps()[0]
    assert gathered != [i for batch in reference.ids[0][:4] for i in batch]


# ---- 3. elastic resume ----------------------------------------------------------------------------------------------

def _assert_resumed(before: Run, done: int, after: Run, reference: Run):
    """`before` ran `done` steps, `after` resumed from its state: together they are the reference."""
    seen = _epoch0(before.steps()[:done] + after.steps())
    assert sorted(seen) == sorted(_epoch0(reference.steps()))  # every sample of the epoch once
    assert len(seen) == len(set(seen))
    assert after.steps() == reference.steps()[done:done + len(after.steps())]
    assert [e.pop() for e in after.step_epochs()] == [0] * (STEPS_PER_EPOCH - done) + [1] * (STEPS - STEPS_PER_EPOCH)


def test_two_nodes_resume_on_one_rank(reference, two_nodes, digits, tokenizer):
    done = 4
    resumed = _run(digits.train, tokenizer, nodes=1, micro_batch=64, grad_accum=2, steps=STEPS - done,
                   resume=two_nodes.state_after_step(done - 1))
    _assert_resumed(two_nodes, done, resumed, reference)


def test_one_rank_resumes_on_two_nodes(reference, digits, tokenizer):
    done = 6
    resumed = _run(digits.train, tokenizer, nodes=2, micro_batch=32, grad_accum=2, steps=STEPS - done,
                   resume=reference.state_after_step(done - 1))
    _assert_resumed(reference, done, resumed, reference)


def test_saved_position_is_world_independent(reference, two_nodes, four_nodes):
    for step in (0, 5, STEPS_PER_EPOCH - 1, STEPS_PER_EPOCH):
        state = reference.state_after_step(step)
        assert two_nodes.state_after_step(step) == four_nodes.state_after_step(step) == state
    assert reference.state_after_step(STEPS_PER_EPOCH - 1)["epoch"] == 1  # the epoch rolled over at its last step


def test_resume_refuses_what_cannot_continue(reference, digits, tokenizer):
    with _as_rank(0, 1):
        loader = TrainLoader.from_data(str(digits.train), micro_batch=32, grad_accum=4, workers=0, tokenizer=tokenizer, rank=0,
                                       world_size=1, **OPTIONS)
        state = reference.state_after_step(2)
        loader.load_state_dict(state)  # the same setup loads
        with pytest.raises(UserError, match="inside an optimizer step"):
            loader.load_state_dict(reference.after[0][2 * 4 + 1])  # after 2 of a step's 4 micro-batches
        with pytest.raises(UserError, match="outside an epoch of 1408 samples"):
            loader.load_state_dict({**state, "sample_in_epoch": 1408})
        # A position saved before positions were world-independent converts where it lies between
        # steps of this split (micro-batches 4 of 32 = one step of 128), and is refused elsewhere.
        old = {"epoch": 0, "seed": SEED, "micro_batch": 32, "world_size": 1, "dataset_size": DIGITS}
        with pytest.raises(UserError, match="inside an optimizer step"):
            loader.load_state_dict({**old, "batch_in_epoch": 3})
        loader.load_state_dict({**old, "batch_in_epoch": 4})
        assert loader.state_dict()["sample_in_epoch"] == 128
        del loader


# ---- more than one canonical node (remote data on several nodes) ---------------------------------------------------

def test_with_two_canonical_nodes_the_node_counts_that_keep_the_order_take_the_same_steps(digits, tokenizer):
    """The plan's rule (engine/data/streams.py) on the real loader: 1, 2 and 4 nodes take the steps of
    two canonical nodes and resume each other's positions; 3 nodes are refused before any work."""
    two = dict(canonical_nodes=2, image_size=8)
    on_two = _run(digits.train, tokenizer, nodes=2, micro_batch=32, grad_accum=2, steps=3, **two)
    on_four = _run(digits.train, tokenizer, nodes=4, micro_batch=32, grad_accum=1, steps=3, **two)
    resumed_on_one = _run(digits.train, tokenizer, nodes=1, micro_batch=64, grad_accum=2, steps=2,
                          resume=on_two.state_after_step(0), **two)
    assert on_four.steps() == on_two.steps()
    assert resumed_on_one.steps() == on_two.steps()[1:]
    one = _run(digits.train, tokenizer, nodes=2, micro_batch=32, grad_accum=2, steps=1, image_size=8)
    assert one.steps()[0] != on_two.steps()[0]  # two canonical nodes are another order than one
    assert on_two.state_after_step(2) == on_four.state_after_step(2) == resumed_on_one.state_after_step(1)
    with _as_rank(0, 3), pytest.raises(UserError, match=r"3 nodes cannot take the order of 2 canonical nodes: run "
                                                        r"on 1, 2 or a multiple of 2 \(4, 6, \.\.\.\) nodes"):
        TrainLoader.from_data(str(digits.train), micro_batch=32, grad_accum=1, workers=0, tokenizer=tokenizer, rank=0,
                              world_size=3, **{**OPTIONS, **two})


# ---- two ranks on one node: real rank processes ---------------------------------------------------------------------

SAME_NODE_SCRIPT = textwrap.dedent("""
    import json, os, sys
    from itertools import islice
    import torch.distributed as dist
    from engine.data.loader import TrainLoader
    from engine.data.spec import DataSpec
    from engine.data.text import ClipTokenizer

    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=2)
    args = json.loads(sys.argv[1])
    tokenizer = ClipTokenizer()

    def run(steps, resume=None):
        loader = TrainLoader.from_data(args["data"], micro_batch=32, grad_accum=2, image_size=16, spec=DataSpec(),
                                       seed=args["seed"], workers=1, decode_device="cpu", tokenizer=tokenizer, rank=rank,
                                       world_size=2)
        if resume is not None:
            loader.load_state_dict(resume)
        ids, before, after = [], [], []
        state = loader.state_dict()
        for batch in islice(iter(loader), steps * 2):
            ids.append(batch["sample_id"].tolist())
            before.append(state)
            state = loader.state_dict()
            after.append(state)
        dist.barrier()  # both ranks done with this loader before either builds the next
        return {"ids": ids, "before": before, "after": after, "steps_per_epoch": loader.steps_per_epoch,
                "batches_per_epoch": loader.batches_per_epoch}

    out = {"fresh": run(args["steps"]), "resumed": run(args["steps"] - args["done"], args["resume"])}
    json.dump(out, open(args["out"] + str(rank) + ".json", "w"))
    dist.barrier()
""")
SAME_NODE_RESUMES_AT = 3


@pytest.fixture(scope="module")
def same_node(reference, digits, tmp_path_factory):
    """Two ranks on one node (micro-batch 32 x 2 accumulated): a fresh run, and one resumed from the
    one-rank reference after SAME_NODE_RESUMES_AT steps."""
    tmp = tmp_path_factory.mktemp("same_node")
    script = tmp / "rank.py"
    script.write_text(SAME_NODE_SCRIPT)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = json.dumps({"data": str(digits.train), "seed": SEED, "steps": STEPS, "done": SAME_NODE_RESUMES_AT,
                       "resume": reference.state_after_step(SAME_NODE_RESUMES_AT - 1), "out": str(tmp / "rank")})
    ranks = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONPATH": str(REPO)}
        ranks.append(subprocess.Popen([sys.executable, str(script), args], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    for process in ranks:
        output, _ = process.communicate(timeout=180)
        assert process.returncode == 0, output[-3000:]
    results = [json.loads((tmp / f"rank{rank}.json").read_text()) for rank in range(2)]
    return {part: Run(2, *([r[part][key] for r in results] for key in ("ids", "before", "after")),
                      results[0][part]["steps_per_epoch"], results[0][part]["batches_per_epoch"])
            for part in ("fresh", "resumed")}


def test_two_ranks_on_one_node_see_the_same_steps(reference, same_node):
    fresh = same_node["fresh"]
    assert fresh.steps() == reference.steps()
    _assert_epochs_end_at_steps(fresh, STEPS_PER_EPOCH, GLOBAL_BATCH)
    assert fresh.state_after_step(7) == reference.state_after_step(7)


def test_one_rank_resumes_on_two_ranks_of_one_node(reference, same_node):
    _assert_resumed(reference, SAME_NODE_RESUMES_AT, same_node["resumed"], reference)


def test_two_ranks_of_one_node_resume_on_four_nodes(reference, same_node, digits, tokenizer):
    done = 8
    resumed = _run(digits.train, tokenizer, nodes=4, micro_batch=16, grad_accum=2, steps=STEPS - done,
                   resume=same_node["fresh"].state_after_step(done - 1))
    _assert_resumed(same_node["fresh"], done, resumed, reference)
