"""Part of the planner: which ZeRO stage and offload the model states need on this hardware.

Model states are the weights, gradients and optimizer states; their size per device follows
from the parameter count, the precision and how much ZeRO partitions. The planner takes the
cheapest setting that fits a fixed share of device memory.
"""
from engine.errors import UserError

GB = 10**9
# Share of device memory that model states (weights, gradients, Adam states) may take; the
# rest is for activations, communication buckets and the allocator's slack.
MODEL_STATE_BUDGET_FRACTION = 0.5
# Adam keeps an fp32 master copy, m and v for every parameter (DeepSpeed's ZeRO optimizers
# keep the fp32 copy even when training in fp32). SGD with momentum and Lookahead keeps the
# same three: master copy, momentum and slow weights. Without ZeRO in fp32 the optimizer steps
# the weights themselves: no master copy.
ADAM_STATE_BYTES_PER_PARAM = 12
FP32_MASTER_BYTES_PER_PARAM = 4


def gb(n_bytes: float) -> str:
    return f"{n_bytes / GB:.3g}"


def _model_state_bytes(n_params: int, precision: str, stage: int, offload: bool,
                       world_size: int, trainable: int | None = None) -> float:
    # ZeRO-1 partitions the Adam states across ranks, 2 also gradients, 3 also weights;
    # offload moves the Adam states to CPU memory. Locked parameters (--lock) have weights only.
    trainable = n_params if trainable is None else trainable
    if precision == "bf16" and stage == 0:
        # fp32 weights under autocast (engine/plan/precision.py), plus autocast's bf16 copies of
        # them, kept through the forward for the backward.
        return _model_state_bytes(n_params, "fp32", 0, offload, world_size, trainable) + n_params * 2
    weight_bytes = 4 if precision == "fp32" else 2
    weights = n_params * weight_bytes / (world_size if stage >= 3 else 1)
    # bf16 under ZeRO accumulates its gradients in fp32 (engine/plan/precision.py).
    grad_bytes = 4 if precision == "bf16" and stage >= 1 else weight_bytes
    grads = trainable * grad_bytes / (world_size if stage >= 2 else 1)
    adam_bytes = ADAM_STATE_BYTES_PER_PARAM - (FP32_MASTER_BYTES_PER_PARAM if stage == 0 and precision == "fp32" else 0)
    adam = 0 if offload else trainable * adam_bytes / (world_size if stage >= 1 else 1)
    return weights + grads + adam


# Cheapest first: each step partitions more, at the cost of more communication.
_ZERO_LADDER = ((1, False), (2, False), (3, False), (3, True))
# One rank: ZeRO has nothing to partition and would only add its flat fp32 copy of the weights
# and gradients and a copy back after each step; without it the optimizer steps the weights in
# place (benchmarks/vs_openclip.py measures the two). That holds for bf16 too, which trains fp32
# weights under autocast without ZeRO (engine/plan/precision.py). fp16 keeps ZeRO-1: it needs
# DeepSpeed's loss scaling around low-precision weights.
_ONE_RANK_LADDER = ((0, False), *_ZERO_LADDER)


def zero_setting(dials, hw, precision: str, n_params: int, trainable: int | None = None):
    """(stage, reason, offload, reason): the first ZeRO setting whose model states fit the
    budget; ZeRO-1 is the floor because its partitioned Adam states cost no extra traffic,
    except for one rank in fp32 or bf16, where there is nothing to partition."""
    if dials.zero_stage is not None and dials.zero_stage not in (0, 1, 2, 3):
        raise UserError(f"--zero-stage {dials.zero_stage} is not a ZeRO stage: use 0, 1, 2 or 3")
    if dials.offload and dials.zero_stage == 0:
        raise UserError("--offload needs ZeRO (stage 1 or more) to partition the optimizer: "
                        "drop --zero-stage 0 or --offload")
    if dials.offload and hw.accelerator == "cpu":
        raise UserError("--offload moves Adam states from GPU to CPU memory; a CPU run keeps "
                        "them there already: drop --offload")
    ladder = ([(dials.zero_stage, False), (dials.zero_stage, True)] if dials.zero_stage is not None
              else [(1, True), (2, True), (3, True)] if dials.offload
              else list(_ONE_RANK_LADDER if hw.world_size == 1 and precision != "fp16" else _ZERO_LADDER))
    ladder = [(stage, offload) for stage, offload in ladder
              if (dials.offload is None or offload == dials.offload)
              and not (offload and (stage == 0 or hw.accelerator != "cuda"))]
    budget = hw.device_memory_bytes * MODEL_STATE_BUDGET_FRACTION

    def need(stage: int, offload: bool) -> float:
        return _model_state_bytes(n_params, precision, stage, offload, hw.world_size, trainable)

    fitting = [(stage, offload) for stage, offload in ladder if need(stage, offload) <= budget]
    if not fitting and dials.zero_stage is None and dials.offload is None:
        stage, offload = ladder[-1]
        raise UserError(
            f"{n_params / 1e6:,.0f}M parameters need {gb(need(stage, offload))} GB of model states "
            f"per device even with ZeRO-{stage}{' and CPU offload' if offload else ''}, over the "
            f"{gb(budget)} GB budget ({MODEL_STATE_BUDGET_FRACTION:.0%} of each device): "
            "use more devices or a smaller --model")
    # Overrides win even when nothing fits: then take the setting that needs least memory.
    stage, offload = fitting[0] if fitting else min(ladder, key=lambda s: need(*s))
    usage = f"{gb(need(stage, offload))} of {gb(budget)} GB model-state budget per device"
    position = ladder.index((stage, offload))
    if dials.zero_stage is not None:
        stage_reason = f"--zero-stage given ({usage})"
    elif position == 0 and stage == 0:
        stage_reason = (f"0: one rank in {precision}, nothing to partition; the optimizer steps the "
                        f"{'fp32 ' if precision == 'bf16' else ''}weights in place, without ZeRO's flat "
                        f"copy ({usage})")
    elif position == 0:
        stage_reason = f"{stage}: model states fit with optimizer partitioning ({usage})"
    else:
        below = ladder[position - 1]
        stage_reason = (f"{stage}: ZeRO-{below[0]}{' + offload' if below[1] else ''} needs "
                        f"{gb(need(*below))} GB per device, over the budget; {usage}")
    if dials.offload is not None:
        offload_reason = f"--offload given ({usage})"
    elif hw.accelerator == "cpu":
        offload_reason = "no: a CPU run keeps Adam states in RAM already"
    elif offload:
        offload_reason = (f"yes: on-device Adam states need {gb(need(stage, False))} GB per "
                          f"device, over the {gb(budget)} GB budget")
    elif need(stage, offload) <= budget:
        offload_reason = "no: Adam states fit on the device"
    else:
        offload_reason = "no: ZeRO-0 cannot offload (model states exceed the budget)"
    return stage, stage_reason, offload, offload_reason


