"""Lookahead: the update by hand, against a manual implementation, through state_dict, under
an LR schedule with per-group LRs, and inside DeepSpeed at ZeRO stages 0-3 (with checkpoints)."""
import copy
import io
import os

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from engine.dist import close_distributed, free_port
from engine.train.lookahead import Lookahead
from engine.train.schedule import lr_at, warmup_cosine

K, ALPHA, MOMENTUM, WEIGHT_DECAY = 5, 0.5, 0.9, 1e-4
LRS = (0.1, 0.02)
STEPS = 12


def _toy() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _groups(model: nn.Module) -> list[dict]:
    # Two groups with their own LRs, as CLIP-Lite's image tower vs the rest.
    return [{"params": list(model[0].parameters()), "lr": LRS[0], "weight_decay": WEIGHT_DECAY},
            {"params": list(model[2].parameters()), "lr": LRS[1], "weight_decay": WEIGHT_DECAY}]


def _lookahead(model: nn.Module) -> Lookahead:
    return Lookahead(torch.optim.SGD(_groups(model), momentum=MOMENTUM), k=K, alpha=ALPHA)


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)) for _ in range(STEPS)]


def _loss(model, x, y):
    return (model(x) - y).pow(2).mean()


def _train(model, optimizer, batches, scheduler=None):
    for x, y in batches:
        optimizer.zero_grad()
        _loss(model, x, y).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def _values(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_one_parameter_by_hand():
    # Loss w^2 / 2, so the gradient is w and plain SGD multiplies w by (1 - lr) = 1/2 each step.
    w = nn.Parameter(torch.tensor([1.0]))
    optimizer = Lookahead(torch.optim.SGD([w], lr=0.5), k=3, alpha=0.5)
    seen = []
    for _ in range(6):
        w.grad = w.detach().clone()
        optimizer.step()
        seen.append(w.item())
    # Steps 1-2: 0.5, 0.25. Step 3: fast 0.125, then slow = 1 + 0.5 (0.125 - 1) = 0.5625 = fast.
    # Steps 4-5: 0.28125, 0.140625. Step 6: fast 0.0703125, slow = 0.5625 + 0.5 (0.0703125 - 0.5625).
    assert seen == [0.5, 0.25, 0.5625, 0.28125, 0.140625, 0.31640625]
    assert optimizer.state[w]["lookahead_slow"].item() == 0.31640625


def test_equals_a_manual_implementation_over_12_steps():
    model, twin = _toy(), _toy()
    _train(model, _lookahead(model), _batches())

    sgd = torch.optim.SGD(_groups(twin), momentum=MOMENTUM)
    slow = _values(twin)
    for step, (x, y) in enumerate(_batches(), start=1):
        sgd.zero_grad()
        _loss(twin, x, y).backward()
        sgd.step()
        if step % K == 0:
            with torch.no_grad():
                for p, s in zip(twin.parameters(), slow):
                    # The reference's form: fast = alpha * fast + (1 - alpha) * slow.
                    p.mul_(ALPHA).add_(s, alpha=1 - ALPHA)
                    s.copy_(p)
    for ours, manual in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(ours, manual)


def test_state_dict_round_trip_mid_cycle_continues_identically():
    batches = _batches()
    model = _toy()
    optimizer = _lookahead(model)
    _train(model, optimizer, batches[:7])  # 2 steps into the second cycle of 5
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    _train(model, optimizer, batches[7:])

    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = _toy()
    resumed.load_state_dict(saved["model"])
    resumed_optimizer = _lookahead(resumed)
    resumed_optimizer.load_state_dict(saved["optimizer"])
    _train(resumed, resumed_optimizer, batches[7:])
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_a_deep_copy_steps_like_the_original():
    model = _toy()
    optimizer = _lookahead(model)
    _train(model, optimizer, _batches()[:3])
    clone = copy.deepcopy(optimizer)
    assert clone.k == K and len(clone.param_groups) == 2
    _loss(model, *_batches()[3]).backward()
    for p, q in zip(model.parameters(), (q for g in clone.param_groups for q in g["params"])):
        q.grad = p.grad.clone()
    optimizer.step()
    clone.step()
    for p, q in zip(model.parameters(), (q for g in clone.param_groups for q in g["params"])):
        assert torch.equal(p, q)


def test_the_schedule_scales_each_group_from_its_own_lr():
    model = _toy()
    optimizer = _lookahead(model)
    assert optimizer.param_groups is optimizer.optimizer.param_groups
    scheduler = warmup_cosine(optimizer, lr=LRS[0], min_lr=0.0, warmup_steps=3, total_steps=STEPS)
    for step, batch in enumerate(_batches()):
        ratio = lr_at(step, lr=LRS[0], min_lr=0.0, warmup_steps=3, total_steps=STEPS) / LRS[0]
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(
            [lr * ratio for lr in LRS], rel=1e-12)
        _train(model, optimizer, [batch], scheduler)


def test_rejects_meaningless_settings():
    sgd = torch.optim.SGD(_toy().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="k=0"):
        Lookahead(sgd, k=0)
    with pytest.raises(ValueError, match="alpha=0"):
        Lookahead(sgd, alpha=0.0)


def _ds_config(stage: int) -> dict:
    zero = {"stage": stage}
    if stage == 3:
        # Several sub-groups per group: ZeRO-3 then calls step() once per sub-group, which the
        # per-parameter k-count must not mistake for several steps.
        zero["sub_group_size"] = 40
    return {"train_batch_size": 8, "gradient_clipping": 0.0, "zero_optimization": zero,
            # Lookahead is not on DeepSpeed's list of ZeRO-tested optimizers.
            "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}


def _engine(stage: int):
    import deepspeed

    model = _toy()
    optimizer = _lookahead(model)
    scheduler = warmup_cosine(optimizer, lr=LRS[0], min_lr=0.0, warmup_steps=3, total_steps=STEPS)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                      config=_ds_config(stage))
    return engine


def _ds_train(engine, batches):
    for x, y in batches:
        loss = _loss(engine, x, y)
        engine.backward(loss)
        engine.step()


def _ds_values(engine) -> list[torch.Tensor]:
    import deepspeed

    params = list(engine.module.parameters())
    # ZeRO-3 holds each parameter partitioned; gather to read it (a no-op at other stages).
    with deepspeed.zero.GatheredParameters(params):
        return [p.detach().clone() for p in params]


def _ds_worker(_, port, ckpt_dir, out):
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    batches = _batches()
    for stage in (0, 1, 2, 3):
        engine = _engine(stage)
        _ds_train(engine, batches[:7])
        engine.save_checkpoint(ckpt_dir, tag=f"stage{stage}")
        _ds_train(engine, batches[7:])
        lrs = [g["lr"] for g in engine.optimizer.param_groups]
        resumed = _engine(stage)
        resumed.load_checkpoint(ckpt_dir, tag=f"stage{stage}")
        _ds_train(resumed, batches[7:])
        out[stage] = (_ds_values(engine), _ds_values(resumed), lrs)
    close_distributed()


def test_deepspeed_zero_stages_match_plain_training_and_resume_mid_cycle(tmp_path):
    model = _toy()
    optimizer = _lookahead(model)
    scheduler = warmup_cosine(optimizer, lr=LRS[0], min_lr=0.0, warmup_steps=3, total_steps=STEPS)
    _train(model, optimizer, _batches(), scheduler)
    expected = _values(model)
    expected_lrs = [g["lr"] for g in optimizer.param_groups]

    out = mp.Manager().dict()
    mp.spawn(_ds_worker, args=(free_port(), str(tmp_path), out), nprocs=1)
    for stage in (0, 1, 2, 3):
        trained, resumed, lrs = out[stage]
        assert lrs == pytest.approx(expected_lrs, rel=1e-12), f"stage {stage}"
        for got, want in zip(trained, expected):
            torch.testing.assert_close(got, want, msg=lambda m: f"stage {stage}: {m}")
        # Resumed from step 7 (mid-cycle): the slow weights and counts came back with it.
        for got, want in zip(resumed, trained):
            assert torch.equal(got, want), f"stage {stage}: resumed run differs"
