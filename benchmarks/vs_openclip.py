"""open_clip's training step and ours, side by side, on the same architecture.

For each case: open_clip's model config and our preset with the same towers (parameter counts
and forward FLOPs are counted and printed side by side), the same global batch and precision,
the same synthetic batches already on the device, and only steady-state steps timed.
- open_clip's step is the one `open_clip_train` runs: CLIP's forward, `ClipLoss`, backward,
  AdamW over its two parameter groups (no decay on gains, biases and the temperature), the
  logit scale clamped after the step; autocast to bf16 on a GPU (its `--precision amp_bf16`).
- Ours is the planner's choices (ZeRO stage, optimizer implementation, precision) built into a
  DeepSpeed engine exactly as engine/training_run.py does, stepped as engine/train/loop.py steps it.
Each side runs in a process of its own, in alternating rounds (the machines are shared and
noisy; a fresh process also gives each side its own peak memory). Reported per side: samples/s
(median step), peak memory (GPU: allocated; CPU: the process's resident set) and achieved
TFLOP/s and MFU from counted FLOPs (engine/observe/flops.py), with ours/open_clip ratios.

    python benchmarks/vs_openclip.py                                   # CPU, fp32: the default cases
    python benchmarks/vs_openclip.py --cases vit-b-32:256 rn50:256 --precision bf16   # a GPU
    python benchmarks/vs_openclip.py --cases vit-debug:64 --steps 3 --rounds 1        # a quick look
    python benchmarks/vs_openclip.py --cases vit-b-32:16 --ours plan zero1:zero_stage=1   # a lever on and off
"""
import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

# Our preset -> open_clip's model: a name of its registry, or the config of the same towers.
# vit-debug is timm's CLIP ViT at the debug size (engine/models/presets.py): open_clip's
# VisionTransformer with the same width, depth, heads and patches, and CLIP's text tower.
OPEN_CLIP_MODEL = {
    "vit-b-32": "ViT-B-32",
    "vit-b-16": "ViT-B-16",
    "vit-l-14": "ViT-L-14",
    "vit-h-14": "ViT-H-14",
    "rn50": "RN50",
    "vit-debug": {"embed_dim": 64,
                  "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}},
}
DEFAULT_CASES = ("vit-debug:64", "vit-b-32:16")


def build_open_clip(preset: str, device: str | None = None):
    """open_clip's model for `preset`; on the meta device (`device="meta"`: no memory, for counting)
    built straight from its config, as open_clip.create_model builds these towers."""
    import open_clip

    spec = OPEN_CLIP_MODEL[preset]
    if device == "meta":
        with torch.device("meta"):
            return open_clip.CLIP(**(open_clip.get_model_config(spec) if isinstance(spec, str) else spec))
    if isinstance(spec, str):
        return open_clip.create_model(spec)
    return open_clip.CLIP(**spec)


def synthetic_batches(count: int, batch: int, image_size: int, context: int, device) -> list[dict]:
    """Random images and token rows framed as ClipTokenizer frames them, the same for both sides."""
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        tokens = torch.zeros(batch, context, dtype=torch.long)
        lengths = torch.randint(3, context - 1, (batch,), generator=generator)
        for row, n in enumerate(lengths.tolist()):
            tokens[row, 0], tokens[row, n] = 49406, 49407
            tokens[row, 1:n] = torch.randint(1, 49000, (n - 1,), generator=generator)
        images = torch.randn(batch, 3, image_size, image_size, generator=generator)
        batches.append({"image": images.to(device), "text": tokens.to(device)})
    return batches


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed_steps(step, batches: list[dict], device: torch.device, warmup: int) -> list[float]:
    times = []
    for index, batch in enumerate(batches):
        _sync(device)
        started = time.perf_counter()
        step(batch)
        _sync(device)
        if index >= warmup:
            times.append(time.perf_counter() - started)
    return times


def run_open_clip(preset: str, batch: int, steps: int, precision: str, lr: float, betas, eps: float,
                  weight_decay: float, device: torch.device) -> dict:
    from open_clip.loss import ClipLoss

    torch.manual_seed(0)
    model = build_open_clip(preset).to(device).train()
    # open_clip_train's groups: no weight decay on gains, biases, norms and the temperature.
    exclude = [p for n, p in model.named_parameters()
               if p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n]
    excluded = {id(p) for p in exclude}
    optimizer = torch.optim.AdamW([{"params": exclude, "weight_decay": 0.0},
                                   {"params": [p for p in model.parameters() if id(p) not in excluded],
                                    "weight_decay": weight_decay}], lr=lr, betas=betas, eps=eps)
    loss_fn = ClipLoss()
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else torch.autocast(device.type, enabled=False))

    def step(data):
        optimizer.zero_grad()
        with autocast:
            image_features, text_features, logit_scale = model(data["image"], data["text"])
            loss = loss_fn(image_features, text_features, logit_scale)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    image_size = model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, tuple) else image_size
    batches = synthetic_batches(steps + 2, batch, image_size, model.context_length, device)
    return {"step_s": _timed_steps(step, batches, device, warmup=2),
            "n_params": sum(p.numel() for p in model.parameters())}


