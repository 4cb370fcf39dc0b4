"""A ZeRO checkpoint resumes on another number of ranks (engine/train/reshard.py): the state it
restores is the saved one bit for bit, and the run then ends where an uninterrupted run on the
new number of ranks ends (to the rounding of a reordered gradient reduction), at ZeRO 1, 2 and
3, from 2 ranks to 1 and from 1 to 2, with AdamW and with SGD + Lookahead; and between no ZeRO
on one rank (what the planner gives one rank in fp32) and ZeRO on two, both ways."""
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from engine.dist import free_port

GLOBAL_BATCH, TOTAL, SAVED_AT = 4, 7, 3
# (ZeRO stage on 1 rank, on 2 ranks, optimizer)
CASES = ([(stage, stage, "adamw") for stage in (1, 2, 3)] + [(2, 2, "sgd_lookahead"), (3, 3, "sgd_lookahead")]
         + [(0, 1, "adamw_fused"), (0, 3, "sgd_lookahead"), (0, 0, "adamw")])


class Scale(nn.Module):  # a [1]-shaped parameter in a module of its own, as the temperature
    def __init__(self):
        super().__init__()
        self.value = nn.Parameter(torch.ones(1))


class Net(nn.Module):
    """Odd sizes, so that ZeRO pads its partitions at 2 ranks, and a buffer that every step
    moves. (No BatchNorm: its batch statistics would make the math depend on the ranks.)"""

    def __init__(self):
        super().__init__()
        self.inp, self.norm, self.out, self.scale = nn.Linear(7, 13), nn.LayerNorm(13), nn.Linear(13, 5), Scale()
        self.register_buffer("calls", torch.zeros(3))

    def forward(self, x):
        self.calls += 1
        return self.out(torch.relu(self.norm(self.inp(x)))) * self.scale.value


def _engine(stage: int, optimizer: str):
    import deepspeed

    from engine.train.lookahead import Lookahead
    from engine.train.optim import param_groups
    from engine.train.schedule import warmup_cosine

    torch.manual_seed(0)
    model = Net()
    groups = param_groups(model, weight_decay=0.1)
    inner = (torch.optim.AdamW(groups, lr=0.05, foreach=True) if optimizer == "adamw"
             else torch.optim.AdamW(groups, lr=0.05, fused=True) if optimizer == "adamw_fused"
             else Lookahead(torch.optim.SGD(groups, lr=0.05, momentum=0.9), k=5, alpha=0.5))
    scheduler = warmup_cosine(inner, lr=0.05, min_lr=0.0, warmup_steps=2, total_steps=TOTAL)
    world = int(os.environ["WORLD_SIZE"])
    config = {"train_batch_size": GLOBAL_BATCH, "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
              "gradient_clipping": 1.0,
              # At ZeRO-3, parameters under the threshold stay gathered ("persistent"): a mix of
              # both kinds, as in the real towers.
              "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 50},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=inner, lr_scheduler=scheduler, config=config)
    return engine


def _train(engine, start: int, stop: int) -> None:
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    share = GLOBAL_BATCH // world
    for step in range(start, stop):
        x = torch.randn(GLOBAL_BATCH, 7, generator=torch.Generator().manual_seed(step))
        loss = engine(x[rank * share:(rank + 1) * share]).pow(2).mean()
        engine.backward(loss)
        engine.step()


def _weights(engine) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_fp32_param

    whole = engine.zero_optimization_stage() == 0  # the module's parameters are the fp32 weights
    return {n: (p if whole else safe_get_full_fp32_param(p)).detach().clone() for n, p in engine.module.named_parameters()}


def _worker(rank, world, port, root, role, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from engine import dist
    from engine.train import checkpoint, reshard

    dist.init_distributed(timeout_s=120)
    for *stages, optimizer in CASES:
        case = Path(root) / f"{stages[0]}-{stages[1]}-{optimizer}"
        engine = _engine(stages[world - 1], optimizer)
        if role == "save":  # the first run: stop at SAVED_AT with a checkpoint
            _train(engine, 0, SAVED_AT)
            checkpoint.save(engine, case / f"from{world}", SAVED_AT, {"loader": {"at": SAVED_AT}, "task": {}})
        elif role == "reference":  # never interrupted, on this number of ranks
            _train(engine, 0, TOTAL)
            weights = _weights(engine)  # a collective: every rank takes part
            if rank == 0:
                out[(str(case), "reference", world)] = weights
        else:  # resume the other world's checkpoint here, save again at once, then go on
            saved = case / f"from{3 - world}"
            restored = checkpoint.load(engine, saved)
            checkpoint.save(engine, case / f"again{world}", SAVED_AT, restored.rank_state)
            _train(engine, SAVED_AT, TOTAL)
            weights = _weights(engine)
            if rank == 0:
                out[(str(case), "resumed", world)] = (restored.step, restored.rank_state, weights)
                out[(str(case), "states", world)] = (
                    reshard.read_full_state(saved / "step00000003"),
                    reshard.read_full_state(case / f"again{world}" / "step00000003"))
        del engine


def _spawn(world: int, root: Path, role: str, out) -> None:
    mp.spawn(_worker, args=(world, free_port(), str(root), role, out), nprocs=world)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root, out = tmp_path_factory.mktemp("reshard"), mp.Manager().dict()
    _spawn(2, root, "save", out)
    _spawn(1, root, "save", out)
    for world in (1, 2):
        _spawn(world, root, "reference", out)
        _spawn(world, root, "resume", out)
    return root, dict(out)


def _equal(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("world", [1, 2], ids=["2-to-1", "1-to-2"])
@pytest.mark.parametrize("one_rank_stage, two_rank_stage, optimizer", CASES)
def test_resumed_state_is_the_saved_one_and_the_run_ends_as_uninterrupted(runs, one_rank_stage, two_rank_stage,
                                                                         optimizer, world):
    root, out = runs
    case = str(root / f"{one_rank_stage}-{two_rank_stage}-{optimizer}")
    step, rank_state, weights = out[(case, "resumed", world)]
    assert step == SAVED_AT and rank_state == {"loader": {"at": SAVED_AT}, "task": {}}
    before, after = out[(case, "states", world)]
    assert before["saved_ranks"] == 3 - world and after["saved_ranks"] == world
    for key in ("params", "tensor_keys", "scalars", "param_groups", "lr_scheduler", "global_steps",
                "skipped_steps", "buffers", "client_state"):
        _equal(before[key], after[key], key)
    assert before["buffers"]["calls"].tolist() == [SAVED_AT] * 3  # buffers travel too
    reference = out[(case, "reference", world)]
    for name, value in reference.items():
        assert torch.allclose(weights[name], value, rtol=0, atol=1e-6), name
