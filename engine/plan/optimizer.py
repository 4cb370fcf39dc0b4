"""Part of the planner: which optimizer implementation steps the run, from what this machine runs."""
import importlib.util
from dataclasses import dataclass

from engine.errors import UserError
from engine.plan.dials import OPTIMIZERS, Dials
from engine.plan.hardware import Hardware
from engine.plan.recipes import Recipe


@dataclass(frozen=True)
class OptimizerSupport:
    """Which fused AdamW implementations can run on this machine."""
    apex_fused: bool; deepspeed_fused: bool; torch_fused: bool


def _torch_fused_on_cpu() -> bool:
    """torch's fused AdamW has a CPU kernel since torch 2.4; asked by stepping a tiny one."""
    import torch

    try:
        param = torch.nn.Parameter(torch.zeros(2))
        param.grad = torch.ones(2)
        torch.optim.AdamW([param], fused=True).step()
        return True
    except (RuntimeError, TypeError):
        return False


def probe_optimizer_support(hw: Hardware) -> OptimizerSupport:
    if hw.accelerator != "cuda":
        return OptimizerSupport(apex_fused=False, deepspeed_fused=False, torch_fused=_torch_fused_on_cpu())
    # apex's FusedAdam needs apex's compiled extension (amp_C), not just the Python package.
    apex_fused = all(importlib.util.find_spec(m) is not None for m in ("apex", "amp_C"))
    from deepspeed.ops.op_builder import FusedAdamBuilder
    return OptimizerSupport(apex_fused=apex_fused,
                            deepspeed_fused=bool(FusedAdamBuilder().is_compatible()),
                            torch_fused=True)


def optimizer_decision(dials: Dials, hw: Hardware, offload: bool, support: OptimizerSupport,
                       recipe: Recipe):
    """(name, reason): the recipe's SGD + Lookahead, the one given, or the fastest AdamW that runs here."""
    if recipe.optimizer == "sgd_lookahead":
        if dials.optimizer not in (None, "sgd_lookahead"):
            raise UserError(f"--optimizer {dials.optimizer}: the {recipe.method} recipe trains with "
                            "SGD + Lookahead and per-group LRs; drop --optimizer")
        if offload:
            raise UserError("--offload steps Adam states with DeepSpeed's CPU Adam; the "
                            f"{recipe.method} recipe uses SGD + Lookahead: drop --offload")
        return "sgd_lookahead", f"{recipe.source}: SGD momentum {recipe.momentum} + Lookahead (k=5, alpha=0.5)"
    if dials.optimizer == "sgd_lookahead":
        raise UserError(f"--optimizer sgd_lookahead: the {recipe.method} recipe is tuned for AdamW; "
                        f"use one of {', '.join(OPTIMIZERS[:-1])}")
    runnable = {"apex_fused": support.apex_fused, "deepspeed_fused": support.deepspeed_fused,
                "torch_fused": support.torch_fused, "torch": True, "deepspeed_cpu_adam": offload,
                "sgd_lookahead": False}
    if dials.optimizer is not None:
        name = dials.optimizer
        if name not in OPTIMIZERS:
            raise UserError(f"--optimizer {name!r} is unknown: use one of {', '.join(OPTIMIZERS)}")
        if offload and name != "deepspeed_cpu_adam":
            raise UserError(f"--optimizer {name} cannot step Adam states offloaded to the CPU: "
                            "use --optimizer deepspeed_cpu_adam, or --offload false")
        if not runnable[name]:
            why = ("it steps offloaded Adam states and needs --offload" if name == "deepspeed_cpu_adam"
                   else f"it is not available on {hw.device_name}")
            usable = ", ".join(n for n in OPTIMIZERS if runnable[n])
            raise UserError(f"--optimizer {name} cannot run here ({why}): use one of {usable}")
        return name, "--optimizer given"
    if offload:
        return "deepspeed_cpu_adam", "Adam states live on the CPU: DeepSpeed's CPU Adam steps them"
    if support.apex_fused:
        return "apex_fused", "apex is installed: its fused AdamW is the fastest"
    if support.deepspeed_fused:
        return "deepspeed_fused", "DeepSpeed's fused AdamW builds here (no apex)"
    if support.torch_fused:
        return "torch_fused", ("torch's fused AdamW, one kernel per step (its CPU kernel)" if hw.accelerator == "cpu"
                               else "torch's fused AdamW (no apex, DeepSpeed FusedAdam not buildable)")
    return "torch", f"torch AdamW (foreach): no fused kernel on {hw.device_name}"
