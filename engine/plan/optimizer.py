"""Part of the planner: which optimizer implementation steps the run, from what this machine runs."""
import importlib.util
from dataclasses import dataclass

import torch
from deepspeed.git_version_info import installed_ops
from deepspeed.ops.op_builder.builder import installed_cuda_version

from engine.errors import UserError
from engine.plan.dials import OPTIMIZERS, Dials
from engine.plan.hardware import Hardware
from engine.objectives.recipes import Recipe


@dataclass(frozen=True)
class OptimizerSupport:
    """Which fused AdamW implementations can run on this machine. `deepspeed_fused_prebuilt`:
    DeepSpeed's FusedAdam was compiled when DeepSpeed was installed, so it costs nothing at start."""
    apex_fused: bool; deepspeed_fused: bool; torch_fused: bool
    deepspeed_fused_prebuilt: bool = True


def _torch_fused_on_cpu() -> bool:
    """torch's fused AdamW has a CPU kernel since torch 2.4; asked by stepping a tiny one."""
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
    prebuilt, compiles = _deepspeed_fused_adam()
    return OptimizerSupport(apex_fused=apex_fused, deepspeed_fused=prebuilt or compiles, torch_fused=True,
                            deepspeed_fused_prebuilt=prebuilt)


def _deepspeed_fused_adam() -> tuple[bool, bool]:
    """(installed prebuilt, can be compiled at start-up) for DeepSpeed's FusedAdam.

    Its builder's is_compatible() says yes on any CUDA machine, but unless DeepSpeed was
    installed with the op built, FusedAdam() compiles it at start-up: that needs nvcc of torch's
    CUDA major version and ninja, which GPU images often lack, and takes minutes on every fresh
    machine. So only a prebuilt op is chosen by default."""
    # deferred: torch.utils.cpp_extension is slow to import and warns on import where CUDA is
    # absent; only a CUDA machine asks it.
    from torch.utils.cpp_extension import is_ninja_available

    prebuilt = bool(installed_ops.get("fused_adam"))
    try:
        nvcc_major, _ = installed_cuda_version()
    except Exception:  # no CUDA_HOME, or no nvcc there (DeepSpeed raises its own exception types)
        return prebuilt, False
    return prebuilt, is_ninja_available() and str(nvcc_major) == (torch.version.cuda or "").split(".")[0]


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
    if support.deepspeed_fused and support.deepspeed_fused_prebuilt:
        return "deepspeed_fused", "DeepSpeed's fused AdamW is installed prebuilt (no apex)"
    if support.torch_fused:
        why = ("DeepSpeed's FusedAdam would compile at start-up" if support.deepspeed_fused
               else "DeepSpeed's FusedAdam neither prebuilt nor compilable here")
        return "torch_fused", ("torch's fused AdamW, one kernel per step (its CPU kernel)" if hw.accelerator == "cpu"
                               else f"torch's fused AdamW (no apex; {why})")
    return "torch", f"torch AdamW (foreach): no fused kernel on {hw.device_name}"
