"""Activation checkpointing under real DeepSpeed (CPU accelerator, gloo, 2 ranks): the losses of a
few steps with the towers checkpointed equal those without, to 1e-5, at ZeRO 0, 1, 2 and 3 with one
micro-batch per step, and with GradCache's accumulation (2 micro-batches per step) at ZeRO 3, where
the recompute in the backward must gather the partitioned weights again and GradCache's first pass
runs without gradients. Both sides are built as the training run builds them (engine/training_run.py),
from the plan's decisions and its DeepSpeed config, with the same seed and batches."""
import os

import pytest
import torch
import torch.multiprocessing as mp

from benchmarks.step_gpu import synthetic_batch
from engine.dist import free_port
from engine.plan.dials import Dials
from engine.plan.hardware import Hardware
from test_plan import plan_for

SOT, EOT = 49406, 49407
STEPS, GLOBAL_BATCH, WORLD = 3, 8, 2
TWO_CPU_RANKS = Hardware("cpu", "cpu", 8 * 2**30, None, None, world_size=WORLD, local_world_size=WORLD,
                         nodes=1, cpus_per_node=2)
# (ZeRO stage, micro-batch per rank): 4 is the whole per-rank batch, 2 makes GradCache's 2 per step.
CASES = [(0, 4), (1, 4), (2, 4), (3, 4), (3, 2)]


def _plan(stage: int, micro: int, side: str):
    dials = Dials(model="debug", zero_stage=stage, global_batch=GLOBAL_BATCH, micro_batch=micro, steps=STEPS,
                  activation_checkpointing=side)
    return plan_for(TWO_CPU_RANKS, dials)


def _losses(plan, rank: int) -> tuple[tuple[bool, bool], list[float]]:
    """Whether each tower checkpoints, and the losses of STEPS optimizer steps of the debug towers,
    built and stepped as engine/training_run.py does."""
    import deepspeed

    from engine import dist
    from engine.model_with_loss import ModelWithLoss, align_buffer_dtypes, register_zero3_external_parameters
    from engine.models.two_tower import TwoTower
    from engine.objectives.method import lookup
    from engine.plan.deepspeed_config import render
    from engine.train.optim import optimizer_for_plan
    from engine.train.step import make_step

    method = lookup(plan.method, plan.model)
    torch.manual_seed(plan.seed)
    model = TwoTower(method.preset, EOT, SOT, activation_checkpointing=plan.activation_checkpointing)
    task = ModelWithLoss(model, method.build_objective(model, dict(plan.objective_options), plan.seed))
    engine, *_ = deepspeed.initialize(model=task, optimizer=optimizer_for_plan(task, plan), config=render(plan))
    align_buffer_dtypes(engine.module)
    dist.skip_reduction_alone(engine)
    if plan.zero_stage == 3:
        register_zero3_external_parameters(engine.module)
    checkpointing = (model.image.trunk.grad_checkpointing, model.text.transformer.is_gradient_checkpointing)
    step, losses = make_step(plan.accumulation), []
    for i in range(STEPS):
        torch.manual_seed(100 * i + rank)  # this rank's batch of step i, the same on both sides
        batch = synthetic_batch(task.objective, GLOBAL_BATCH // WORLD, method.preset.image_size,
                                method.preset.context_length, "cpu")
        micro_batches = [dict(zip(batch, parts)) for parts in zip(*(v.split(plan.micro_batch) for v in batch.values()))]
        torch.manual_seed(7 + i)  # the step's own draws (dropout, augmentation-free here)
        losses.append(float(step(engine, micro_batches)["loss"]))
    return checkpointing, losses


def _worker(rank, port, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from engine import dist

    torch.set_num_threads(1)
    dist.init_distributed(timeout_s=120)
    for stage, micro in CASES:
        for side in ("off", "on"):
            plan = _plan(stage, micro, side)
            checkpointing, losses = _losses(plan, rank)
            if rank == 0:
                out[(stage, micro, side)] = (plan.activation_checkpointing, plan.accumulation, losses, checkpointing)
    dist.close_distributed()


@pytest.fixture(scope="module")
def runs():
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(free_port(), out), nprocs=WORLD)
    return dict(out)


@pytest.mark.parametrize("stage, micro", CASES, ids=[f"zero{s}-{'gradcache' if m == 2 else 'one-micro-batch'}"
                                                     for s, m in CASES])
def test_losses_with_and_without_checkpointing_are_equal(runs, stage, micro):
    off, on = runs[(stage, micro, "off")], runs[(stage, micro, "on")]
    assert (off[0], on[0]) == (False, True)
    assert (off[3], on[3]) == ((False, False), (True, True))  # both towers follow the plan
    assert off[1] == on[1] == ("gradcache" if micro == 2 else "plain")
    assert len(on[2]) == STEPS and len(set(on[2])) == STEPS  # the weights moved between steps
    assert on[2] == pytest.approx(off[2], rel=1e-5, abs=1e-5)
