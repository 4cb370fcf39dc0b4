"""GradCache accumulation (engine/train/step.py), for every method:
k micro-batches give the gradients of one step on the whole batch where the objective's terms
allow it (CLIP; DeCLIP's clip and nn; CLIP-Lite's JSD), in one process and over 2 gloo ranks;
batch terms (SimSiam, MLM, the prior) are the mean over micro-batches; random draws replay."""
import os

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from benchmarks.accumulation import Engine  # DeepSpeed engine's accumulation interface, no optimizer
from engine.data.mlm import MASK_ID, VOCAB_WITH_MASK, mask_tokens
from engine.dist import free_port
from engine.objectives.method import lookup
from engine.models.two_tower import TwoTower
from engine.objectives.clip import ClipObjective
from engine.objectives.clip_lite import ClipLiteObjective
from engine.objectives.declip import DeclipObjective
from engine.objectives.siglip import SiglipObjective
from engine.model_with_loss import ModelWithLoss
from engine.train.step import gradcache_step as accumulate_step

SOT, EOT = 49406, 49407
METHODS = ("clip", "declip", "clip-lite", "siglip")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors gain nothing from intra-op threads on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _objective(method: str, model: TwoTower, batch_terms: bool) -> nn.Module:
    """The method's objective; without `batch_terms`, only the terms that compare samples
    count (DeCLIP's SimSiam and MLM weighted 0, CLIP-Lite's prior off)."""
    if method == "clip":
        return ClipObjective()
    if method == "siglip":
        # At its initial bias (-10) the negatives carry e^-10 of the gradient, so plain and
        # cached accumulation would agree anyway; at 0 the comparisons across micro-batches count.
        objective = SiglipObjective(model)
        objective.bias.data.fill_(0.0)
        return objective
    if method == "clip-lite":
        return ClipLiteObjective(model, negatives="global", prior="cooperative" if batch_terms else "off")
    objective = DeclipObjective(model, queue_size=24, seed=3)
    if not batch_terms:
        objective.weights = {**objective.weights, "simsiam": 0.0, "mlm": 0.0}
    return objective


def _task(method="clip", towers_train=False, batch_terms=True) -> ModelWithLoss:
    """fp32 debug towers. Unless `towers_train`, their BatchNorm runs on statistics calibrated
    on one batch (so every sample is computed on its own, yet samples differ), no dropout."""
    torch.manual_seed(0)
    model = TwoTower(lookup(method, "debug").preset, EOT, SOT)
    if not towers_train:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = None  # running statistics = the average over the batches seen
        calibration = _batch(method, 32, 99)
        with torch.no_grad():
            model.image_outputs(calibration["image"])
            model.text_outputs(calibration["text"])
        model.eval()  # the towers only: the objective's heads keep batch statistics
    task = ModelWithLoss(model, _objective(method, model, batch_terms))
    with torch.no_grad():  # a temperature below CLIP's clamp, so that it has a gradient
        model.logit_scale.log_scale.fill_(2.0)
    return task


def _batch(method: str, n: int, seed: int) -> dict:
    """Token rows framed as the tokenizer frames them, 32 px images; DeCLIP's second views."""
    g = torch.Generator().manual_seed(seed)
    context = lookup(method, "debug").preset.context_length
    text = torch.zeros(n, context, dtype=torch.long)
    for row in range(n):
        length = int(torch.randint(2, context - 2, (1,), generator=g))
        text[row, 0], text[row, length + 1] = SOT, EOT
        text[row, 1:length + 1] = torch.randint(1, 49000, (length,), generator=g)
    batch = {"image": torch.randn(n, 3, 32, 32, generator=g), "text": text}
    if method == "declip":
        text_aug = text.clone()
        text_aug[:, 1] = torch.randint(1, 49000, (n,), generator=g)
        masked, labels = mask_tokens(text, generator=g, vocab_size=VOCAB_WITH_MASK, mask_id=MASK_ID,
                                     special_ids=(SOT, EOT))
        batch.update(image2=torch.randn(n, 3, 32, 32, generator=g), text=masked,
                     mlm_labels=labels, text_aug=text_aug)
    return batch


