"""One optimizer step of gradient accumulation that keeps the global-batch loss (GradCache,
Gao et al. 2021).

Plain accumulation contrasts each micro-batch only against itself (times the ranks), so a
global batch of B split into k micro-batches trains on a B/k-sized contrastive problem.
Here, for an objective whose loss needs only per-sample embeddings (`feature_cache`):

1. every micro-batch of the step runs forward without gradients, keeping its embeddings and
   the RNG state it started from (so that step 3 sees the same dropout draws);
2. the step's embeddings, gathered from every rank, give the loss of the whole global batch
   and, by a backward that stops at the embeddings, d loss / d embedding for this rank's rows
   and d loss / d temperature;
3. each micro-batch runs forward again, with gradients, from its saved RNG state, and
   backpropagates those cached gradients (the surrogate sum(embedding * cached gradient)),
   accumulating in DeepSpeed as usual.

The parameter gradients then equal one step on the whole global batch, at the memory of one
micro-batch plus the step's embeddings, for one extra forward per micro-batch. Across ranks
the loss is this rank's rows against every rank's columns, and the gather's backward sums the
column gradients back to their rank, exactly as in the objective's own forward: DeepSpeed's
average over ranks is then the global batch's gradient.
"""
import torch

from engine import dist


def accumulate_step(engine, micro_batches: list[dict]) -> dict[str, torch.Tensor]:
    """Train one optimizer step on `micro_batches` (this rank's share of the global batch, in
    the order the loader gave it); return the step's named losses on the global batch."""
    task, device = engine.module, engine.device
    # 1. Embeddings without gradients. BatchNorm updates its running statistics on this pass
    # too: put them back, so that each micro-batch updates them once, as in plain accumulation.
    rng_states, parts = [], []
    buffers = [b.clone() for b in task.buffers()]
    with torch.no_grad():
        for batch in micro_batches:
            rng_states.append(_rng_state(device))
            embeddings, scale = engine(batch, embed_only=True)
            parts.append(embeddings)
    with torch.no_grad():
        for buffer, saved in zip(task.buffers(), buffers):
            buffer.copy_(saved)
    after = _rng_state(device)

    # 2. The global-batch loss from leaf embeddings; its backward stops at them.
    local = {name: torch.cat([p[name] for p in parts]).requires_grad_() for name in parts[0]}
    scale = scale.detach().requires_grad_()
    gathered = {name: dist.all_gather_with_grad(x) for name, x in local.items()}
    rows = next(iter(local.values())).shape[0]
    losses = task.loss_from_embeddings(local, gathered, dist.rank() * rows, scale)
    losses["loss"].backward()
    sizes = [next(iter(p.values())).shape[0] for p in parts]
    cached = {name: x.grad.split(sizes) for name, x in local.items()}

    # 3. Recompute each micro-batch with gradients and push the cached gradients through it.
    # engine.backward divides by the accumulation steps: multiply back, since the cached
    # gradients are already those of the whole step's loss.
    for i, batch in enumerate(micro_batches):
        _set_rng_state(rng_states[i], device)
        embeddings, step_scale = engine(batch, embed_only=True)
        surrogate = sum((x * cached[name][i]).sum() for name, x in embeddings.items())
        if i == 0:  # the temperature's gradient, once per step
            surrogate = surrogate + step_scale * scale.grad
        engine.backward(surrogate * len(micro_batches))
        engine.step()  # steps the optimizer at the accumulation boundary
    _set_rng_state(after, device)
    return {name: value.detach() for name, value in losses.items()}


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple, device: torch.device) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)
