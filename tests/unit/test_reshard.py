"""A ZeRO checkpoint resumes on another number of ranks (engine/train/reshard.py): the state it
restores is the saved one bit for bit, and the run then ends where an uninterrupted run on the
new number of ranks ends (to the rounding of a reordered gradient reduction), at ZeRO 1, 2 and
3, from 2 ranks to 1 and from 1 to 2, with AdamW and with SGD + Lookahead, in fp32 and in bf16;
between no ZeRO on one rank (what the planner gives one rank in fp32, and in bf16 as fp32 weights
under autocast) and ZeRO on two, both ways; and across precisions, fp32 to bf16 and back (the
checkpoint of DeepSpeed's own bf16 mode without ZeRO, which an older clipzero wrote, is refused,
saying what to do); and evaluation reads a bf16 ZeRO checkpoint's fp32 weights."""
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from engine.dist import free_port

GLOBAL_BATCH, TOTAL, SAVED_AT = 4, 7, 3
# (ZeRO stage on 1 rank, on 2 ranks, optimizer, precision on 1 rank, on 2 ranks). bf16 at
# ZeRO 1 is DeepSpeed's BF16_Optimizer, at 2 and 3 its ZeRO optimizers, at 0 fp32 weights under
# autocast (engine/plan/precision.py).
FP32 = ([(stage, stage, "adamw") for stage in (1, 2, 3)] + [(2, 2, "sgd_lookahead"), (3, 3, "sgd_lookahead")]
        + [(0, 1, "adamw_fused"), (0, 3, "sgd_lookahead"), (0, 0, "adamw")])
BF16 = [(stage, stage, "adamw") for stage in (1, 2, 3)] + [(1, 1, "sgd_lookahead"), (0, 1, "adamw_fused")]
CASES = ([(*case, "fp32", "fp32") for case in FP32] + [(*case, "bf16", "bf16") for case in BF16]
         + [(0, 1, "adamw", "fp32", "bf16"), (2, 3, "adamw", "bf16", "fp32")])


def _one_form(one_rank_stage, two_rank_stage, one_rank_precision, two_rank_precision) -> bool:
    """Whether both sides train the same way: the same precision, and in bf16 both with ZeRO
    (bf16 weights) or both without (fp32 weights under autocast)."""
    return one_rank_precision == two_rank_precision and (
        one_rank_precision == "fp32" or (one_rank_stage == 0) == (two_rank_stage == 0))


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


def _engine(stage: int, optimizer: str, precision: str, deepspeed_bf16_without_zero: bool = False):
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
    # As the planner renders it: with ZeRO, gradients accumulated and reduced in fp32; without,
    # an fp32 engine whose forward runs under autocast (_train). DeepSpeed's own bf16 mode without
    # ZeRO is what an older clipzero ran.
    if precision == "bf16" and (stage > 0 or deepspeed_bf16_without_zero):
        config["bf16"] = {"enabled": True}
        if stage > 0:  # (DeepSpeed refuses fp32 accumulation without ZeRO)
            config.update(data_types={"grad_accum_dtype": "fp32"}, communication_data_type="fp32")
    engine, *_ = deepspeed.initialize(model=model, optimizer=inner, lr_scheduler=scheduler, config=config)
    engine.module.autocast = precision == "bf16" and "bf16" not in config
    return engine


def _train(engine, start: int, stop: int) -> None:
    from engine.train.reshard import weight_dtype

    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    share = GLOBAL_BATCH // world
    for step in range(start, stop):
        x = torch.randn(GLOBAL_BATCH, 7, generator=torch.Generator().manual_seed(step))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=engine.module.autocast):
            out = engine(x[rank * share:(rank + 1) * share].to(weight_dtype(engine)))
        loss = out.float().pow(2).mean()
        engine.backward(loss)
        engine.step()