def _split(batch: dict, k: int) -> list[dict]:
    return [dict(zip(batch, parts)) for parts in zip(*(v.chunk(k) for v in batch.values()))]


def _grads(task: ModelWithLoss) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in task.named_parameters() if p.grad is not None}


def _queue(task: ModelWithLoss):
    return getattr(task.objective, "queue", None)


def _full_batch(method: str, batch: dict):
    task = _task(method, batch_terms=False)
    losses = task(batch)
    losses["loss"].backward()
    return losses["loss"].detach(), _grads(task), _queue(task)


def _assert_close(grads: dict, expected: dict, tol=5e-5):
    """Equal to fp32 rounding: within `tol` of each tensor's largest entry, or of the largest
    entry of all for a gradient that is zero but for rounding (attention's key bias). The
    ResNet's sums in another order reach 1.1e-5; a wrong gradient is off by 1e-3 and more."""
    assert grads.keys() == expected.keys()
    largest = max(e.abs().max() for e in expected.values())
    for name, e in expected.items():
        assert (grads[name] - e).abs().max() <= tol * max(e.abs().max(), 1e-3 * largest), name


@pytest.mark.parametrize("method", METHODS)
def test_four_cached_micro_batches_give_the_full_batch_gradients(method):
    batch = _batch(method, 8, 0)
    loss, expected, queue = _full_batch(method, batch)
    task = _task(method, batch_terms=False)
    losses = accumulate_step(Engine(task, 4), _split(batch, 4))
    assert torch.allclose(losses["loss"], loss, rtol=1e-6)
    assert "model.logit_scale.log_scale" in expected
    _assert_close(_grads(task), expected)
    if method == "declip":  # the step's captions enqueued once, in the full batch's order
        assert task.objective.pointer == 16
        assert torch.allclose(_queue(task), queue, atol=1e-6)

    # Plain accumulation compares each micro-batch's samples only with each other: other gradients.
    plain = _task(method, batch_terms=False)
    for micro in _split(batch, 4):
        (plain(micro)["loss"] / 4).backward()
    differs = [(g - expected[n]).abs().max() > 1e-2 * expected[n].abs().max()
               for n, g in _grads(plain).items() if n.startswith("model.")]
    assert sum(differs) > len(differs) // 2


@pytest.mark.parametrize("method", ["declip", "clip-lite"])
def test_batch_terms_are_the_mean_over_micro_batches_with_replayed_draws(method):
    """Against the definition, by plain autograd: each micro-batch's embed once, with its
    graph kept; cross terms on all rows; batch terms averaged; one backward."""
    batch = _batch(method, 6, 1)
    reference = _task(method)
    torch.manual_seed(5)  # CLIP-Lite's prior draws its uniform samples from it
    parts = [reference.objective.embed(reference.model, micro) for micro in _split(batch, 3)]
    local = {k: torch.cat([p[0][k] for p in parts]) for k in parts[0][0]}
    terms = reference.objective.loss_from_embeddings(local, reference.model.scale().float())
    terms.update({name: sum(p[1][name] for p in parts) / 3 for name in parts[0][1]})
    expected = reference.named(terms, reference.model.scale())
    expected["loss"].backward()

    task = _task(method)
    torch.manual_seed(5)
    losses = accumulate_step(Engine(task, 3), _split(batch, 3))
    assert losses.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.allclose(losses[name], value.detach(), rtol=1e-5, atol=1e-7), name
    _assert_close(_grads(task), _grads(reference))
    assert any(name.startswith("objective.") for name in _grads(task))  # the heads learn too
    if method == "declip":
        assert torch.allclose(_queue(task), _queue(reference), atol=1e-6)


def test_recompute_replays_the_random_draws_inside_the_embeddings():
    class DropoutClip(ClipObjective):
        def embed(self, model, batch):
            embeddings, terms = super().embed(model, batch)
            return {k: F.normalize(F.dropout(x, 0.3), dim=-1) for k, x in embeddings.items()}, terms

    batch = _batch("clip", 6, 1)
    # Reference: the same forwards in the same order, with gradients, then the loss on all rows.
    reference = _task()
    reference.objective = DropoutClip()
    torch.manual_seed(5)
    parts = [reference.objective.embed(reference.model, micro)[0] for micro in _split(batch, 3)]
    local = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    loss = reference.objective.loss_from_embeddings(local, reference.model.scale().float())["clip"]
    loss.backward()

    task = _task()
    task.objective = DropoutClip()
    torch.manual_seed(5)
    losses = accumulate_step(Engine(task, 3), _split(batch, 3))
    assert torch.allclose(losses["loss"], loss.detach(), rtol=1e-6)
    _assert_close(_grads(task), _grads(reference))


