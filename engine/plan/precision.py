"""Part of the planner: the precision on a CPU, and what a bf16/fp16 run keeps in fp32.

Under ZeRO, DeepSpeed's bf16 and fp16 modes store the towers' weights and activations in the
low precision and step fp32 master weights. Around that, clipzero keeps in fp32 what open_clip's
and torchtitan's mixed precision keep there:
- gradients accumulated over micro-batches and reduced over ranks (DeepSpeed's
  `data_types.grad_accum_dtype` and `communication_data_type`);
- LayerNorm's statistics and affine step: torch's LayerNorm kernels compute a bf16 input in
  fp32 and round once (tests/unit/test_model_precision.py holds them to it), so the towers keep
  torch's norms; open_clip's LayerNormFp32 would only add casts and an fp32 copy of each input;
- the temperature's exp and clamp (engine/models/two_tower.py); its stored value is the bf16
  copy of its fp32 master weight, as for every parameter (DeepSpeed casts them all);
- the loss: bf16 embeddings enter the loss kernels, which accumulate in fp32; fp16 embeddings
  are cast to fp32 first (the objectives decide by dtype, engine/objectives/).

bf16 without ZeRO (the planner's choice for one rank, engine/plan/memory.py) takes open_clip's
`amp_bf16` form instead: the weights stay fp32 and only the towers run under torch's bf16
autocast (engine/models/two_tower.py), their outputs cast back to fp32 for the heads and the
loss. The optimizer steps the weights in place with fp32 gradients, as in an fp32 run: no
master copy, no cast of the weights after each step, and the checkpoint, the non-finite step
check and resharding are the fp32 ones. DeepSpeed's own bf16 mode without ZeRO would accumulate
gradients in bf16 and step its master copy through an unfused wrapper. At ViT-B/32 on one CPU
rank the forms stepped equally fast within the machine's noise, and this one used the least
memory (benchmarks/results/vs_openclip_cpu_bf16_forms.json).
"""

# Below this size a CPU's bf16 units do not pay: casting the weights (after every step, or at
# every forward under autocast) outweighs the faster matmuls of a small model (the debug towers
# trained slower in bf16 than in fp32 on an AVX512-BF16 CPU; ViT-B/32 trained faster).
# `--precision bf16` overrides.
CPU_BF16_MIN_PARAMS = 20_000_000


def cpu_precision(native_bf16: str | None, n_params: int) -> tuple[str, str]:
    """(precision, reason) for a CPU run whose CPU computes bf16 on `native_bf16` (None: it
    emulates bf16) with a model of `n_params` parameters."""
    if native_bf16 is None:
        return "fp32", "fp32: this CPU has no AMX or AVX512-BF16, so bf16 would be emulated, slower than fp32"
    if n_params < CPU_BF16_MIN_PARAMS:
        return "fp32", (f"fp32: this CPU computes bf16 natively ({native_bf16}), but a model of "
                        f"{n_params / 1e6:.1f}M parameters (under {CPU_BF16_MIN_PARAMS / 1e6:.0f}M) gains "
                        "less from it than bf16's casts cost; --precision bf16 to try")
    return "bf16", (f"bf16: this CPU computes it natively ({native_bf16}); fp32 master weights "
                    f"(a model of {n_params / 1e6:.0f}M parameters, at least {CPU_BF16_MIN_PARAMS / 1e6:.0f}M)")


def towers_autocast(precision: str, zero_stage: int) -> bool:
    """Whether the run trains fp32 weights with the towers under bf16 autocast (bf16 without ZeRO)."""
    return precision == "bf16" and zero_stage == 0


def precision_details(precision: str, zero_stage: int, world_size: int, grad_accum: int):
    """(name, value, reason) for grad_dtype, fp32_parts and loss_input_dtype."""
    if precision == "fp32":
        yield "grad_dtype", "fp32", "fp32 run"
        yield "fp32_parts", "all", "fp32 run"
        yield "loss_input_dtype", "fp32", "fp32 run"
        return
    if towers_autocast(precision, zero_stage):
        yield "grad_dtype", "fp32", ("fp32: without ZeRO the weights stay fp32 and the towers run under bf16 "
                                     "autocast (open_clip's amp_bf16), so gradients are fp32")
        yield "fp32_parts", "weights, LayerNorm, logit scale, heads, loss", (
            "bf16 only inside the towers (LayerNorm normalising in fp32 as torch's kernels do), with the fp32 "
            "weights cast at each forward; the towers' outputs return to fp32 for the objective's heads and loss")
        yield "loss_input_dtype", "fp32", "the towers' outputs are cast to fp32 after autocast"
        return
    combines = world_size > 1 or grad_accum > 1
    what = ("accumulated over micro-batches and reduced over ranks" if world_size > 1 and grad_accum > 1
            else "reduced over ranks" if world_size > 1 else "accumulated over micro-batches")
    if precision == "fp16":
        yield "grad_dtype", "fp16", "fp16 gradients under the dynamic loss scale, as DeepSpeed's fp16 mode keeps them"
    else:
        yield "grad_dtype", "fp32", (f"fp32: bf16 gradients {what} in fp32, as torchtitan reduces them"
                                     if combines else "fp32: accumulated in fp32 (one micro-batch on one rank here)")
    yield "fp32_parts", "LayerNorm, logit scale, loss", (
        "computed in fp32 from the low-precision weights and activations, as open_clip keeps them: "
        "LayerNorm (torch's kernels normalise in fp32), the temperature's exp and clamp, the loss kernels' sums")
    if precision == "bf16":
        yield "loss_input_dtype", "bf16", "the towers' bf16 embeddings enter the loss kernels, which accumulate in fp32"
    else:
        yield "loss_input_dtype", "fp32", "fp16 embeddings are cast to fp32 before the loss: fp16's range is too narrow"