# Not a dial: a variant with keep_one_rank_allreduce=true keeps DeepSpeed's all-reduce over a
# group of one (engine/dist.skip_reduction_alone), to measure that lever off.
ONE_RANK_ALLREDUCE = "keep_one_rank_allreduce"
# Not a dial either: torch_autocast=true trains fp32 weights under DeepSpeed's torch_autocast
# (bf16), the form open_clip's amp_bf16 takes, to measure it against DeepSpeed's bf16 weights.
TORCH_AUTOCAST = "torch_autocast"


def parse_variant(text: str) -> tuple[str, dict]:
    """LABEL or LABEL:dial=value,dial=value -> (label, Dials overrides): one setting of ours."""
    import dataclasses

    from engine.plan.dials import Dials

    label, _, settings = text.partition(":")
    kinds = {f.name: f.metadata.get("flag", {}).get("kind", str) for f in dataclasses.fields(Dials)}
    kinds[ONE_RANK_ALLREDUCE] = kinds[TORCH_AUTOCAST] = lambda value: value.lower() in ("1", "true", "yes")
    overrides = {}
    for setting in filter(None, settings.split(",")):
        name, _, value = setting.partition("=")
        if name not in kinds or not value:
            raise SystemExit(f"--ours {text}: {setting!r} is not dial=value with a dial of {', '.join(kinds)}")
        overrides[name] = kinds[name](value)
    return label, overrides


def plan_for(preset_name: str, batch: int, steps: int, precision: str | None, overrides: dict | None = None):
    from engine.data.text import ClipTokenizer
    from engine.objectives.method import lookup
    from engine.models.two_tower import count_parameters
    from engine.plan.dials import Dials
    from engine.plan.hardware import probe
    from engine.plan.optimizer import probe_optimizer_support
    from engine.plan.resolve import resolve

    method = lookup("clip", preset_name)
    preset = method.preset
    tokenizer = ClipTokenizer(preset.context_length)
    hw = probe()
    plan = resolve(Dials(method="clip", model=preset_name, global_batch=batch, micro_batch=batch,
                         steps=steps + 10, precision=precision, **(overrides or {})), hw, method,
                   n_params=count_parameters(preset, tokenizer.eot_id, tokenizer.sot_id), dataset_size=10**7,
                   optimizer_support=probe_optimizer_support(hw), image_size=preset.image_size,
                   text_layers=preset.text_layers)
    return plan, preset, tokenizer


def run_ours(preset_name: str, batch: int, steps: int, precision: str, device: torch.device,
             overrides: dict) -> dict:
    import deepspeed

    from engine import dist
    from engine.host_memory import keep_freed_memory
    from engine.models.two_tower import TwoTower
    from engine.plan.deepspeed_config import render
    from engine.plan.precision import towers_autocast
    from engine.objectives.method import lookup
    from engine.model_with_loss import ModelWithLoss, align_buffer_dtypes
    from engine.train.optim import optimizer_for_plan

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(dist.free_port()))
    dist.init_distributed(600)
    keep_freed_memory()   # as engine/training_run.py does
    overrides = dict(overrides)
    keep_allreduce = overrides.pop(ONE_RANK_ALLREDUCE, False)
    autocast = overrides.pop(TORCH_AUTOCAST, False)
    plan, preset, tokenizer = plan_for(preset_name, batch, steps, "fp32" if autocast else precision, overrides)
    config = render(plan)
    if autocast:
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    torch.manual_seed(0)
    model = TwoTower(preset, tokenizer.eot_id, tokenizer.sot_id)
    model.autocast_dtype = torch.bfloat16 if towers_autocast(plan.precision, plan.zero_stage) else None
    objective = lookup("clip", preset_name).build_objective(model, dict(plan.objective_options), plan.seed)
    task = ModelWithLoss(model, objective)
    engine, *_ = deepspeed.initialize(model=task, optimizer=optimizer_for_plan(task, plan), config=config)
    align_buffer_dtypes(engine.module)
    if not keep_allreduce:
        dist.skip_reduction_alone(engine)

    def step(data):
        losses = engine(data)
        engine.backward(losses["loss"])
        engine.step()

    batches = synthetic_batches(steps + 2, batch, preset.image_size, preset.context_length, engine.device)
    return {"step_s": _timed_steps(step, batches, engine.device, warmup=2),
            "n_params": sum(p.numel() for p in model.parameters()),
            "plan": {k: getattr(plan, k) for k in ("precision", "zero_stage", "optimizer", "micro_batch")},
            "overrides": {**overrides, **({ONE_RANK_ALLREDUCE: True} if keep_allreduce else {}),
                          **({TORCH_AUTOCAST: True} if autocast else {})}}


