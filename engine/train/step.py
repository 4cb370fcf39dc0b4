"""One optimizer step, in the two ways a step's micro-batches can accumulate, side by side.

Both have one signature, `Step`:

    step(engine, micro_batches) -> the step's named losses (detached, on the device)

`micro_batches` yields this rank's k micro-batches of the global batch (k: DeepSpeed's
gradient_accumulation_steps), on the device, in the order the loader gave them. Each step runs
every forward and backward of its micro-batches and the optimizer step at the accumulation
boundary (DeepSpeed's `engine.step()` steps the optimizer on the k-th call). `make_step` picks
one, once, from the plan's `accumulation` (engine/plan/objective_options.py decides it).

plain_step: each micro-batch's loss on its own, backpropagated in turn, as DeepSpeed's own
accumulation does. The gradients are those of the mean of k losses, each contrasting B/k
pairs (times the ranks) only among themselves.

gradcache_step: the same parameter gradients as one step on the whole global batch (GradCache,
Gao et al. 2021). Plain accumulation contrasts each micro-batch only against itself, so a
global batch of B split into k micro-batches trains on a B/k-sized contrastive problem. Here,
with the objective's loss split as engine/objectives/base.py describes (embeddings and batch
terms from `embed`, cross terms from `loss_from_embeddings`):

1. every micro-batch of the step runs forward without gradients, keeping its embeddings and
   the RNG state it started from (so that step 3 sees the same dropout and prior draws);
2. the cross terms of the whole step's embeddings (this rank's rows; the objective gathers
   the other ranks') and a backward that stops at the embeddings give d loss / d embedding
   for this rank's rows and d loss / d temperature. DeCLIP's queue is read and filled here,
   once per step;
3. each micro-batch runs forward again, with gradients, from its saved RNG state, and
   backpropagates those cached gradients (the surrogate sum(embedding * cached gradient))
   together with its own batch terms (SimSiam, MLM, a prior), accumulating in DeepSpeed.

The parameter gradients then equal one step whose cross terms span the whole global batch
and whose batch terms are the mean over micro-batches (as in plain accumulation), at the
memory of one micro-batch plus the step's embeddings, for one extra forward per micro-batch.
Across ranks, the gather's backward sums the column gradients back to their rank, exactly as
in the objective's own forward: DeepSpeed's average over ranks is the global batch's gradient.
With one micro-batch per step both give the same gradients; the planner then chooses plain.
"""
from typing import Callable, Iterable

import torch

Step = Callable[[object, Iterable[dict]], dict[str, torch.Tensor]]


def make_step(accumulation: str) -> Step:
    """The step for the plan's `accumulation` ("plain" or "gradcache", engine/plan/dials.py)."""
    steps = {"plain": plain_step, "gradcache": gradcache_step}
    if accumulation not in steps:
        raise ValueError(f"accumulation {accumulation!r} is not one of {', '.join(steps)}")
    return steps[accumulation]


def plain_step(engine, micro_batches: Iterable[dict]) -> dict[str, torch.Tensor]:
    """Each micro-batch's loss backpropagated on its own (one micro-batch in memory at a
    time); returns their mean."""
    k = engine.gradient_accumulation_steps()
    step_losses: dict[str, torch.Tensor] = {}
    for batch in micro_batches:
        losses = engine(batch)
        engine.backward(losses["loss"])  # DeepSpeed divides by k itself
        engine.step()                    # steps the optimizer at the accumulation boundary
        for name, value in losses.items():
            share = value.detach() / k
            step_losses[name] = step_losses[name] + share if name in step_losses else share
    return step_losses


def gradcache_step(engine, micro_batches: Iterable[dict]) -> dict[str, torch.Tensor]:
    """The cross terms over all of `micro_batches` at once, by GradCache (the module's
    docstring); returns the step's named losses."""
    micro_batches = list(micro_batches)  # all k are read twice: once without gradients, once with
    task, device, k = engine.module, engine.device, len(micro_batches)
    # 1. Embeddings without gradients. The whole embed runs (batch terms included) so that
    # ZeRO-3 sees the same modules in the same order in both passes. BatchNorm updates its
    # running statistics on this pass too: put them back, so that each micro-batch updates
    # them once, as in plain accumulation.
    rng_states, parts = [], []
    buffers = [b.clone() for b in task.buffers()]
    with torch.no_grad():
        for batch in micro_batches:
            rng_states.append(_rng_state(device))
            embeddings, _, scale = engine(batch, embed_only=True)
            parts.append(embeddings)
        for buffer, saved in zip(task.buffers(), buffers):
            buffer.copy_(saved)
    after = _rng_state(device)

    # 2. The cross terms from leaf embeddings; their backward stops at them. This backward runs
    # outside DeepSpeed's loss scale, so fp16 leaves are fp32: the cached gradients are small
    # enough to fall into fp16's subnormals (the objectives compute fp16 rows in fp32 anyway).
    local = {name: _leaf(torch.cat([p[name] for p in parts])) for name in parts[0]}
    scale = scale.detach().requires_grad_()
    cross = task.objective.loss_from_embeddings(local, scale)
    task.weighted(cross).backward()
    sizes = [next(iter(p.values())).shape[0] for p in parts]
    cached = {name: x.grad.split(sizes) for name, x in local.items()}

    # 3. Recompute each micro-batch with gradients; push the cached gradients through it with
    # its batch terms. engine.backward divides by k: the cached gradients are already those of
    # the whole step's loss, so they are multiplied back; each batch term's 1/k makes the mean.
    batch_means: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(micro_batches):
        _set_rng_state(rng_states[i], device)
        embeddings, batch_terms, step_scale = engine(batch, embed_only=True)
        surrogate = sum((x * cached[name][i]).sum() for name, x in embeddings.items())
        if i == 0 and scale.grad is not None:  # the temperature's gradient, once per step
            surrogate = surrogate + step_scale * scale.grad
        engine.backward(surrogate * k + task.weighted(batch_terms))
        engine.step()  # steps the optimizer at the accumulation boundary
        for name, value in batch_terms.items():
            batch_means[name] = batch_means.get(name, 0) + value.detach() / k
    _set_rng_state(after, device)
    return {name: value.detach() for name, value in task.named({**cross, **batch_means}, scale).items()}


def _leaf(embeddings: torch.Tensor) -> torch.Tensor:
    return (embeddings.float() if embeddings.dtype == torch.float16 else embeddings).requires_grad_()


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple, device: torch.device) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)
