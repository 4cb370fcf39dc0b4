"""Conversion throughput per core: s3:// -> s3:// against local -> local, today's and the one before
the object store came (issue 30 asks the store's to be at least that), side by side.

  python benchmarks/convert_store.py            # ~3 minutes; writes results/convert_store_cpu.json

The same source, img2dataset-like webdataset tars of synthetic photos (smooth colour fields plus
noise, JPEG quality 90, one in four portrait, a caption and a .json per sample), is converted by
`launchers/convert.py SRC OUT --workers W` (its main(), in a process of its own each time, timed
from after the imports, which take ~6 s and are the same for both):
  local  SRC a local folder of the tars, OUT a local folder;
  s3     SRC s3://bench/src (the same tars, uploaded), OUT s3://bench/out-K, on moto's S3 server
         (`moto_server`, started here on 127.0.0.1, as in the tests), through the same client
         environment a user sets (S3_ENDPOINT_URL, AWS_*);
  before local -> local by the converter of commit --before (default 14b6020, the last one before
         the object store work began), checked out here in a temporary git worktree and run the same
         way from there.
Runs alternate local, s3 and before, for each W. Figures per run: pairs per wall-clock second, that divided
by W ("per core": one worker is one process on one core), and pairs per CPU-second of the converter
(its process, threads and workers; moto's own CPU time is recorded apart, as on a real deployment the
store runs elsewhere, and moto runs at the lowest priority for the same reason: `--store-nice 0` to
run it as the converter). Reported: the median of the repeats and the ratios s3 / local (>= 1: the
store costs nothing per core) and s3 / before (>= 1: the store's conversion keeps the throughput
per core that conversion had before it). The first s3 dataset is read back with StreamingDataset(remote=...)
and must hold the local dataset's samples in the same order, or the benchmark fails.
"""
import argparse
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BUCKET = "bench"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_DEFAULT_REGION": "us-east-1"}
WORDS = "a photo of the red blue green small large dog cat house tree car on in near with".split()


def write_tars(folder: Path, tars: int, per_tar: int, width: int, height: int) -> dict:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    side = 2 * max(width, height)
    noise = rng.normal(0, 6, size=(side, side, 3)).astype(np.float32)
    folder.mkdir(parents=True)
    sizes = []
    for t in range(tars):
        with tarfile.open(folder / f"{t:05d}.tar", "w") as tar:
            for i in range(per_tar):
                w, h = (height, width) if i % 4 == 3 else (width, height)
                corners = rng.integers(0, 256, size=(3, 4, 3), dtype=np.uint8)
                field = np.asarray(Image.fromarray(corners).resize((w, h), Image.Resampling.BICUBIC), np.float32)
                top, left = rng.integers(0, side - max(width, height), size=2)
                buffer = io.BytesIO()
                Image.fromarray(np.clip(field + noise[top:top + h, left:left + w], 0, 255).astype(np.uint8)).save(
                    buffer, format="JPEG", quality=90)
                sizes.append(buffer.tell())
                key = f"{t:05d}{i:04d}"
                caption = " ".join(rng.choice(WORDS, size=int(rng.integers(4, 12))))
                for name, data in ((f"{key}.jpg", buffer.getvalue()), (f"{key}.txt", caption.encode()),
                                   (f"{key}.json", json.dumps({"key": key, "status": "success"}).encode())):
                    member = tarfile.TarInfo(name)
                    member.size = len(data)
                    tar.addfile(member, io.BytesIO(data))
    return {"tars": tars, "per_tar": per_tar, "pairs": tars * per_tar, "width": width, "height": height,
            "mean_kib": sum(sizes) / len(sizes) / 1024,
            "bytes": sum(p.stat().st_size for p in folder.iterdir())}


def start_moto(log: Path, nice: int):
    from engine.dist import free_port

    command = Path(sys.executable).with_name("moto_server")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(["nice", "-n", str(nice), str(command), "-H", "127.0.0.1", "-p", str(port)],
                               stdout=open(log, "w"),
                               stderr=subprocess.STDOUT)
    for _ in range(600):
        try:
            urllib.request.urlopen(endpoint, timeout=2).close()
            return process, endpoint
        except OSError:
            if process.poll() is not None:
                raise RuntimeError(f"moto_server exited: {log.read_text()[-2000:]}")
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("moto_server did not start")


