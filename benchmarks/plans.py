"""The plan for the large presets on hardware we do not have: one node of 8 x H100 80 GB, and
64 such nodes (512 GPUs).

Nothing is trained or measured here. Each plan is the one `launchers/pretrain.py --dry-run`
resolves (engine/plan/resolve.py), given a described `Hardware` instead of the probed one, as
the planner's unit tests do: the decisions (precision, ZeRO stage, offload, micro-batch,
accumulation, optimizer) and the planner's own model-state bytes per GPU are the engine's.
Beside them, one estimate the planner does not make: activation memory per GPU at the chosen
micro-batch (`activation_bytes_per_sample`), scaled from the ViT-B/32 step measured on an H100.

    python benchmarks/plans.py    # prints the table, writes benchmarks/results/plans_large_presets.json

It also prints the two presets' parameters and forward FLOPs beside open_clip's models of the
same names (both built on the meta device): equal, as tests/unit/test_flops.py checks.

Activation checkpointing is not a decision of the plan yet: every row trains without it.
"""
import argparse
import functools
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.data.text import ClipTokenizer  # noqa: E402
from engine.models.presets import ModelPreset  # noqa: E402
from engine.models.two_tower import TwoTower, count_parameters  # noqa: E402
from engine.objectives.method import lookup  # noqa: E402
from engine.plan.dials import Dials  # noqa: E402
from engine.plan.hardware import Hardware  # noqa: E402
from engine.plan.memory import _model_state_bytes  # noqa: E402  (the planner's own accounting)
from engine.plan.optimizer import OptimizerSupport  # noqa: E402
from engine.plan.resolve import resolve  # noqa: E402

# torch.cuda.get_device_properties().total_memory of an H100 80GB HBM3 (benchmarks/results/step_gpu_*.json).
H100_MEMORY_BYTES = 85_017_493_504
# A DGX H100 node: 8 GPUs, 2 x 56 cores.
HARDWARE = {
    "1 node x 8 H100 80GB": Hardware("cuda", "NVIDIA H100 80GB HBM3", H100_MEMORY_BYTES, (9, 0), True,
                                     world_size=8, local_world_size=8, nodes=1, cpus_per_node=112),
    "64 nodes x 8 H100 80GB": Hardware("cuda", "NVIDIA H100 80GB HBM3", H100_MEMORY_BYTES, (9, 0), True,
                                       world_size=512, local_world_size=8, nodes=64, cpus_per_node=112),
}
# torch's fused AdamW only: apex and DeepSpeed's prebuilt FusedAdam depend on the installation.
SUPPORT = OptimizerSupport(apex_fused=False, deepspeed_fused=False, torch_fused=True)
MODELS = ("vit-l-14", "vit-h-14")
METHODS = ("clip", "declip")
# The recipes' 4,096 (DeCLIP's YFCC15M setting) and 32,768 (CLIP's own, Radford et al. 2021).
GLOBAL_BATCHES = (None, 32_768)
DATASET_SIZE = 15_000_000  # YFCC15M: it sets only the run's length, not these decisions

# The measured step the activation estimate is scaled from: one H100 rank, bf16, ZeRO-1.
MEASURED = ROOT / "benchmarks/results/step_gpu_vitb32.json"
# Bytes a pre-norm transformer layer keeps for its backward, per token and unit of width, in
# bf16 (Korthikanti et al. 2022, "Reducing Activation Recomputation", section 4.1: 34, less the
# two dropout masks CLIP's towers do not have); fused attention keeps no L x L scores.
LAYER_BYTES_PER_TOKEN_WIDTH = 32


def tower_shapes(preset: ModelPreset) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """((tokens, width, layers) of the image tower, the same of the text tower), read from the
    towers built on the meta device (the image tower must be a ViT)."""
    import torch

    tokenizer = ClipTokenizer(preset.context_length)
    with torch.device("meta"):
        model = TwoTower(preset, tokenizer.eot_id, tokenizer.sot_id)
    trunk = model.image.trunk
    image_tokens = trunk.patch_embed.num_patches + trunk.num_prefix_tokens
    return ((image_tokens, trunk.embed_dim, len(trunk.blocks)),
            (preset.context_length, preset.text_width, preset.text_layers))


def analytic_activation_bytes(preset: ModelPreset, image_views: int, text_views: int) -> int:
    """Activations one sample keeps for the backward, by the layer formula alone."""
    image, text = (LAYER_BYTES_PER_TOKEN_WIDTH * tokens * width * layers
                   for tokens, width, layers in tower_shapes(preset))
    return image_views * image + text_views * text


