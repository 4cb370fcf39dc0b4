"""Two runs' logged losses side by side, step by step: the "no number changes" check of a refactor.

    deepspeed launchers/pretrain.py --log-every 1 --out /tmp/before    # on the old commit
    deepspeed launchers/pretrain.py --log-every 1 --out /tmp/after     # on the new one
    python tests/compare_losses.py /tmp/before /tmp/after [--tolerance 1e-6] [--name loss]

Reads each run's metrics.jsonl (scalar lines: those without a "kind"), prints one row per step
that both logged, and exits 1 when a step of one is missing from the other or the largest
absolute difference exceeds the tolerance.
"""
import argparse
import json
import sys
from pathlib import Path


def logged(run_dir: Path, name: str) -> dict[int, float]:
    """step -> the value of scalar `name` in the run's metrics.jsonl (the last line wins)."""
    values = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "kind" not in row and name in row:
            values[row["step"]] = row[name]
    return values


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--name", default="loss", help="the scalar to compare (default: loss)")
    parser.add_argument("--tolerance", type=float, default=1e-6)
    args = parser.parse_args(argv)
    before, after = logged(args.before, args.name), logged(args.after, args.name)
    print(f"{'step':>5}  {'before':>12}  {'after':>12}  {'|difference|':>12}")
    worst = 0.0
    for step in sorted(set(before) & set(after)):
        difference = abs(before[step] - after[step])
        worst = max(worst, difference)
        print(f"{step:>5}  {before[step]:>12.7f}  {after[step]:>12.7f}  {difference:>12.2e}")
    missing = sorted(set(before) ^ set(after))
    print(f"{len(set(before) & set(after))} steps compared, largest difference {worst:.2e} "
          f"(tolerance {args.tolerance:g})" + (f"; steps logged by one run only: {missing}" if missing else ""))
    return 1 if missing or worst > args.tolerance or not before else 0


if __name__ == "__main__":
    sys.exit(main())
