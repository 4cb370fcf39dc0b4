"""Parameter groups and the optimizer implementation the plan chose."""
import torch
from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam
from torch import nn

from engine.train.lookahead import Lookahead
from engine.train.nonfinite import SkipNonFinite

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
        # deferred: apex is optional (the planner picks it only where it is installed, plan/optimizer.py)
        from apex.optimizers import FusedAdam as ApexFusedAdam
        return ApexFusedAdam(groups, lr=lr, betas=betas, eps=eps, adam_w_mode=True)
    if implementation == "deepspeed_fused":
        return FusedAdam(groups, lr=lr, betas=betas, eps=eps, adam_w_mode=True)
    if implementation == "deepspeed_cpu_adam":
        return DeepSpeedCPUAdam(groups, lr=lr, betas=betas, eps=eps, adamw_mode=True)
    if implementation == "torch_fused":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
    if implementation == "torch":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True)
    raise ValueError(f"unknown optimizer implementation {implementation!r}")


def lr_group_params(module: nn.Module, lr_groups, group_lrs: dict[str, float],
                    weight_decay: float) -> list[dict]:
    """One group per LR group the objective declares (`lr_groups`: (group, name prefixes)),
    each with its own LR.

    Every parameter decays, biases, norms and the temperature included: that is what CLIP-Lite's
    reference does, the one recipe with groups (its no-decay pattern names a "textual" module it
    does not have, so it matches nothing). Empty groups are left out: DeepSpeed drops them,
    which would misalign the LR scheduler's per-group list built before.
    """
    params = {name: [] for name, _ in lr_groups}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        group = next((g for g, prefixes in lr_groups if name.startswith(prefixes)), None)
        if group is None:
            raise ValueError(f"parameter {name!r} is in no LR group; add its prefix to the objective's lr_groups")
        params[group].append(p)
    return [{"params": ps, "lr": group_lrs[g], "weight_decay": weight_decay}
            for g, ps in params.items() if ps]


def _groups(module: nn.Module, plan) -> list[dict]:
    """The objective's LR groups when the recipe gives group LRs; else open_clip's decay groups."""
    if not plan.group_lrs:
        return param_groups(module, plan.weight_decay)
    lr_groups = module.objective.lr_groups
    if not lr_groups:
        raise ValueError(f"the recipe gives group LRs {dict(plan.group_lrs)} but {type(module.objective).__name__} "
                         "declares no lr_groups")
    return lr_group_params(module, lr_groups, dict(plan.group_lrs), plan.weight_decay)


def optimizer_for_plan(module: nn.Module, plan) -> torch.optim.Optimizer:
    """The optimizer the plan resolved, over `module` (a ModelWithLoss): SGD + Lookahead
    (k=5, alpha=0.5, as CLIP-Lite's reference configs) or AdamW in the chosen implementation;
    without ZeRO in fp32 (or bf16, whose weights are fp32 then), inside the non-finite check
    DeepSpeed leaves out there."""
    groups = _groups(module, plan)
    if plan.optimizer == "sgd_lookahead":
        # Every group carries its own LR; SGD's default is never used.
        optimizer = Lookahead(torch.optim.SGD(groups, momentum=plan.momentum), k=5, alpha=0.5)
    else:
        optimizer = build_optimizer(groups, implementation=plan.optimizer, lr=plan.lr, betas=plan.betas,
                                    eps=plan.eps)
    return SkipNonFinite(optimizer) if plan.zero_stage == 0 and plan.precision != "fp16" else optimizer