def cpu_seconds() -> float:
    """This process's CPU time (all threads) and its reaped children's (the conversion's workers)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def timed_conversion(source: str, out: str, workers: int, root: str) -> None:
    """In a fresh process (--run): the launcher's main() of the checkout at `root`, timed after the
    imports (~6 s of them)."""
    sys.path.insert(0, root)
    from engine.data.convert import convert  # main() imports it: the import is not the conversion
    from launchers.convert import main as convert_main
    for module in (convert, convert_main):
        if not Path(sys.modules[module.__module__].__file__).resolve().is_relative_to(Path(root).resolve()):
            raise SystemExit(f"{module.__module__} was imported from outside {root}")

    cpu, started = cpu_seconds(), time.perf_counter()
    code = convert_main([source, out, "--workers", str(workers)])
    print(json.dumps({"code": code, "seconds": time.perf_counter() - started, "cpu_seconds": cpu_seconds() - cpu}))


def run(source: str, out: str, workers: int, env: dict, pairs: int, moto, root: Path = ROOT) -> dict:
    import psutil

    server = psutil.Process(moto.pid)
    server_before = sum(server.cpu_times()[:2])
    done = subprocess.run([sys.executable, __file__, "--run", source, out, str(workers), str(root)], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"convert.py {source} {out} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["code"] != 0:
        raise RuntimeError(f"convert.py {source} {out} exited {result['code']}:\n{done.stderr[-3000:]}")
    seconds, cpu = result["seconds"], result["cpu_seconds"]
    return {"source": source, "out": out, "workers": workers, "code": str(root), "seconds": seconds,
            "cpu_seconds": cpu,
            "store_server_cpu_seconds": sum(server.cpu_times()[:2]) - server_before,
            "pairs_per_s": pairs / seconds, "pairs_per_s_per_core": pairs / seconds / workers,
            "pairs_per_cpu_s": pairs / cpu}


def same_samples(local: Path, url: str, cache: Path, env: dict) -> int:
    from streaming import LocalDataset, StreamingDataset

    os.environ.update(env)
    ours = LocalDataset(local=str(local))
    streamed = StreamingDataset(remote=url, local=str(cache), shuffle=False, batch_size=1)
    got = [(s["jpg"], s["txt"]) for s in streamed]
    want = [(ours[i]["jpg"], ours[i]["txt"]) for i in range(len(ours))]
    if got != want:
        raise SystemExit(f"FAIL: {url} holds {len(got)} samples, not the local conversion's {len(want)} in order")
    return len(got)


def main():
    if sys.argv[1:2] == ["--run"]:
        return timed_conversion(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tars", type=int, default=8)
    parser.add_argument("--per-tar", type=int, default=500)
    parser.add_argument("--size", type=int, nargs=2, default=(500, 375), metavar=("W", "H"))
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--store-nice", type=int, default=19,
                        help="niceness of the S3 server, which stands for a store on other machines (0: as the converter)")
    parser.add_argument("--before", default="14b6020", help="the commit whose local conversion is the bar")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "convert_store_cpu.json"))
    args = parser.parse_args()

    import boto3

    with tempfile.TemporaryDirectory(prefix="convert-store-bench-") as tmp:
        tmp = Path(tmp)
        source = write_tars(tmp / "src", args.tars, args.per_tar, *args.size)
        moto, endpoint = start_moto(tmp / "moto.log", args.store_nice)
        before = tmp / "before"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--quiet", "--detach", str(before), args.before],
                       check=True)
        try:
            env = {**os.environ, "S3_ENDPOINT_URL": endpoint, **CREDENTIALS}
            client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                                  aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                                  aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
            client.create_bucket(Bucket=BUCKET)
            for path in sorted((tmp / "src").iterdir()):
                client.upload_file(str(path), BUCKET, f"src/{path.name}")
            report = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                  "usable_cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                                  "load_average_before": os.getloadavg()},
                      "commit": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                                               text=True).stdout.strip(),
                      "arguments": vars(args), "source": source, "cases": {}}
            k = 0
            for workers in args.workers:
                runs = {"local": [], "s3": [], "before": []}
                for repeat in range(args.repeats):
                    k += 1
                    runs["local"].append(run(str(tmp / "src"), str(tmp / f"local-{k}"), workers, env,
                                             source["pairs"], moto))
                    runs["s3"].append(run(f"s3://{BUCKET}/src", f"s3://{BUCKET}/out-{k}", workers, env,
                                          source["pairs"], moto))
                    runs["before"].append(run(str(tmp / "src"), str(tmp / f"before-{k}"), workers, env,
                                              source["pairs"], moto, root=before))
                    if k == 1:
                        report["checked_samples"] = same_samples(tmp / "local-1", f"s3://{BUCKET}/out-1",
                                                                 tmp / "cache", env)
                case = {"runs": runs}
                for measure in ("pairs_per_s", "pairs_per_s_per_core", "pairs_per_cpu_s"):
                    medians = {mode: statistics.median(r[measure] for r in runs[mode]) for mode in runs}
                    case[f"median_{measure}"] = medians
                    case[f"ratio_{measure}"] = medians["s3"] / medians["local"]
                    case[f"ratio_to_before_{measure}"] = medians["s3"] / medians["before"]
                report["cases"][f"workers_{workers}"] = case
            report["machine"]["load_average_after"] = os.getloadavg()
        finally:
            moto.terminate()
            moto.wait(timeout=10)
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)], check=False)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"source: {source['pairs']:,} pairs in {source['tars']} tars, {source['mean_kib']:.1f} KiB per JPEG "
          f"({source['width']}x{source['height']}); {report['machine']['usable_cores']} usable core(s); "
          f"samples read back from s3 equal the local conversion's: {report['checked_samples']:,}")
    print(f"{'workers':>7} {'mode':>6} {'pairs/s':>9} {'per core':>9} {'per CPU-s':>10} {'moto CPU-s':>10}")
    for name, case in report["cases"].items():
        for mode in ("local", "s3", "before"):
            server = statistics.median(r["store_server_cpu_seconds"] for r in case["runs"][mode])
            print(f"{name.split('_')[1]:>7} {mode:>6} {case['median_pairs_per_s'][mode]:>9,.0f} "
                  f"{case['median_pairs_per_s_per_core'][mode]:>9,.0f} {case['median_pairs_per_cpu_s'][mode]:>10,.0f} "
                  f"{server:>10.1f}")
        print(f"{'':>7} {'s3/local':>8}: per core x{case['ratio_pairs_per_s_per_core']:.2f}, "
              f"per CPU-s x{case['ratio_pairs_per_cpu_s']:.2f}")
        print(f"{'':>7} {'s3/before':>8}: per core x{case['ratio_to_before_pairs_per_s_per_core']:.2f}, "
              f"per CPU-s x{case['ratio_to_before_pairs_per_cpu_s']:.2f}  (before = {args.before})")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