def worker(args) -> None:
    """One side of one case in this process: JSON on stdout's last line."""
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    preset, batch = args.case.split(":")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if args.worker == "ours":
        out = run_ours(preset, int(batch), args.steps, args.precision, device, parse_variant(args.variant)[1])
    else:
        plan, _, _ = plan_for(preset, int(batch), args.steps, args.precision)
        out = run_open_clip(preset, int(batch), args.steps, plan.precision, plan.lr, plan.betas, plan.eps,
                            plan.weight_decay, device)
    out["peak_memory_gb"] = (torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda"
                             else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9)  # KiB on Linux
    print(json.dumps(out), flush=True)


def counted_flops(module: torch.nn.Module, *inputs) -> int:
    """FLOPs of one forward per sample, counted with gradients on and the module in training
    mode: in eval mode without gradients torch's MultiheadAttention (open_clip's towers) takes
    a fused path whose matrix multiplies the counter does not see."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    module.train()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return counter.get_total_flops() // inputs[0].shape[0]


def forward_flops(preset_name: str) -> dict:
    """Forward FLOPs of one sample through each side's towers, counted the same way, both built
    on the meta device (ViT-H/14's billion parameters need no memory to be counted)."""
    from engine.data.text import ClipTokenizer
    from engine.models.two_tower import TwoTower
    from engine.objectives.method import lookup

    # The towers alone, no plan: this machine need not be able to train them to count them.
    preset = lookup("clip", preset_name).preset
    tokenizer = ClipTokenizer(preset.context_length)
    with torch.device("meta"):
        ours = TwoTower(preset, tokenizer.eot_id, tokenizer.sot_id)
    theirs = build_open_clip(preset_name, device="meta")
    images = torch.zeros(2, 3, preset.image_size, preset.image_size, device="meta")
    tokens = torch.zeros(2, preset.context_length, dtype=torch.long)
    tokens[:, 0], tokens[:, -1] = tokenizer.sot_id, tokenizer.eot_id
    tokens = tokens.to("meta")
    return {"ours": {"image": counted_flops(ours.image, images), "text": counted_flops(ours.text, tokens)},
            "open_clip": {"image": counted_flops(theirs.visual, images),
                          "text": counted_flops(TextOnly(theirs), tokens)}}


class TextOnly(torch.nn.Module):
    """open_clip's text tower as a module of its own: encode_text."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens):
        return self.model.encode_text(tokens)


def side(case: str, name: str, args) -> dict:
    """One process of one side: `name` is open_clip or one of --ours' variants."""
    worker = "open_clip" if name == "open_clip" else "ours"
    command = [sys.executable, __file__, "--worker", worker, "--case", case, "--steps", str(args.steps)]
    if worker == "ours":
        command += ["--variant", next(v for v in args.ours if parse_variant(v)[0] == name)]
    if args.precision:
        command += ["--precision", args.precision]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} {case} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(case: str, args) -> dict:
    from engine.observe.flops import TRAINING_PER_FORWARD, peak_tflops

    preset, batch = case.split(":")
    flops = forward_flops(preset)
    names = ["open_clip", *(parse_variant(v)[0] for v in args.ours)]
    rounds = {name: [] for name in names}
    for index in range(args.rounds):   # alternate which side goes first
        for name in (names if index % 2 == 0 else names[::-1]):
            rounds[name].append(side(case, name, args))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    row = {"case": case, "device": device, "forward_flops_per_sample": flops}
    for name, runs in rounds.items():
        step_s = statistics.median(t for run in runs for t in run["step_s"])
        samples_per_s = int(batch) / step_s
        counted = flops["open_clip" if name == "open_clip" else "ours"]
        training_flops = TRAINING_PER_FORWARD * (counted["image"] + counted["text"])
        tflops = training_flops * samples_per_s / 1e12
        precision = runs[0].get("plan", {}).get("precision", args.precision or "fp32")
        peak = peak_tflops(device, args.precision or precision)
        row[name] = {"n_params": runs[0]["n_params"], "step_s_median": step_s, "samples_per_s": samples_per_s,
                     "peak_memory_gb": max(run["peak_memory_gb"] for run in runs), "tflops_per_s": tflops,
                     "mfu": None if peak is None else tflops / peak,
                     "step_s_all": [t for run in runs for t in run["step_s"]],
                     **({"plan": runs[0]["plan"], "overrides": runs[0]["overrides"]} if "plan" in runs[0] else {})}
    # Each variant of ours against open_clip; the first one is the summary's.
    for name in names[1:]:
        row[name]["ratio_samples_per_s"] = row[name]["samples_per_s"] / row["open_clip"]["samples_per_s"]
        row[name]["ratio_peak_memory"] = row[name]["peak_memory_gb"] / row["open_clip"]["peak_memory_gb"]
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES),
                        help=f"PRESET:GLOBAL_BATCH, PRESET one of {', '.join(OPEN_CLIP_MODEL)}")
    parser.add_argument("--precision", choices=["bf16", "fp32"], help="default: the planner's (fp32 on a CPU)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per process (after 2 warm-up steps)")
    parser.add_argument("--rounds", type=int, default=2, help="processes per side, alternating")
    parser.add_argument("--ours", nargs="+", default=["plan"], metavar="LABEL[:DIAL=VALUE,...]",
                        help="settings of ours to run, each against open_clip: the plan's own (a label alone) "
                        "or with dials overridden, e.g. plan zero1:zero_stage=1 fused:optimizer=torch_fused "
                        "(a lever measured on and off; keep_one_rank_allreduce=true, not a dial, keeps DeepSpeed's "
                        "all-reduce over one rank; torch_autocast=true, not a dial either, trains fp32 weights "
                        "under DeepSpeed's bf16 autocast); the first is the summary's 'ours'")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/vs_openclip_{cpu,cuda}.json")
    parser.add_argument("--worker", choices=["ours", "open_clip"], help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="plan", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0
    out = Path(args.out or f"benchmarks/results/vs_openclip_{'cuda' if torch.cuda.is_available() else 'cpu'}.json")
    labels = [parse_variant(v)[0] for v in args.ours]
    reserved = {"open_clip", "case", "device", "forward_flops_per_sample"}   # the other keys of a result row
    if len(set(labels)) != len(labels) or reserved & set(labels):
        parser.error(f"--ours: give each setting its own label (none of {', '.join(sorted(reserved))}): "
                     f"{', '.join(labels)}")
    rows = []
    for case in args.cases:
        if case.split(":")[0] not in OPEN_CLIP_MODEL or ":" not in case:
            parser.error(f"--cases {case}: give PRESET:GLOBAL_BATCH with PRESET one of {', '.join(OPEN_CLIP_MODEL)}")
        row = compare(case, args)
        rows.append(row)
        ours = row[labels[0]]
        print(f"{case}: params ours {ours['n_params']:,} open_clip {row['open_clip']['n_params']:,}; "
              f"forward GFLOPs/sample ours {sum(row['forward_flops_per_sample']['ours'].values()) / 1e9:.4g} "
              f"open_clip {sum(row['forward_flops_per_sample']['open_clip'].values()) / 1e9:.4g}; samples/s ours "
              f"({labels[0]}) {ours['samples_per_s']:.3g} open_clip {row['open_clip']['samples_per_s']:.3g} "
              f"(x{ours['ratio_samples_per_s']:.2f}); peak memory x{ours['ratio_peak_memory']:.2f}", flush=True)
        for label in labels[1:]:
            print(f"  {label} {args.ours[labels.index(label)]}: samples/s {row[label]['samples_per_s']:.3g} "
                  f"(x{row[label]['ratio_samples_per_s']:.2f} open_clip), peak memory "
                  f"x{row[label]['ratio_peak_memory']:.2f}", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                                   "steps": args.steps, "rounds": args.rounds, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
