"""Every built-in method (CLIP, DeCLIP, CLIP-Lite, SigLIP) on the built-in digits, on 10% and 100% of
the training split.

Every run uses the same number of optimizer steps, global batch, seed and held-out split;
only --method and --data-fraction change. Each run is the plain launcher command a user
would type (printed), so any row can be reproduced on its own.

    python benchmarks/compare_methods.py                      # 8 runs, one rank each
    python benchmarks/compare_methods.py --steps 20 --fractions 0.1   # a quick look
    python benchmarks/compare_methods.py --fractions 1 --precisions fp32 bf16 \
        --out benchmarks/results/compare_precisions_cpu.json   # each method in fp32 and in bf16
"""
import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.objectives.registry import method_names  # noqa: E402


def command(method: str, fraction: float, steps: int, seed: int, out: Path, precision: str | None) -> list[str]:
    return ["deepspeed", "--num_gpus", "1", "launchers/pretrain.py", "--method", method,
            "--data-fraction", str(fraction), "--steps", str(steps), "--seed", str(seed),
            "--out", str(out), *(["--precision", precision] if precision else [])]


def final_metrics(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [row for row in rows if "zeroshot_top1" in row]
    losses = [row for row in rows if "loss" in row]
    return {**evals[-1], "final_loss": losses[-1]["loss"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=110,
                        help="optimizer steps per run (default: the smoke run's 110, 10 epochs of the full split at batch 128)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 1.0])
    parser.add_argument("--methods", nargs="+", default=method_names())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precisions", nargs="+", default=[None], choices=["fp32", "bf16"],
                        help="run each method in each (default: the plan's precision)")
    parser.add_argument("--runs", default="runs/compare", help="where the run directories go")
    parser.add_argument("--out", default="benchmarks/results/compare_methods_cpu.json")
    args = parser.parse_args()

    results = []
    for fraction in args.fractions:
        for method in args.methods:
            for precision in args.precisions:
                suffix = f"-{precision}" if precision else ""
                run_dir = Path(args.runs) / f"{method}-frac{fraction:g}-steps{args.steps}-seed{args.seed}{suffix}"
                cmd = command(method, fraction, args.steps, args.seed, run_dir, precision)
                print("$ " + " ".join(cmd), flush=True)
                started = time.perf_counter()
                done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
                if done.returncode != 0:
                    print(done.stdout[-3000:], done.stderr[-3000:], file=sys.stderr)
                    return done.returncode
                metrics = final_metrics(ROOT / run_dir)
                planned = json.loads((ROOT / run_dir / "plan.json").read_text())
                results.append(dict(method=method, data_fraction=fraction, precision=planned["precision"],
                                    zero_stage=planned["zero_stage"], steps=args.steps, seed=args.seed,
                                    command=" ".join(cmd), wall_s=round(time.perf_counter() - started, 1),
                                    zeroshot_top1=metrics["zeroshot_top1"],
                                    retrieval_i2t_r1=metrics["retrieval_i2t_r1"],
                                    retrieval_t2i_r1=metrics["retrieval_t2i_r1"],
                                    final_loss=metrics["final_loss"]))
                print(json.dumps(results[-1]), flush=True)

    print("\n| method | data | precision | zero-shot top-1 | i2t R@1 | t2i R@1 | final loss | wall |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['method']} | {r['data_fraction']:.0%} | {r['precision']} | {r['zeroshot_top1']:.3f} | "
              f"{r['retrieval_i2t_r1']:.3f} | {r['retrieval_t2i_r1']:.3f} | {r['final_loss']:.4f} | {r['wall_s']:.0f} s |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                          "runs": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
