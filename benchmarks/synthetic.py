"""Scale evidence on synthetic pairs: conversion speed, and a short run that learns.

Issue 14 asks for 1M synthetic pairs converted, with pairs/s on 2 cores at `--workers 1` and
`2`, and for a run of a few hundred steps on such data that learns, its retrieval R@1 set
against chance. This script does both with the user's commands, in one go:

  * `launchers/convert.py --synthetic N OUT --workers 1`, then `--workers 2` into another
    folder; the pairs/s come from each run's `convert_report.json`, and every file the two
    wrote is compared byte for byte (the dataset must not depend on the worker count);
  * `launchers/convert.py --synthetic 1000 --seed 1 EVAL`, a held-out set of another seed;
  * `deepspeed --num_gpus 1 launchers/pretrain.py --data OUT --eval-data EVAL --steps S`, and
    the held-out evaluations its metrics.jsonl records.

    python benchmarks/synthetic.py                    # 1M pairs: ~7 GB in /tmp, ~15 min on 2 cores
    python benchmarks/synthetic.py --pairs 20000 --steps 40 --out /tmp/synthetic.json   # a quick look
"""
import argparse
import filecmp
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.versions import versions  # noqa: E402

EVAL_PAIRS = 1000
CLASSES = 24  # the synthetic captions' first shape: 6 colours x 4 kinds (engine/data/convert/synthetic.py)


def convert(out: Path, pairs: int, workers: int, seed: int = 0) -> dict:
    command = [sys.executable, "launchers/convert.py", "--synthetic", str(pairs), str(out),
               "--workers", str(workers), "--seed", str(seed)]
    print("$ " + " ".join(command[1:]), flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"conversion failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    report = json.loads((out / "convert_report.json").read_text())
    return {"command": f"python launchers/convert.py --synthetic {pairs} OUT --workers {workers}",
            **{key: report[key] for key in ("written", "shards", "bytes")},
            "seconds": round(time.perf_counter() - started, 1), "pairs_per_s": report["pairs_per_s"]}


def shards_in_order(root: Path) -> list[Path]:
    index = json.loads((root / "index.json").read_text())
    return [root / shard["raw_data"]["basename"] for shard in index["shards"]]


def differing_shards(one: Path, other: Path) -> list[str]:
    """The shards, in the merged index's order, whose bytes differ between two conversions.

    Which part-NNNNN folder holds a block depends on the worker that wrote it; the dataset, the
    shards in index order, must not."""
    ones, others = shards_in_order(one), shards_in_order(other)
    if len(ones) != len(others):
        return [f"{len(ones)} shards against {len(others)}"]
    return [f"{a.relative_to(one)} != {b.relative_to(other)}" for a, b in zip(ones, others)
            if not filecmp.cmp(a, b, shallow=False)]


def learning_run(data: Path, eval_data: Path, steps: int, out: Path, env: dict) -> dict:
    from benchmarks.scale import pretrain

    rows, seconds, _ = pretrain(1, ["--data", str(data), "--eval-data", str(eval_data), "--steps", str(steps)],
                                out, env)
    evaluations = [{key: value for key, value in row.items() if key == "step" or "_r" in key or "top" in key}
                   for row in rows if "retrieval_i2t_r1" in row]
    if not evaluations:
        raise SystemExit(f"the run logged no held-out evaluation in {out / 'metrics.jsonl'}")
    return {"command": f"deepspeed --num_gpus 1 launchers/pretrain.py --data SYNTHETIC --eval-data "
                       f"SYNTHETIC_EVAL --steps {steps}",
            "eval_data": f"python launchers/convert.py --synthetic {EVAL_PAIRS} --seed 1 SYNTHETIC_EVAL "
                         f"({EVAL_PAIRS:,} pairs, {CLASSES} classes)",
            "wall_s": seconds, "evaluations": evaluations,
            "chance": {"retrieval_r1": 1 / EVAL_PAIRS, "zeroshot_top1": 1 / CLASSES}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=1_000_000)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--dir", default="/tmp/clipzero-synthetic", help="scratch space for the datasets and run")
    parser.add_argument("--out", default="benchmarks/results/synthetic_1m_cpu.json")
    args = parser.parse_args()

    scratch = Path(args.dir)
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    env = dict(os.environ, CLIPZERO_CACHE=str(scratch / "cache"))
    one, two, held_out = scratch / "workers-1", scratch / "workers-2", scratch / "eval"
    try:
        conversion = {"workers_1": convert(one, args.pairs, 1), "workers_2": convert(two, args.pairs, 2)}
        print(conversion, flush=True)
        differ = differing_shards(one, two)
        if differ:
            raise SystemExit(f"--workers 1 and 2 wrote different datasets: {differ[:10]}")
        shards = conversion["workers_1"]["shards"]
        conversion["outputs_identical"] = f"all {shards} shards byte for byte equal between --workers 1 and 2"
        shutil.rmtree(two)
        convert(held_out, EVAL_PAIRS, 1, seed=1)
        run = learning_run(one, held_out, args.steps, scratch / "run", env)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result = {"machine": {"cores": os.cpu_count(), "gpu": None, **versions("torch", "deepspeed", "dali", "streaming")},
              "pairs": args.pairs, "conversion": conversion,
              "learning_run": run}
    last = run["evaluations"][-1]
    print(f"{args.pairs:,} pairs: {conversion['workers_1']['pairs_per_s']:,.0f} pairs/s with 1 worker, "
          f"{conversion['workers_2']['pairs_per_s']:,.0f} with 2; after {last['step']} steps image->text R@1 "
          f"{last['retrieval_i2t_r1']:.3f}, text->image {last['retrieval_t2i_r1']:.3f} (chance {1 / EVAL_PAIRS:.3f}), "
          f"zero-shot top-1 {last.get('zeroshot_top1', float('nan')):.3f} (chance {1 / CLASSES:.3f})")
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
