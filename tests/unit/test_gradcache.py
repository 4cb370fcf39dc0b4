"""Gradient accumulation with cached embeddings (engine/train/gradcache.py): k micro-batches
give the gradients of one step on the whole batch, in one process and over 2 gloo ranks."""
import os

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from engine.dist import free_port
from engine.models.presets import get_preset
from engine.models.two_tower import TwoTower
from engine.objectives.clip import ClipObjective
from engine.plan_methods import FEATURE_CACHE_METHODS
from engine.task import OBJECTIVES, Task, objective_class
from engine.train.gradcache import accumulate_step

SOT, EOT = 49406, 49407


class Engine:
    """What accumulate_step uses of DeepSpeed's engine: its forward, a backward that divides by
    the accumulation steps, and a step (a no-op here: the test reads the gradients)."""

    def __init__(self, task: Task, accumulation_steps: int):
        self.module, self.device, self.accumulation_steps = task, torch.device("cpu"), accumulation_steps

    def __call__(self, batch, **kwargs):
        return self.module(batch, **kwargs)

    def backward(self, loss):
        (loss / self.accumulation_steps).backward()

    def step(self):
        pass


def _task(objective=None, image_train=False) -> Task:
    torch.manual_seed(0)
    model = TwoTower(get_preset("debug"), EOT, SOT)  # fp32: the text tower's mask needs it
    model.image.train(image_train)  # eval: BatchNorm uses running statistics, not batch ones
    task = Task(model, objective or ClipObjective())
    with torch.no_grad():  # a temperature below the clamp, so that it has a gradient
        model.logit_scale.log_scale.fill_(2.0)
    return task


def _batch(n: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    context = get_preset("debug").context_length
    text = torch.randint(1, 1000, (n, context), generator=g)
    text[:, 0] = SOT
    ends = torch.randint(3, context, (n,), generator=g)
    text[torch.arange(n), ends] = EOT
    text[torch.arange(context) > ends[:, None]] = 0
    return {"image": torch.randn(n, 3, 32, 32, generator=g, dtype=torch.float32), "text": text}


def _split(batch: dict, k: int) -> list[dict]:
    return [dict(zip(batch, parts)) for parts in zip(*(v.chunk(k) for v in batch.values()))]


def _grads(task: Task) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in task.named_parameters() if p.grad is not None}


def _full_batch(batch: dict, **options):
    task = _task(**options)
    losses = task(batch)
    losses["loss"].backward()
    return losses["loss"].detach(), _grads(task)


def _assert_close(grads: dict, expected: dict, tol=1e-5):
    """Equal to fp32 rounding: within `tol` of each tensor's largest entry, or of the largest
    entry of all for a gradient that is zero but for rounding (attention's key bias)."""
    assert grads.keys() == expected.keys()
    largest = max(e.abs().max() for e in expected.values())
    for name, e in expected.items():
        assert (grads[name] - e).abs().max() <= tol * max(e.abs().max(), 1e-3 * largest), name


def test_four_cached_micro_batches_give_the_full_batch_gradients():
    batch = _batch(8, 0)
    loss, expected = _full_batch(batch)
    task = _task()
    losses = accumulate_step(Engine(task, 4), _split(batch, 4))
    assert torch.allclose(losses["loss"], loss, rtol=1e-6)
    assert "model.logit_scale.log_scale" in expected
    _assert_close(_grads(task), expected)

    # Plain accumulation contrasts each micro-batch within itself: other gradients.
    plain = _task()
    for micro in _split(batch, 4):
        (plain(micro)["loss"] / 4).backward()
    differs = [(g - expected[n]).abs().max() > 1e-2 * expected[n].abs().max()
               for n, g in _grads(plain).items()]
    assert sum(differs) > len(differs) // 2


def test_recompute_replays_each_micro_batchs_random_draws():
    class DropoutClip(ClipObjective):
        def embed(self, model, batch):
            return {k: F.normalize(F.dropout(x, 0.3), dim=-1) for k, x in super().embed(model, batch).items()}

    batch = _batch(6, 1)
    # Reference: the same forwards in the same order, with gradients, then the loss on all rows.
    reference = _task(DropoutClip())
    torch.manual_seed(5)
    parts = [reference.objective.embed(reference.model, micro) for micro in _split(batch, 3)]
    local = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    loss = reference.loss_from_embeddings(local, local, 0, reference.model.scale().float())["loss"]
    loss.backward()

    task = _task(DropoutClip())
    torch.manual_seed(5)
    losses = accumulate_step(Engine(task, 3), _split(batch, 3))
    assert torch.allclose(losses["loss"], loss.detach(), rtol=1e-6)
    _assert_close(_grads(task), _grads(reference))


def test_batchnorm_statistics_move_once_per_micro_batch():
    batch = _batch(8, 2)
    plain = _task(image_train=True)
    for micro in _split(batch, 2):
        plain(micro)
    task = _task(image_train=True)
    accumulate_step(Engine(task, 2), _split(batch, 2))
    for (name, expected), actual in zip(plain.named_buffers(), task.buffers()):
        assert torch.equal(actual, expected), name


def test_feature_cache_methods_are_those_whose_objective_has_the_form():
    assert set(FEATURE_CACHE_METHODS) == {m for m in OBJECTIVES if objective_class(m).feature_cache}


def _rank_worker(rank, world, port, batch, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", rank=rank, world_size=world)
    n = batch["text"].shape[0] // world
    mine = {k: v[rank * n:(rank + 1) * n] for k, v in batch.items()}
    task = _task()
    losses = accumulate_step(Engine(task, 2), _split(mine, 2))
    grads = _grads(task)
    for g in [*grads.values(), losses["loss"]]:  # DeepSpeed averages gradients over ranks
        torch_dist.all_reduce(g)
        g /= world
    out[rank] = (losses["loss"], grads)
    torch_dist.destroy_process_group()


def test_two_gloo_ranks_of_two_micro_batches_equal_one_process_on_the_global_batch():
    world, batch = 2, _batch(8, 3)
    manager = mp.Manager()
    out = manager.dict()
    # Forked, not spawned: the workers skip re-importing torch and the towers' libraries.
    mp.start_processes(_rank_worker, args=(world, free_port(), batch, out), nprocs=world,
                       start_method="fork")
    loss, expected = _full_batch(batch)
    for rank in range(world):
        rank_loss, grads = out[rank]
        assert torch.allclose(rank_loss, loss, rtol=1e-6)
        _assert_close(grads, expected)
