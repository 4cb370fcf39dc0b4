"""A 10M-pair dataset against the built-in one: time to the first batch, and memory per rank.

Targets (issue 14): the first batch of a 10M-pair dataset in under 30 s, and under 1 GB more
resident memory per rank after 100 steps than a run on the built-in data. Both datasets are
measured the same way in one run of this script:

  * time to the first batch: a fresh process builds the TrainLoader (reading the index,
    laying out streaming's shared memory, shuffling the epoch) and takes one batch;
  * memory: `deepspeed --num_gpus 2 launchers/pretrain.py --data D --steps 100`, and the peak
    resident memory of rank 0 that the run logs (`memory/max_rss_gb` in metrics.jsonl).

The large dataset's images are tiny (16 px JPEGs drawn from a pool, each pair with its own
caption): what is measured is the index, the shuffle and the bookkeeping of 10M samples, not
decoding, which does not depend on the dataset's size.

    python benchmarks/scale.py                       # 10M pairs: ~9 GB in /tmp, ~10 min on 2 cores
    python benchmarks/scale.py --pairs 1000000       # a quicker look
"""
import argparse
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FIRST_BATCH = """
import sys, time
started = time.perf_counter()
from engine.data.loader import TrainLoader
from engine.data.spec import DataSpec
from engine.data.text import ClipTokenizer
imported = time.perf_counter()
loader = TrainLoader.from_data(sys.argv[1], micro_batch=128, image_size=32, spec=DataSpec(), seed=0, workers=2,
                               decode_device="cpu", tokenizer=ClipTokenizer(), rank=0, world_size=1)
opened = time.perf_counter()
next(iter(loader))
done = time.perf_counter()
print(f"{imported - started} {opened - imported} {done - opened}")
"""


def write_pairs(out: Path, pairs: int, seed: int = 0) -> float:
    """`pairs` tiny pairs written straight with MDSWriter; returns the seconds it took."""
    from PIL import Image
    from streaming import MDSWriter

    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(1024):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buffer, format="JPEG", quality=50)
        pool.append(buffer.getvalue())
    started = time.perf_counter()
    shutil.rmtree(out, ignore_errors=True)
    with MDSWriter(out=str(out), columns={"jpg": "bytes", "txt": "str"}, size_limit=64 << 20) as writer:
        for index in range(pairs):
            writer.write({"jpg": pool[index % len(pool)], "txt": f"noise picture {index} of {pairs}"})
    return time.perf_counter() - started


def first_batch(data: str, env: dict) -> dict:
    done = subprocess.run([sys.executable, "-c", FIRST_BATCH, data], cwd=ROOT, env=env, capture_output=True,
                          text=True, check=True)
    imports, open_s, batch_s = map(float, done.stdout.split()[-3:])
    return {"imports_s": round(imports, 2), "open_s": round(open_s, 2), "first_batch_s": round(batch_s, 2),
            "to_first_batch_s": round(open_s + batch_s, 2)}


def pretrain(ranks: int, arguments: list[str], out: Path, env: dict) -> tuple[list[dict], float, str]:
    """`deepspeed --num_gpus RANKS launchers/pretrain.py ARGUMENTS --out OUT`: (its metrics.jsonl
    rows, wall seconds, the command without the interpreter's path)."""
    from engine.dist import free_port   # the launcher's default port may be another job's

    command = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(ranks), "--master_port",
               str(free_port()), "launchers/pretrain.py", *arguments, "--out", str(out)]
    print("$ " + " ".join(command), flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"training failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows, round(time.perf_counter() - started, 1), " ".join(command[1:])


def train_memory(data: str | None, steps: int, out: Path, env: dict) -> dict:
    rows, seconds, command = pretrain(2, ["--steps", str(steps), *(["--data", data] if data else [])], out, env)
    logged = [row for row in rows if "memory/max_rss_gb" in row]
    return {"command": command, "wall_s": seconds,
            "rank0_max_rss_gb": round(logged[-1]["memory/max_rss_gb"], 3),
            "samples_per_s": round(float(np.median([row["samples_per_s"] for row in logged[1:] or logged])), 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=10_000_000)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--dir", default="/tmp/clipzero-scale", help="scratch space for the dataset and runs")
    parser.add_argument("--keep", action="store_true", help="keep the dataset for another run")
    parser.add_argument("--out", default="benchmarks/results/scale_cpu.json")
    args = parser.parse_args()

    scratch = Path(args.dir)
    large = scratch / f"pairs-{args.pairs}"
    env = dict(os.environ, CLIPZERO_CACHE=str(scratch / "cache"))
    written_s = None
    if not (large / "index.json").is_file():
        print(f"writing {args.pairs:,} pairs to {large}", flush=True)
        written_s = round(write_pairs(large, args.pairs), 1)
    size_gb = sum(f.stat().st_size for f in large.iterdir()) / 2**30

    from engine.data.embedded import ensure_digits

    builtin = str(ensure_digits(scratch / "cache").train)
    result = {"pairs": args.pairs, "dataset_gb": round(size_gb, 2), "write_s": written_s,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}}
    for name, data in (("builtin", builtin), ("large", str(large))):
        result[f"{name}_first_batch"] = first_batch(data, env)
        print(name, result[f"{name}_first_batch"], flush=True)
    for name, data in (("builtin", None), ("large", str(large))):
        run = scratch / f"run-{name}"
        shutil.rmtree(run, ignore_errors=True)
        result[f"{name}_training"] = train_memory(data, args.steps, run, env)
        print(name, result[f"{name}_training"], flush=True)
    result["extra_rss_gb_per_rank"] = round(result["large_training"]["rank0_max_rss_gb"]
                                            - result["builtin_training"]["rank0_max_rss_gb"], 3)
    print(f"first batch of {args.pairs:,} pairs: {result['large_first_batch']['to_first_batch_s']} s "
          f"(built-in: {result['builtin_first_batch']['to_first_batch_s']} s); extra memory per rank after "
          f"{args.steps} steps: {result['extra_rss_gb_per_rank']} GB")
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if not args.keep:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