def _weights(engine) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_fp32_param

    whole = engine.zero_optimization_stage() == 0  # the module's parameters are the fp32 weights
    return {n: (p if whole else safe_get_full_fp32_param(p)).detach().clone() for n, p in engine.module.named_parameters()}


def _forward_uses_the_fp32_weights(engine) -> bool:
    """Whether the weights the forward reads are the fp32 ones rounded to the engine's dtype:
    what apply_full_state must refresh after setting the fp32 weights."""
    import deepspeed

    fp32 = _weights(engine)  # collectives, as the gathering below
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()),
                                           enabled=engine.zero_optimization_stage() == 3):
        return all(torch.equal(p.detach(), fp32[n].to(p.dtype)) for n, p in engine.module.named_parameters())


def _refusals(root: Path) -> list[str]:
    """What checkpoint.load says for DeepSpeed's bf16 mode without ZeRO (an older clipzero's),
    both ways, on one rank: an fp32 checkpoint without ZeRO into it (the same layout but for the
    precision) and its own checkpoint into this clipzero's bf16 without ZeRO."""
    from engine.errors import UserError
    from engine.train import checkpoint

    bf16_without_zero = _engine(0, "adamw", "bf16", deepspeed_bf16_without_zero=True)
    _train(bf16_without_zero, 0, SAVED_AT)
    checkpoint.save(bf16_without_zero, root / "0-bf16", SAVED_AT, {"loader": {"at": SAVED_AT}, "task": {}})
    messages = []
    for engine, saved in ((bf16_without_zero, root / "0-0-adamw-fp32-fp32" / "from1"),
                          (_engine(0, "adamw", "bf16"), root / "0-bf16")):
        try:
            checkpoint.load(engine, saved)
            messages.append(f"{saved} was loaded without a refusal")
        except UserError as refusal:
            messages.append(str(refusal))
    return messages


