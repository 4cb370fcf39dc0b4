"""Parameter groups and the optimizer implementation the plan chose."""
import torch
from torch import nn

from engine.train.lookahead import Lookahead

# CLIP-Lite's LR groups by parameter name within the Task, as the reference splits them
# (4m4n5/CLIP-Lite factories.py: "image_encoder" -> CNN_LR, "text_encoder" -> TRANS_LR, the
# rest, i.e. its loss module with the critic blocks, temperature and discriminators -> LR).
# The critic blocks live in the model here, as the towers' projections.
CLIP_LITE_GROUPS = (
    ("image", ("model.image.trunk.",)),
    ("text", ("model.text.transformer.",)),
    ("heads", ("model.image.proj.", "model.text.proj.", "model.logit_scale.", "objective.")),
)


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


def clip_lite_param_groups(module: nn.Module, group_lrs: dict[str, float],
                           weight_decay: float) -> list[dict]:
    """One group per CLIP-Lite LR ("image", "text", "heads"), each with its own LR.

    Every parameter decays, biases, norms and the temperature included: that is what the
    reference does (its no-decay pattern names a "textual" module it does not have, so it
    matches nothing). Empty groups are left out: DeepSpeed drops them, which would misalign
    the LR scheduler's per-group list built before.
    """
    params = {name: [] for name, _ in CLIP_LITE_GROUPS}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        group = next((g for g, prefixes in CLIP_LITE_GROUPS if name.startswith(prefixes)), None)
        if group is None:
            raise ValueError(f"parameter {name!r} is in no CLIP-Lite LR group; add its prefix to "
                             "CLIP_LITE_GROUPS")
        params[group].append(p)
    return [{"params": ps, "lr": group_lrs[g], "weight_decay": weight_decay}
            for g, ps in params.items() if ps]


def sgd_lookahead_for(module: nn.Module, group_lrs: dict[str, float], *, momentum: float,
                      weight_decay: float, k: int = 5, alpha: float = 0.5) -> Lookahead:
    """CLIP-Lite's optimizer: SGD with momentum inside Lookahead (k=5, alpha=0.5 in the
    reference's configs), over `clip_lite_param_groups`."""
    # Every group carries its own LR; SGD's default is never used.
    sgd = torch.optim.SGD(clip_lite_param_groups(module, group_lrs, weight_decay), momentum=momentum)
    return Lookahead(sgd, k=k, alpha=alpha)


def optimizer_for_plan(module: nn.Module, plan) -> torch.optim.Optimizer:
    """The optimizer the plan resolved: SGD + Lookahead with per-group LRs, or AdamW in the
    chosen implementation with the no-decay groups."""
    if plan.optimizer == "sgd_lookahead":
        return sgd_lookahead_for(module, dict(plan.group_lrs), momentum=plan.momentum,
                                 weight_decay=plan.weight_decay)
    return build_optimizer(param_groups(module, plan.weight_decay), implementation=plan.optimizer,
                           lr=plan.lr, betas=plan.betas, eps=plan.eps)
