"""One rank in fp32 trains without ZeRO (engine/plan/memory.py), and two things DeepSpeed does
there are changed:
- a step with a non-finite gradient is skipped as ZeRO skips it (engine/train/nonfinite.py):
  the weights, optimizer state and LR stay where they were, the engine counts it, and the finite
  steps around it are exactly the plain optimizer's;
- the all-reduce over a group of one is left out (engine/dist.skip_reduction_alone), which
  changes no bit of the training.
And a run of one rank checkpointed at ZeRO-1 (the plan before) resumes without ZeRO."""
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from engine.dist import close_distributed, free_port

STEPS, POISONED = 6, {2, 3}


def _engine(stage: int, guarded: bool):
    import deepspeed

    from engine.train.nonfinite import SkipNonFinite
    from engine.train.optim import param_groups
    from engine.train.schedule import warmup_cosine

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.ReLU(), nn.Linear(7, 3))
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay=0.1), lr=0.05, fused=True)
    optimizer = SkipNonFinite(optimizer) if guarded else optimizer
    scheduler = warmup_cosine(optimizer, lr=0.05, min_lr=0.0, warmup_steps=2, total_steps=STEPS)
    config = {"train_batch_size": 4, "gradient_clipping": 1.0, "zero_optimization": {"stage": stage},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    return engine


def _run(engine, poisoned: set[int] = frozenset(), steps=range(STEPS)):
    """Train `steps`, the loss of the `poisoned` ones multiplied by NaN; the weights, LR and
    skipped count after each step."""
    trace = []
    for step in steps:
        x = torch.randn(4, 5, generator=torch.Generator().manual_seed(step))
        loss = engine(x).pow(2).mean()
        engine.backward(loss * float("nan") if step in poisoned else loss)
        engine.step()
        weights = [p.detach().clone() for p in engine.module.parameters()]
        trace.append((weights, engine.get_lr()[0], engine.skipped_steps))
    return trace


def _worker(_, port, root, out):
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    out["guarded"] = _run(_engine(0, guarded=True), POISONED)
    out["clean"] = _run(_engine(0, guarded=True), set())
    out["unguarded"] = _run(_engine(0, guarded=False), POISONED)
    out["zero1"] = _run(_engine(1, guarded=False), POISONED)

    from engine.dist import skip_reduction_alone

    for name, stage, skip in (("reduced", 0, False), ("alone", 0, True), ("zero1", 1, True)):
        engine = _engine(stage, guarded=stage == 0)
        if skip:
            skip_reduction_alone(engine)
        calls = _count_calls(engine, "allreduce_gradients")
        out[f"reduction-{name}"] = (_run(engine), len(calls), engine.enable_backward_allreduce)

    from engine.train import checkpoint

    before = _engine(1, guarded=False)
    _run(before, steps=range(3))
    checkpoint.save(before, Path(root) / "zero1", 3, {"loader": {"at": 3}})
    uninterrupted = _run(before, steps=range(3, STEPS))
    after = _engine(0, guarded=True)
    skip_reduction_alone(after)
    restored = checkpoint.load(after, Path(root) / "zero1")
    out["zero1-to-none"] = (restored.step, restored.rank_state, _run(after, steps=range(3, STEPS)), uninterrupted)
    close_distributed()


def _count_calls(engine, method: str) -> list:
    """A list that grows by one at each call of engine.<method>."""
    calls, original = [], getattr(engine, method)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    setattr(engine, method, counted)
    return calls


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    runs = mp.Manager().dict()
    mp.spawn(_worker, args=(free_port(), str(tmp_path_factory.mktemp("one-rank")), runs), nprocs=1)
    return dict(runs)


def test_a_non_finite_step_is_skipped_without_zero_as_under_zero(out):
    guarded, clean, unguarded, zero1 = out["guarded"], out["clean"], out["unguarded"], out["zero1"]
    # DeepSpeed alone, without ZeRO, lets NaN into the weights: the reason for the wrapper.
    assert any(not torch.isfinite(w).all() for w in unguarded[2][0])
    assert [skipped for _, _, skipped in guarded] == [0, 0, 1, 2, 2, 2]
    assert [skipped for _, _, skipped in guarded] == [skipped for _, _, skipped in zero1]
    # A skipped step changes nothing: weights and LR stay as after step 1.
    for step in (2, 3):
        assert guarded[step][1] == guarded[1][1]
        for got, want in zip(guarded[step][0], guarded[1][0]):
            assert torch.equal(got, want)
    # Finite steps are the plain optimizer's: before the NaNs exactly as a clean run, and after
    # them as ZeRO-1's run of the same steps (same LR schedule position, same Adam state).
    for got, want in zip(guarded[1][0], clean[1][0]):
        assert torch.equal(got, want)
    assert [lr for _, lr, _ in guarded] == [lr for _, lr, _ in zero1]
    for got, want in zip(guarded[-1][0], zero1[-1][0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_one_rank_without_zero_skips_the_all_reduce_and_trains_the_same_bits(out):
    (reduced, reduced_calls, _), (alone, alone_calls, _) = out["reduction-reduced"], out["reduction-alone"]
    assert reduced_calls == STEPS and alone_calls == 0
    for (got, _, _), (want, _, _) in zip(alone, reduced):
        for a, b in zip(got, want):
            assert torch.equal(a, b)
    assert out["reduction-zero1"][2] is True  # ZeRO reduces its own way: left as it is


def test_a_one_rank_zero1_checkpoint_resumes_without_zero(out):
    step, rank_state, resumed, uninterrupted = out["zero1-to-none"]
    assert step == 3 and rank_state == {"loader": {"at": 3}}
    for (got, got_lr, _), (want, want_lr, _) in zip(resumed, uninterrupted):
        assert got_lr == want_lr
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
