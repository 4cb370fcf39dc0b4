"""--patch-dropout: training samples/s at R against R = 0, and what R costs the digits' zero-shot.

Speed: each side is the launcher command a user types (printed), on the built-in digits (resized
to the model's 224 px), one process, the sides alternating in the same sitting. A run stops at
--stop-at-step, before any evaluation; its metrics.jsonl holds every step's time (--log-every 1)
and the median after the warm-up steps is its step time. The ratio is R's samples/s over R = 0's.

Accuracy: the default vit-debug smoke run (110 steps) at R = 0, at R with FLIP's unmasked tuning
(the plan's default: the last 4 steps), at R without it (--unmasked-steps 0) and at R with a
longer one (--long-tuning), per seed: the held-out zero-shot top-1 of the last evaluation.

    python benchmarks/patch_dropout.py                          # both parts, ViT-B/16 at batch 16
    python benchmarks/patch_dropout.py --skip-accuracy --pairs 3   # a part skipped keeps its figures in --out
"""
import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def command(model: str, rate: float, out: Path, extra: list[str]) -> list[str]:
    dropout = ["--patch-dropout", f"{rate:g}"] if rate else []
    return [sys.executable, "launchers/pretrain.py", "--model", model, *dropout, *extra, "--out", str(out)]


def run(cmd: list[str]) -> float:
    print("$ " + " ".join(cmd[1:]), flush=True)
    started = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def step_times(run_dir: Path, warmup: int) -> list[float]:
    return [r["time/step_s"] for r in rows(run_dir) if "time/step_s" in r and r["step"] > warmup]


def speed(args, scratch: Path) -> dict:
    extra = ["--global-batch", str(args.global_batch), "--steps", "1000", "--stop-at-step", str(args.steps),
             "--log-every", "1"]
    runs = []
    for pair in range(args.pairs):
        for rate in ((0.0, args.rate) if pair % 2 == 0 else (args.rate, 0.0)):   # alternating order
            out = scratch / f"speed-{rate:g}-{pair}"
            load_before = os.getloadavg()
            wall = run(command(args.model, rate, out, extra))
            times = step_times(out, args.warmup)
            runs.append({"rate": rate, "pair": pair, "step_s": times, "median_step_s": statistics.median(times),
                         "samples_per_s": args.global_batch / statistics.median(times), "wall_s": round(wall, 1),
                         "loadavg_before": load_before, "loadavg_after": os.getloadavg()})
            print(f"  R = {rate:g}: median step {runs[-1]['median_step_s']:.2f} s, "
                  f"{runs[-1]['samples_per_s']:.2f} samples/s (load {load_before[0]:.1f})", flush=True)
            shutil.rmtree(out)   # a ViT-B/16 checkpoint is 1.8 GB
    ratios = []
    for pair in range(args.pairs):
        by_rate = {r["rate"]: r["samples_per_s"] for r in runs if r["pair"] == pair}
        ratios.append(by_rate[args.rate] / by_rate[0.0])
    print(f"samples/s at R = {args.rate:g} over R = 0, per pair: {', '.join(f'{x:.2f}' for x in ratios)}; "
          f"median {statistics.median(ratios):.2f}", flush=True)
    return {"model": args.model, "global_batch": args.global_batch, "steps": args.steps,
            "warmup_steps_left_out": args.warmup, "runs": runs, "ratio_per_pair": ratios,
            "ratio_median": statistics.median(ratios)}


def accuracy(args, scratch: Path) -> list[dict]:
    results = []
    for seed in args.seeds:
        for rate, tuning in ((0.0, []), (args.rate, []), (args.rate, ["--unmasked-steps", "0"]),
                             (args.rate, ["--unmasked-steps", str(args.long_tuning)])):
            out = scratch / f"digits-{rate:g}-{'-'.join(tuning[1:]) or 'default'}-{seed}"
            wall = run(command("vit-debug", rate, out, ["--seed", str(seed), *tuning]))
            plan = json.loads((out / "plan.json").read_text())
            last = [r for r in rows(out) if "zeroshot_top1" in r][-1]
            results.append({"seed": seed, "rate": rate, "unmasked_steps": plan["unmasked_steps"],
                            "zeroshot_top1": last["zeroshot_top1"], "retrieval_i2t_r1": last["retrieval_i2t_r1"],
                            "steps": plan["total_steps"], "wall_s": round(wall, 1)})
            print(f"  seed {seed}, R = {rate:g}, unmasked steps {plan['unmasked_steps']}: zero-shot top-1 "
                  f"{last['zeroshot_top1']:.3f}, {wall:.0f} s", flush=True)
            shutil.rmtree(out)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit-b-16")
    parser.add_argument("--rate", type=float, default=0.5)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="steps per speed run (default: 5)")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the median (default: 2)")
    parser.add_argument("--pairs", type=int, default=2, help="R = 0 / R runs, alternating (default: 2)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--long-tuning", type=int, default=22,
                        help="the fourth digits run's --unmasked-steps (default: 22, a fifth of the run)")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--scratch", default="runs/bench-patch-dropout", help="run directories (removed after)")
    parser.add_argument("--out", default="benchmarks/results/patch_dropout_cpu.json")
    args = parser.parse_args()

    scratch, out = Path(args.scratch), Path(args.out)
    # A part skipped keeps the figures --out already holds (the parts may run at different times).
    result = json.loads(out.read_text()) if out.exists() else {}
    result |= {"device": "cpu", "cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
               "torch": torch.__version__, "threads": torch.get_num_threads(),
               "note": "a shared machine: other jobs ran beside these runs; loadavg is recorded before and "
                       "after each run, and the sides alternate so that both meet the same load"}
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    if not args.skip_speed:
        result["speed"] = {"date": date, **speed(args, scratch)}
    if not args.skip_accuracy:
        result["digits_zeroshot"] = {"date": date, "runs": accuracy(args, scratch)}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
