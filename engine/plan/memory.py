"""Part of the planner: what fits in device memory. The micro-batch and whether the towers
checkpoint their activations (the activations), and which ZeRO stage and offload (the model
states).

Activations grow linearly with the micro-batch: the recipe's micro-batch for 80 GB, scaled to
this device, bounds it; activation checkpointing divides the activations of a micro-batch by a
measured factor, for one more forward of the towers.

Model states are the weights, gradients and optimizer states; their size per device follows
from the parameter count, the precision and how much ZeRO partitions. The planner takes the
cheapest setting that fits a fixed share of device memory.
"""
import math

from engine.errors import UserError
from engine.objectives.recipes import Recipe

GB = 10**9
# The device size that Recipe.micro_batch_80gb was sized for.
REFERENCE_DEVICE_BYTES = 80 * GB
# The activations of a micro-batch with the towers checkpointed, as a fraction of those without:
# what one training step allocates over the weights, gradients and optimizer states, measured by
# benchmarks/activation_checkpointing.py on a CPU in bf16, the larger of ViT-B/16 at 16 per
# micro-batch (0.22) and ViT-L/14 at 8 (0.32), rounded up (benchmarks/results/activation_checkpointing_cpu.json).
CHECKPOINTED_ACTIVATION_FRACTION = 0.33
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


def micro_batch_setting(dials, hw, recipe: Recipe, precision: str, per_rank: int, least: int):
    """((micro_batch, reason), (activation_checkpointing, reason)) for `per_rank` samples per rank
    and an objective that trains on no fewer than `least` per micro-batch.

    The micro-batch a step needs is --micro-batch when given, else the whole per-rank batch: one
    micro-batch per optimizer step. A smaller one makes the step accumulate, and each way costs
    at least what checkpointing does: GradCache runs every micro-batch's forward twice (the same
    extra forward as checkpointing's recompute) and plain accumulation changes the loss (each
    micro-batch contrasted within itself). So checkpointing is on when the needed micro-batch (or
    the objective's least) does not fit without it and does with it; off when it fits without,
    and off when it fits neither way (the step accumulates anyway, and a recompute on top of
    GradCache's second forward would cost a third)."""
    if dials.micro_batch is not None and (dials.micro_batch < 1 or per_rank % dials.micro_batch):
        raise UserError(f"--micro-batch {dials.micro_batch} does not divide the {per_rank} samples per "
                        f"rank: use one of {', '.join(map(str, divisors(per_rank)))}")
    given = {None: None, "on": True, "off": False}[dials.activation_checkpointing]
    if hw.accelerator == "cpu":
        on = bool(given)
        checkpointing = (on, "--activation-checkpointing given" if given is not None else
                         "off: a CPU run takes the whole per-rank batch (no device-memory limit), nothing to save")
        if dials.micro_batch is not None:
            return (dials.micro_batch, "--micro-batch given"), checkpointing
        return (per_rank, "the whole per-rank batch: no device memory limit on CPU"), checkpointing
    # Activation memory grows linearly with the micro-batch: scale the 80 GB anchor by this
    # device's memory, and halve it in fp32, whose activations take twice the bytes.
    scaled = recipe.micro_batch_80gb * hw.device_memory_bytes / REFERENCE_DEVICE_BYTES
    scaled = scaled / 2 if precision == "fp32" else scaled
    cap_off = max(1, int(scaled))
    cap_on = max(1, int(scaled / CHECKPOINTED_ACTIVATION_FRACTION))
    need = dials.micro_batch or per_rank
    largest_off = max(d for d in divisors(per_rank) if d <= cap_off)
    largest_on = max(d for d in divisors(per_rank) if d <= cap_on)
    fits = f"{cap_off} fit without it, {cap_on} with its activations at x{CHECKPOINTED_ACTIVATION_FRACTION:g}, as measured"
    if given is not None:
        on, reason = given, f"--activation-checkpointing given ({fits})"
    elif dials.micro_batch is not None:
        # The micro-batch is fixed: the only way to fit it is to keep fewer activations.
        on = need > cap_off
        over_both = "" if need <= cap_on else "(over even with it) "
        reason = (f"on: --micro-batch {need} is over the {cap_off} that fit without it {over_both}({fits})" if on
                  else f"off: --micro-batch {need} fits without it (up to {cap_off})")
    elif need <= cap_off and largest_off >= least:
        on, reason = False, f"off: the whole per-rank batch of {need}, one micro-batch per step, fits without it (up to {cap_off})"
    elif need <= cap_on:
        on, reason = True, (f"on: the whole per-rank batch of {need}, one micro-batch per step, fits only with it "
                            f"({fits}); its recompute costs what GradCache's second forward of {need // largest_off} "
                            "smaller micro-batches would")
    elif largest_off < least <= largest_on:
        on, reason = True, (f"on: without it a micro-batch holds {largest_off}, under the {least} the objective "
                            f"needs ({fits})")
    else:
        on, reason = False, (f"off: the whole per-rank batch of {need} does not fit even with it ({fits}): the step "
                             "accumulates micro-batches anyway, and a recompute would add a third forward to "
                             "GradCache's two")
    cap = cap_on if on else cap_off
    if dials.micro_batch is not None:
        return (dials.micro_batch, "--micro-batch given"), (on, reason)
    micro = max(d for d in divisors(per_rank) if d <= cap)
    return (micro, (f"largest divisor of {per_rank} per rank within {cap}: {recipe.micro_batch_80gb} "
                    f"fit 80 GB in bf16, scaled to {gb(hw.device_memory_bytes)} GB"
                    + (" and halved for fp32" if precision == "fp32" else "")
                    + (f", / {CHECKPOINTED_ACTIVATION_FRACTION:g} with activation checkpointing" if on else ""))), (on, reason)


def divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))
