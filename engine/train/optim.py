"""Parameter groups and the optimizer implementation the plan chose."""
import torch
from torch import nn


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """open_clip's rule: no weight decay on tensors with fewer than 2 dimensions (biases, norm
    gains) nor on the logit scale; everything else decays."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "logit_scale" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(groups: list[dict], *, implementation: str, lr: float,
                    betas: tuple[float, float], eps: float) -> torch.optim.Optimizer:
    if implementation == "apex_fused":
        from apex.optimizers import FusedAdam as ApexFusedAdam
        return ApexFusedAdam(groups, lr=lr, betas=betas, eps=eps, adam_w_mode=True)
    if implementation == "deepspeed_fused":
        from deepspeed.ops.adam import FusedAdam
        return FusedAdam(groups, lr=lr, betas=betas, eps=eps, adam_w_mode=True)
    if implementation == "deepspeed_cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(groups, lr=lr, betas=betas, eps=eps, adamw_mode=True)
    if implementation == "torch_fused":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
    if implementation == "torch":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True)
    raise ValueError(f"unknown optimizer implementation {implementation!r}")