def calibration() -> float:
    """Measured activation bytes per sample over the formula's, the larger over the measured
    ViT-B/32 rows (CLIP and DeCLIP): peak memory less the model states, per sample."""
    ratios = []
    for row in json.loads(MEASURED.read_text())["rows"]:
        method = lookup(row["method"], row["model"])
        states = _model_state_bytes(row["n_params"], row["precision"], row["zero_stage"], False, 1)
        measured = (row["peak_memory_gb"] * 1e9 - states) / row["micro_batch"]
        views = (method.objective.image_views, 1 + int(method.objective.text_aug))
        ratios.append(measured / analytic_activation_bytes(method.preset, *views))
    return max(ratios)


@functools.cache
def activation_bytes_per_sample(method_name: str, model: str, scale: float) -> float:
    """Estimated activations one sample of `method_name` keeps on `model`: every view it encodes."""
    method = lookup(method_name, model)
    views = (method.objective.image_views, 1 + int(method.objective.text_aug))
    return scale * analytic_activation_bytes(method.preset, *views)


def plan_row(method_name: str, model: str, hardware: str, global_batch: int | None, scale: float) -> dict:
    hw = HARDWARE[hardware]
    method = lookup(method_name, model)
    tokenizer = ClipTokenizer(method.preset.context_length)
    n_params = count_parameters(method.preset, tokenizer.eot_id, tokenizer.sot_id)
    plan = resolve(Dials(method=method_name, model=model, global_batch=global_batch), hw, method,
                   n_params=n_params, dataset_size=DATASET_SIZE, optimizer_support=SUPPORT,
                   image_size=method.preset.image_size, text_layers=method.preset.text_layers)
    states = _model_state_bytes(n_params, plan.precision, plan.zero_stage, plan.offload_optimizer, hw.world_size)
    activations = plan.micro_batch * activation_bytes_per_sample(method_name, model, scale)
    return {"model": model, "method": method_name, "hardware": hardware, "n_params": n_params,
            "global_batch": plan.global_batch, "precision": plan.precision, "zero_stage": plan.zero_stage,
            "offload_optimizer": plan.offload_optimizer, "micro_batch": plan.micro_batch,
            "activation_checkpointing": plan.activation_checkpointing,
            "grad_accum": plan.grad_accum, "accumulation": plan.accumulation, "optimizer": plan.optimizer,
            "model_states_gb": round(states / 1e9, 2), "activations_gb_estimate": round(activations / 1e9, 1),
            "total_gb_estimate": round((states + activations) / 1e9, 1),
            "device_gb": round(hw.device_memory_bytes / 1e9, 1),
            "reasons": {d.name: d.reason for d in plan.decisions
                        if d.name in ("precision", "zero_stage", "offload_optimizer", "micro_batch", "grad_accum",
                                      "activation_checkpointing")}}


def open_clip_counts(model: str) -> dict:
    """Parameters and forward FLOPs per sample of our towers and of open_clip's model of the same
    name, both built on the meta device and counted the same way (benchmarks/vs_openclip.py)."""
    from benchmarks.vs_openclip import build_open_clip, forward_flops

    tokenizer = ClipTokenizer()
    flops = forward_flops(model)
    return {"n_params": {"ours": count_parameters(lookup("clip", model).preset, tokenizer.eot_id, tokenizer.sot_id),
                         "open_clip": sum(p.numel() for p in build_open_clip(model, device="meta").parameters())},
            "forward_flops_per_sample": flops}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/plans_large_presets.json")
    args = parser.parse_args()
    counts = {model: open_clip_counts(model) for model in MODELS}
    for model, count in counts.items():
        print(f"{model}: parameters ours {count['n_params']['ours']:,} open_clip {count['n_params']['open_clip']:,}; "
              + "; ".join(f"{side} GFLOPs image {f['image'] / 1e9:.2f} text {f['text'] / 1e9:.2f}"
                          for side, f in count["forward_flops_per_sample"].items()))
    scale = calibration()
    rows = [plan_row(method, model, hardware, batch, scale)
            for model in MODELS for hardware in HARDWARE for batch in GLOBAL_BATCHES for method in METHODS]
    header = ("model", "method", "hardware", "global_batch", "precision", "zero_stage", "offload_optimizer",
              "micro_batch", "grad_accum", "activation_checkpointing", "model_states_gb", "activations_gb_estimate", "total_gb_estimate")
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(f"{row[k]:,}" if isinstance(row[k], int) and not isinstance(row[k], bool) else str(row[k])
                         for k in header))
    Path(args.out).write_text(json.dumps({
        "note": "plans resolved by engine/plan/resolve.py for described hardware, not measured; activations "
                "estimated (benchmarks/plans.py) without activation checkpointing, which the plan leaves off in every row",
        "activation_calibration": round(scale, 3), "dataset_size": DATASET_SIZE,
        "optimizer_support": "torch fused AdamW only", "open_clip_counts": counts, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