@pytest.mark.parametrize("method", ["clip", "declip"])
def test_batchnorm_statistics_move_once_per_micro_batch(method):
    batch = _batch(method, 8, 2)
    plain = _task(method, towers_train=True)
    for micro in _split(batch, 2):
        plain(micro)
    task = _task(method, towers_train=True)
    accumulate_step(Engine(task, 2), _split(batch, 2))
    for (name, expected), actual in zip(plain.named_buffers(), task.buffers()):
        assert torch.equal(actual, expected), name


def _rank_worker(rank, world, port, batches, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", rank=rank, world_size=world)
    for method, batch in batches.items():
        n = batch["text"].shape[0] // world
        mine = {k: v[rank * n:(rank + 1) * n] for k, v in batch.items()}
        task = _task(method, batch_terms=False)
        losses = accumulate_step(Engine(task, 2), _split(mine, 2))
        grads = _grads(task)
        for g in [*grads.values(), losses["loss"]]:  # DeepSpeed averages gradients over ranks
            torch_dist.all_reduce(g)
            g /= world
        out[(method, rank)] = (losses["loss"], grads, _queue(task))
    torch_dist.destroy_process_group()


def test_two_gloo_ranks_of_two_micro_batches_equal_one_process_on_the_global_batch():
    """DeCLIP with its global enqueue, CLIP-Lite with global negatives."""
    world = 2
    batches = {method: _batch(method, 8, 3) for method in METHODS}
    manager = mp.Manager()
    out = manager.dict()
    # Forked, not spawned: the workers skip re-importing torch and the towers' libraries.
    mp.start_processes(_rank_worker, args=(world, free_port(), batches, out), nprocs=world,
                       start_method="fork")
    for method, batch in batches.items():
        loss, expected, queue = _full_batch(method, batch)
        for rank in range(world):
            rank_loss, grads, rank_queue = out[(method, rank)]
            assert torch.allclose(rank_loss, loss, rtol=1e-6), method
            _assert_close(grads, expected)
            if queue is not None:
                assert torch.allclose(rank_queue, queue, atol=1e-6)


@pytest.mark.parametrize("method", ["clip", "declip", "clip-lite"])
def test_the_accumulation_benchmark_builds_each_method(method):
    # benchmarks/accumulation.py builds its tasks from the planner's recipes: a renamed recipe
    # field must fail here, not only when someone runs the benchmark.
    from benchmarks.accumulation import build_task

    task, batch = build_task(method, "debug", 4)
    loss = task(batch)["loss"]
    assert torch.isfinite(loss)


def test_fp16_embeddings_get_their_cached_gradients_in_fp32():
    """The cross terms' backward runs outside DeepSpeed's loss scale: fp16 leaves would round the
    cached gradients (to fp16's subnormals, at large batches); the leaves are fp32 instead, so the
    cached gradients are those of the fp32 loss on the same fp16 embeddings, bit for bit."""
    from engine.train.step import _leaf

    torch.manual_seed(0)
    image, text = (F.normalize(torch.randn(1024, 32), dim=-1).half() for _ in range(2))
    scale = torch.tensor(100.0)

    def cached(leaf):
        local = {"image": leaf(image), "text": leaf(text)}
        sum(ClipObjective().loss_from_embeddings(local, scale).values()).backward()
        return local["image"].grad

    leaves = cached(_leaf)
    assert leaves.dtype == torch.float32
    assert torch.equal(leaves, cached(lambda x: x.float().requires_grad_()))
    # An fp16 leaf rounds them: what the fp32 leaf avoids.
    assert not torch.equal(cached(lambda x: x.clone().requires_grad_()).float(), leaves)