def _worker(rank, world, port, root, role, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from engine import dist
    from engine.train import checkpoint, reshard

    dist.init_distributed(timeout_s=120)
    # BF16_Optimizer (bf16 at ZeRO-1) logs its memory use with a forced garbage collection six
    # times per engine (0.7-1.3 s here): this file builds dozens of engines.
    import deepspeed.runtime.bf16_optimizer as bf16_optimizer
    bf16_optimizer.see_memory_usage = lambda message, force=False: None
    for *stages, optimizer, one_rank_precision, two_rank_precision in CASES:
        case = Path(root) / f"{stages[0]}-{stages[1]}-{optimizer}-{one_rank_precision}-{two_rank_precision}"
        if role == "reference" and not _one_form(*stages, one_rank_precision, two_rank_precision):
            continue  # no uninterrupted run to compare with (see the test)
        engine = _engine(stages[world - 1], optimizer, (one_rank_precision, two_rank_precision)[world - 1])
        if role == "save":  # the first run: stop at SAVED_AT with a checkpoint
            _train(engine, 0, SAVED_AT)
            checkpoint.save(engine, case / f"from{world}", SAVED_AT, {"loader": {"at": SAVED_AT}, "task": {}})
            weights = _weights(engine)
            if rank == 0:
                out[(str(case), "saved", world)] = weights
        elif role == "reference":  # never interrupted, on this number of ranks
            _train(engine, 0, TOTAL)
            weights = _weights(engine)  # a collective: every rank takes part
            if rank == 0:
                out[(str(case), "reference", world)] = weights
        else:  # resume the other world's checkpoint here, save again at once, then go on
            saved = case / f"from{3 - world}"
            restored = checkpoint.load(engine, saved)
            forward_follows = _forward_uses_the_fp32_weights(engine)
            checkpoint.save(engine, case / f"again{world}", SAVED_AT, restored.rank_state)
            _train(engine, SAVED_AT, TOTAL)
            weights = _weights(engine)
            if rank == 0:
                out[(str(case), "resumed", world)] = (restored.step, restored.rank_state, forward_follows, weights)
                out[(str(case), "states", world)] = (
                    reshard.read_full_state(saved / "step00000003"),
                    reshard.read_full_state(case / f"again{world}" / "step00000003"))
        del engine
    if role == "resume" and world == 1:
        out["refusals"] = _refusals(Path(root))
    dist.close_distributed()


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


# The run after the resume ends as an uninterrupted one on the new number of ranks, to the
# rounding of a reduction in another order: in fp32 within 1e-6. In bf16 each rank's gradient is
# rounded to bf16 before the fp32 reduction, so gradients over 2 ranks and over 1 differ by
# bf16's rounding (2^-9 relative) in the saved steps; SGD carries that through (measured
# 8.1e-5), Adam's division by sqrt(v) turns it into up to a step of its own on an element whose
# gradient is near zero (measured 3.0e-3 at every stage, against the learning rate's 0.05).
TOLERANCE = {("fp32", "adamw"): 1e-6, ("fp32", "adamw_fused"): 1e-6, ("fp32", "sgd_lookahead"): 1e-6,
             ("bf16", "adamw"): 5e-3, ("bf16", "sgd_lookahead"): 2e-4}


@pytest.mark.parametrize("world", [1, 2], ids=["2-to-1", "1-to-2"])
@pytest.mark.parametrize("one_rank_stage, two_rank_stage, optimizer, one_rank_precision, two_rank_precision", CASES)
def test_resumed_state_is_the_saved_one_and_the_run_ends_as_uninterrupted(runs, one_rank_stage, two_rank_stage,
                                                                         optimizer, one_rank_precision,
                                                                         two_rank_precision, world):
    root, out = runs
    case = str(root / f"{one_rank_stage}-{two_rank_stage}-{optimizer}-{one_rank_precision}-{two_rank_precision}")
    step, rank_state, forward_follows, weights = out[(case, "resumed", world)]
    assert step == SAVED_AT and rank_state == {"loader": {"at": SAVED_AT}, "task": {}}
    before, after = out[(case, "states", world)]
    assert before["saved_ranks"] == 3 - world and after["saved_ranks"] == world
    for key in ("params", "tensor_keys", "scalars", "param_groups", "lr_scheduler", "global_steps",
                "skipped_steps", "buffers", "client_state"):
        _equal(before[key], after[key], key)
    assert before["buffers"]["calls"].tolist() == [SAVED_AT] * 3  # buffers travel too
    assert forward_follows  # bf16 working weights refreshed from the restored fp32 ones
    if not _one_form(one_rank_stage, two_rank_stage, one_rank_precision, two_rank_precision):
        # The first steps ran in the other precision (or bf16's other form), which Adam's
        # sign-like update carries to 0.2 apart from an uninterrupted run (0.05 between bf16
        # weights and autocast): no reference; the state above is the check.
        assert all(torch.isfinite(w).all() for w in weights.values())
        return
    reference = out[(case, "reference", world)]
    tolerance = TOLERANCE[one_rank_precision, optimizer]
    for name, value in reference.items():
        assert torch.allclose(weights[name], value, rtol=0, atol=tolerance), name


def test_deepspeed_bf16_without_zero_is_refused_both_ways_saying_what_to_do(runs):
    into_bf16, from_bf16 = runs[1]["refusals"]
    assert "drop --zero-stage 0" in into_bf16 and "--precision fp32" in into_bf16
    assert "older clipzero" in from_bf16 and "start it again" in from_bf16


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_evaluation_reads_the_fp32_weights_of_a_bf16_zero_checkpoint(runs, stage):
    from engine.eval.load_run import module_state

    root, out = runs
    case = root / f"{stage}-{stage}-adamw-bf16-bf16"
    state = module_state(case / "from2" / "step00000003")
    for name, fp32 in out[(str(case), "saved", 2)].items():
        assert state[name].dtype == torch.float32 and torch.equal(state[name], fp32), name
    assert state["calls"].tolist() == [SAVED_AT] * 3
