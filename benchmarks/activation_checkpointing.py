"""Activation checkpointing on the CPU: one training step's peak memory and time with the towers'
blocks recomputed in the backward (engine/models/activation_checkpointing.py) and without, at
ViT-B/16 and ViT-L/14 (timm's vit_large_patch14_clip_224 with CLIP's base text tower), one
micro-batch each, CLIP's objective.

Each side of each model runs in a fresh subprocess, and the sides alternate (off, on, then on,
off for the next round or the next model), so that a load that changes on this shared machine falls on both. A
step is the training loop's plain step (engine/train/step.py) on one micro-batch through the
`Engine` adapter of benchmarks/accumulation.py: forward, backward, and an optimizer step that is
a no-op. The weights, the parameter gradients (zeroed between steps, not freed) and the
optimizer's states are the same on both sides, so what differs, and is measured, is what the
step allocates on top of them: the activations kept for the backward and the backward's
temporaries. The step's time leaves out the optimizer's update, also the same on both sides, so
the time ratio is an upper bound.

Memory is the process's resident size as Linux counts it (VmHWM, its peak, in /proc/self/status),
not torch's allocator (the CPU allocator keeps no statistics). After a warm-up step on 2 samples,
which brings in what the libraries set up once, the peak is reset to the resident size
(/proc/self/clear_refs) and "step MiB" is its growth over that baseline (gradients included in
the baseline) during a warm-up step
and --repeats timed ones. glibc's mmap threshold is fixed at 128 KiB in the subprocess
(MALLOC_MMAP_THRESHOLD_), so every tensor over that size is its own mapping, returned to the
system when freed: the resident size then follows the live tensors, and a step's peak is its
largest set of live activations. "peak MiB" is the whole process's peak (weights
and libraries included) for reference. Seconds is the median of the timed steps, in wall time
and in the process's CPU time: on a machine others load, a process waits for a core at times
that its CPU time does not count, so the CPU-time ratio is the steadier one there (with both
threads busy in every kernel, it follows the work done).

The plan's memory model takes its factor from the step-memory ratio measured here
(engine/plan/memory.py, CHECKPOINTED_ACTIVATION_FRACTION).

    python benchmarks/activation_checkpointing.py [--cases vit-b-16:16 vit_large_patch14_clip_224:8
        --precision bf16 --repeats 1 --rounds 2]   # the committed figures; --rounds 1 by default
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.accumulation import build_task, train_step  # noqa: E402
from benchmarks.loss import _cpu_name, _status_kib  # noqa: E402

SIDES = ("off", "on")
DEFAULT_CASES = ("vit-b-16:16", "vit_large_patch14_clip_224:8")
# Every allocation over 128 KiB its own mapping, unmapped when freed (see the docstring).
MMAP_THRESHOLD = 128 * 1024


def run_side(model_name: str, micro: int, side: str, precision: str, repeats: int) -> dict:
    """In the subprocess: a warm-up step on 2 samples, the peak reset, then 1 + `repeats` steps."""
    import gc

    import torch

    task, batch = build_task("clip", model_name, micro)
    task.train()
    task.model.checkpoint_activations(side == "on")
    # The plan's bf16 on one CPU rank: fp32 weights, the towers under bf16 autocast.
    task.model.autocast_dtype = torch.bfloat16 if precision == "bf16" else None
    train_step("full", task, {name: x[:2] for name, x in batch.items()}, 1)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    base_kib = _status_kib("VmRSS")
    times, cpu_times, losses = [], [], []
    for _ in range(1 + repeats):
        # Zeroed, not freed: the gradients, the same on both sides, stay in the baseline, so that
        # the step's growth is the activations alone, what checkpointing acts on.
        task.zero_grad(set_to_none=False)
        start, cpu_start = time.perf_counter(), time.process_time()
        losses.append(float(train_step("full", task, batch, 1)["loss"]))
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return dict(model=model_name, micro_batch=micro, side=side, precision=precision, status="ok",
                threads=torch.get_num_threads(), loss_first_step=losses[0],
                n_params=sum(p.numel() for p in task.model.parameters()),
                step_mib=(_status_kib("VmHWM") - base_kib) / 1024, baseline_mib=base_kib / 1024,
                peak_mib=_status_kib("VmHWM") / 1024,
                seconds=statistics.median(times[1:]), seconds_all=times,
                cpu_seconds=statistics.median(cpu_times[1:]), cpu_seconds_all=cpu_times)


def _in_subprocess(model_name: str, micro: int, side: str, args) -> dict:
    command = [sys.executable, __file__, "--side", model_name, str(micro), side, args.precision,
               str(args.repeats)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        why = (result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[-1]
        return dict(model=model_name, micro_batch=micro, side=side, status="failed", why=why)
    return json.loads(lines[-1])


def summarise(rows: list[dict]) -> dict:
    """Per side, the median over rounds; then on / off."""
    ok = [r for r in rows if r["status"] == "ok"]
    sides = {side: [r for r in ok if r["side"] == side] for side in SIDES}
    if not all(sides.values()):
        return dict(status="failed")
    median = {side: {key: statistics.median(r[key] for r in runs) for key in ("step_mib", "peak_mib", "seconds", "cpu_seconds")}
              for side, runs in sides.items()}
    return dict(status="ok", off=median["off"], on=median["on"],
                step_memory_ratio=median["on"]["step_mib"] / median["off"]["step_mib"],
                peak_memory_ratio=median["on"]["peak_mib"] / median["off"]["peak_mib"],
                time_ratio=median["on"]["seconds"] / median["off"]["seconds"],
                cpu_time_ratio=median["on"]["cpu_seconds"] / median["off"]["cpu_seconds"],
                loss_difference=max(abs(a["loss_first_step"] - b["loss_first_step"])
                                    for a in sides["off"] for b in sides["on"]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), metavar="MODEL:MICRO_BATCH")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32"),
                        help="bf16: the plan's choice for these models on a CPU with AVX512-BF16 or AMX")
    parser.add_argument("--repeats", type=int, default=1, help="timed steps after one warm-up, per process")
    parser.add_argument("--rounds", type=int, default=1, help="pairs of processes per model, sides alternating")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/activation_checkpointing_cpu.json"))
    parser.add_argument("--side", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        model_name, micro, side, precision, repeats = args.side
        print(json.dumps(run_side(model_name, int(micro), side, precision, int(repeats))))
        return

    import torch

    started = time.perf_counter()
    report = dict(device=_cpu_name(), cores=os.cpu_count(), torch=torch.__version__,
                  precision=args.precision, repeats=args.repeats, rounds=args.rounds,
                  malloc_mmap_threshold=MMAP_THRESHOLD, models=[])
    print(f"{report['device']}, {report['cores']} cores, torch {report['torch']}, {args.precision}")
    for index, case in enumerate(args.cases):
        model_name, micro = case.rsplit(":", 1)
        entry = dict(model=model_name, micro_batch=int(micro), load_average_before=os.getloadavg(), runs=[])
        for round_ in range(args.rounds):
            # off, on, then on, off (by round, and from one model to the next): each side runs
            # first as often as the other.
            for side in SIDES if (index + round_) % 2 == 0 else SIDES[::-1]:
                row = _in_subprocess(model_name, int(micro), side, args)
                row["load_average_before"] = os.getloadavg()
                entry["runs"].append(row)
                print(f"  {model_name} x{micro} {side:>3}: " + (
                    f"step {row['step_mib']:8.0f} MiB, peak {row['peak_mib']:8.0f} MiB, {row['seconds']:7.2f} s, "
                    f"{row['cpu_seconds']:7.2f} s CPU, "
                    f"load {row['load_average_before'][0]:.2f}" if row["status"] == "ok" else row["why"]), flush=True)
        entry["load_average_after"] = os.getloadavg()
        entry.update(summarise(entry["runs"]))
        report["models"].append(entry)
    report["seconds"] = time.perf_counter() - started
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")

    print(f"\n{'model':>28} {'micro':>5} {'step MiB off/on':>17} {'step mem x':>10} {'peak mem x':>10} "
          f"{'s off/on':>13} {'time x':>6} {'CPU time x':>10}")
    for entry in report["models"]:
        if entry["status"] != "ok":
            print(f"{entry['model']:>28} {entry['micro_batch']:>5}  failed")
            continue
        off, on = entry["off"], entry["on"]
        print(f"{entry['model']:>28} {entry['micro_batch']:>5} {off['step_mib']:8.0f}/{on['step_mib']:<8.0f} "
              f"{entry['step_memory_ratio']:10.2f} {entry['peak_memory_ratio']:10.2f} "
              f"{off['seconds']:6.2f}/{on['seconds']:<6.2f} {entry['time_ratio']:6.2f} {entry['cpu_time_ratio']:10.2f}")
    print(f"wrote {args.out} in {report['seconds']:.0f} s")


if __name__ == "__main__":
    main()
