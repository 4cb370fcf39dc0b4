"""Activation checkpointing of the towers: each block keeps only its input through the forward
and runs again in the backward, trading one more forward of the towers for most of their
activation memory (benchmarks/activation_checkpointing.py measures both).

Both libraries' non-reentrant form is used: it recomputes inside the backward through ordinary
module calls, so ZeRO-3's hooks gather a block's parameters again for the recompute, and it
needs no input that requires gradients (token ids and images do not). Each block's recompute
replays the RNG state of its first forward (torch.utils.checkpoint's default), so dropout and
stochastic depth draw the same masks twice.
"""
import torch
from torch import nn


def checkpoint_image_trunk(trunk: nn.Module, enabled: bool) -> None:
    """timm's own checkpointing of its blocks (ViT: per block; ResNet and ByobNet: per stage)."""
    trunk.set_grad_checkpointing(enabled)
    for module in trunk.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            _guard_batchnorm(module, enabled)


def checkpoint_text_transformer(transformer: nn.Module, enabled: bool) -> None:
    """transformers' checkpointing of each encoder layer (CLIP's text model, BERT); active in
    training mode only, as timm's is wherever gradients are recorded."""
    if enabled:
        transformer.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        transformer.gradient_checkpointing_disable()


def _in_backward() -> bool:
    # -1 outside a backward pass: a module called inside one is a checkpoint's recompute.
    return torch._C._current_graph_task_id() != -1


def _guard_batchnorm(bn: nn.modules.batchnorm._BatchNorm, enabled: bool) -> None:
    """A recompute calls BatchNorm a second time in training mode, which would move its running
    statistics twice per forward (and count the batch twice). In the recompute its momentum is
    0 (the statistics stay as they are) and the count is put back; the output, normalised by
    the batch's own statistics, is the first call's."""
    for handle in getattr(bn, "_recompute_guard", ()):
        handle.remove()
    bn._recompute_guard = ()
    if not enabled:
        return

    def before(module, inputs):
        if module.training and _in_backward():
            module._momentum_outside_recompute = module.momentum
            module.momentum = 0.0

    def after(module, inputs, output):
        if hasattr(module, "_momentum_outside_recompute"):
            module.momentum = module.__dict__.pop("_momentum_outside_recompute")
            if module.num_batches_tracked is not None:
                module.num_batches_tracked.sub_(1)

    bn._recompute_guard = (bn.register_forward_pre_hook(before), bn.register_forward_hook(after))
