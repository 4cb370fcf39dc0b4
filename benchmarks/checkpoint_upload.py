"""Steps taken while a checkpoint is copied to the object store, against steps without a copy.

Target (issue 30, item 3): a step taken during an upload takes at most 1.2x a normal step. Two
runs of the same command in one sitting, as a user runs them (`deepspeed launchers/pretrain.py`,
one rank, `--log-every 1` so that every step's time is a line of metrics.jsonl):

  * local: `--out DIR`, the checkpoints written to disk only;
  * store: `--out s3://...` against a moto S3-API server this script starts on 127.0.0.1,
    each checkpoint copied in the background (engine/train/run_store.py). The server stands
    for a store on other machines; on this machine it shares the run's cores, so it runs at the
    lowest priority (`--store-nice 0` to run it as the run).

The store run logs `perf/upload_in_flight` on every line: 1 where its copy was still going on
when the step ended. Those steps are compared with the store run's other steps (the same run)
and with the same steps of the local run (the same steps, no copy). A checkpoint's own writing
is not step time in either run (the throughput hook restarts its clock after it).

    python benchmarks/checkpoint_upload.py      # ViT-B/32, 1.8 GB checkpoints, ~6 min on 2 cores
"""
import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BUCKET = "clipzero-bench"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


def start_store(log: Path, nice: int) -> tuple[subprocess.Popen, str]:
    from engine.dist import free_port

    command = Path(sys.executable).with_name("moto_server")
    if not command.exists():
        sys.exit("moto_server not found: pip install -e '.[test]' (moto[server])")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    # The server stands for a store on other machines: here it shares the training's cores, so
    # it runs at the lowest priority (the copying thread of the run is lowered the same way).
    process = subprocess.Popen(["nice", "-n", str(nice), str(command), "-H", "127.0.0.1", "-p", str(port)],
                               stdout=open(log, "w"), stderr=subprocess.STDOUT)
    for _ in range(600):
        try:
            urllib.request.urlopen(endpoint, timeout=2).close()
            break
        except OSError:
            time.sleep(0.1)
    import boto3

    boto3.client("s3", endpoint_url=endpoint, **{k.lower(): v for k, v in CREDENTIALS.items()
                                                  if k != "AWS_DEFAULT_REGION"},
                 region_name=CREDENTIALS["AWS_DEFAULT_REGION"]).create_bucket(Bucket=BUCKET)
    return process, endpoint


def train(args, out: str, env: dict, log: Path) -> float:
    from engine.dist import free_port

    command = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "1", "--master_port", str(free_port()),
               str(ROOT / "launchers" / "pretrain.py"), "--model", args.model, "--global-batch", str(args.global_batch),
               "--steps", str(args.steps), "--checkpoint-every", str(args.checkpoint_every),
               "--eval-every", str(args.steps), "--log-every", "1", "--out", out]
    started = time.perf_counter()
    with open(log, "w") as output:
        result = subprocess.run(command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} exited {result.returncode}: see {log}")
    return time.perf_counter() - started


def step_lines(metrics: Path) -> dict[int, dict]:
    return {row["step"]: row for row in map(json.loads, metrics.read_text().splitlines())
            if "time/step_s" in row}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit-b-32")
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--checkpoint-every", type=int, default=10)
    parser.add_argument("--store-nice", type=int, default=19, help="niceness of the S3 server (0: as the run)")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "checkpoint_upload_cpu.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="clipzero-upload-bench-"))
    server, endpoint = start_store(work / "moto.log", args.store_nice)
    try:
        env = {**os.environ, **CREDENTIALS, "S3_ENDPOINT_URL": endpoint}
        local_s = train(args, str(work / "local"), env, work / "local.log")
        store_s = train(args, f"s3://{BUCKET}/run", {**env, "TMPDIR": str(work)}, work / "store.log")
        local = step_lines(work / "local" / "metrics.jsonl")
        store = step_lines(next(work.glob("clipzero-staging/*")) / "metrics.jsonl")
        said = [line.strip() for line in (work / "store.log").read_text().splitlines()
                if "reached s3://" in line or "waited" in line]
    finally:
        server.terminate()
        server.wait()
    # The first steps after the start warm up (allocations, the loader's first batches).
    steps = [s for s in sorted(store) if s > 2 and s in local]
    during = [s for s in steps if store[s].get("perf/upload_in_flight") == 1.0]
    normal = [s for s in steps if store[s].get("perf/upload_in_flight") == 0.0]
    if not during:
        sys.exit("no step overlapped an upload: use a larger --model or a shorter step (--global-batch)")

    def median(rows, chosen):
        return statistics.median(rows[s]["time/step_s"] for s in chosen)

    figures = {
        "steps_during_upload": during,
        "upload_s": [store[s]["time/upload_s"] for s in sorted(store) if "time/upload_s" in store[s]],
        "step_s_during_upload": median(store, during),
        "step_s_other_steps_same_run": median(store, normal),
        "step_s_same_steps_local_run": median(local, during),
        "ratio_during_vs_other_steps": median(store, during) / median(store, normal),
        "ratio_during_vs_local_run": median(store, during) / median(local, during),
        "run_s": {"local": local_s, "store": store_s},
        "store_run_said": said,
    }
    record = {"machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
              "args": vars(args), "figures": figures}
    Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    print(f"{len(during)} steps overlapped an upload" + (f" (copies of {', '.join(f'{u:.1f}' for u in figures['upload_s'])} s)"
                                                          if figures["upload_s"] else ""))
    print(f"median step: {figures['step_s_during_upload']:.3f} s during an upload, "
          f"{figures['step_s_other_steps_same_run']:.3f} s on the run's other steps, "
          f"{figures['step_s_same_steps_local_run']:.3f} s on the same steps of the local run")
    print(f"ratio during / other steps: {figures['ratio_during_vs_other_steps']:.2f}; "
          f"during / local run: {figures['ratio_during_vs_local_run']:.2f} (target <= 1.2)")
    print("\n".join(said))
    print(f"written to {args.json}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
