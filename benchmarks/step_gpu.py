"""One GPU: the planner's choices, run for real through DeepSpeed, on synthetic batches.

For each method x model: resolve the plan on this machine (precision, optimizer, ZeRO stage,
the micro-batch the recipe's 80 GB anchor gives), build ModelWithLoss + DeepSpeed exactly as
`engine.training_run` does, and time optimizer steps at a ladder of micro-batches, recording
peak memory. Shows whether the anchors in engine/objectives/recipes.py fit and how much room is left.
Data loading (DALI, streaming) is left out: the batches are random tensors on the device.

    python benchmarks/step_gpu.py --out benchmarks/results/step_gpu.json
    python benchmarks/step_gpu.py --methods clip --models debug --micro 8 --steps 3   # smoke
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def synthetic_batch(objective, micro: int, image_size: int, context: int, device) -> dict:
    from engine.data.mlm import IGNORE_INDEX, MASK_ID

    def tokens():
        rows = torch.zeros(micro, context, dtype=torch.long)
        length = torch.randint(3, context - 1, (micro,))
        for i, n in enumerate(length.tolist()):
            rows[i, 0], rows[i, 1:n] = 49406, torch.randint(1, 49000, (n - 1,))
            rows[i, n] = 49407
        return rows

    batch = {"image": torch.randn(micro, 3, image_size, image_size), "text": tokens()}
    if objective.image_views == 2:
        batch["image2"] = torch.randn_like(batch["image"])
    if objective.text_aug:
        batch["text_aug"] = tokens()
    if objective.mlm:
        chosen = (torch.rand(micro, context) < 0.15) & (batch["text"] > 0) & (batch["text"] < 49406)
        batch["mlm_labels"] = torch.where(chosen, batch["text"], IGNORE_INDEX)
        batch["text"] = torch.where(chosen, MASK_ID, batch["text"])
    return {k: v.to(device) for k, v in batch.items()}


def measure(method: str, model_name: str, micro: int, steps: int, adam: str | None) -> dict:
    import deepspeed

    from engine.data.text import ClipTokenizer
    from engine.plan.deepspeed_config import render
    from engine.plan.hardware import probe
    from engine.objectives.method import lookup
    from engine.models.two_tower import TwoTower, count_parameters
    from engine.plan.dials import Dials
    from engine.plan.optimizer import probe_optimizer_support
    from engine.plan.resolve import resolve
    from engine.model_with_loss import ModelWithLoss, align_buffer_dtypes
    from engine.train.optim import optimizer_for_plan

    found = lookup(method, model_name)
    preset, recipe = found.preset, found.recipe
    tokenizer = ClipTokenizer(preset.context_length)
    hw = probe()
    n_params = count_parameters(preset, tokenizer.eot_id, tokenizer.sot_id)
    adam_choice = adam if recipe.optimizer == "adamw" else None
    plan = resolve(Dials(method=method, model=model_name, global_batch=micro, micro_batch=micro,
                         steps=steps + 10, optimizer=adam_choice), hw, found, n_params=n_params, dataset_size=10**7,
                   optimizer_support=probe_optimizer_support(hw), image_size=preset.image_size,
                   text_layers=preset.text_layers, wordnet=None)
    torch.manual_seed(0)
    model = TwoTower(preset, tokenizer.eot_id, tokenizer.sot_id)
    objective = found.build_objective(model, dict(plan.objective_options), plan.seed)
    task = ModelWithLoss(model, objective)
    optimizer = optimizer_for_plan(task, plan)
    engine, *_ = deepspeed.initialize(model=task, optimizer=optimizer, config=render(plan))
    align_buffer_dtypes(engine.module)
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for step in range(steps + 2):  # two warm-up steps (allocator, cuDNN autotune) not timed
        batch = synthetic_batch(objective, micro, preset.image_size, preset.context_length, engine.device)
        torch.cuda.synchronize()
        started = time.perf_counter()
        out = engine(batch)
        engine.backward(out["loss"])
        engine.step()
        torch.cuda.synchronize()
        if step >= 2:
            times.append(time.perf_counter() - started)
            losses.append(out["loss"].item())
    median = sorted(times)[len(times) // 2]
    result = dict(method=method, model=model_name, micro_batch=micro, precision=plan.precision,
                  optimizer=plan.optimizer, zero_stage=plan.zero_stage, n_params=n_params,
                  anchor_micro_batch_80gb=recipe.micro_batch_80gb,
                  step_s_median=median, samples_per_s=micro / median,
                  peak_memory_gb=torch.cuda.max_memory_allocated() / 1e9,
                  device_memory_gb=hw.device_memory_bytes / 1e9,
                  losses=losses, finite=all(map(lambda x: x == x and abs(x) != float("inf"), losses)))
    engine.destroy()
    del engine, task, model, optimizer
    torch.cuda.empty_cache()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["clip", "declip", "clip-lite"])
    parser.add_argument("--models", nargs="+", default=["rn50", "vit-b-32"])
    parser.add_argument("--micro", nargs="+", type=int, default=[64, 128, 256])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--adam", default="torch_fused",
                        help="AdamW implementation for AdamW recipes (default torch_fused: no JIT build; "
                             "'auto' lets the planner choose)")
    parser.add_argument("--out", default="benchmarks/results/step_gpu.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("step_gpu.py needs a CUDA GPU", file=sys.stderr)
        return 2
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", "29511"))
    import deepspeed
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.init_distributed(verbose=False)
    rows = []
    for method in args.methods:
        for model_name in args.models:
            if method == "clip-lite" and model_name != "rn50" and model_name != "debug":
                continue  # CLIP-Lite's paper recipe exists for ResNet-50 only
            for micro in args.micro:
                try:
                    row = measure(method, model_name, micro, args.steps,
                                  None if args.adam == "auto" else args.adam)
                except torch.OutOfMemoryError as error:
                    row = dict(method=method, model=model_name, micro_batch=micro, oom=str(error)[:200])
                    torch.cuda.empty_cache()
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
                write(args.out, rows)  # after every row: a run cut short keeps what it measured
    return 0


def write(path: str, rows: list[dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "note": "synthetic batches on the device; one rank; plan resolved on this machine",
        "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
