"""Nearest-neighbour search over DeCLIP's queue: peak memory and time of each backend, side by side.

CPU (default): reference vs chunked, each case in its own subprocess so that its peak
resident memory is its own: the growth of VmHWM (/proc/self/status) over the resident size
once the inputs exist (the peak is reset there through /proc/self/clear_refs).
CUDA: reference vs chunked vs triton in one process; memory is the growth of
torch.cuda.max_memory_allocated over the inputs, time the median of a few synchronised runs
after a warm-up (which includes Triton's compilation). About a minute on an H100.

    python benchmarks/knn.py                                  # -> benchmarks/results/knn_cpu.json
    python benchmarks/knn.py --device cuda --out benchmarks/results/knn_cuda.json
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from kernels.knn import nearest_neighbors  # noqa: E402

# (N queries, Q bank rows, D, k): DeCLIP's queue of 65,536 and a 4,096 batch, then smaller.
CPU_CASES = [(4096, 65536, 512, 1), (4096, 65536, 512, 16), (1024, 16384, 512, 1), (256, 4096, 512, 1)]
CUDA_CASES = [(4096, 65536, 512, 1), (4096, 65536, 512, 16), (1024, 65536, 512, 1)]
CUDA_DTYPES = ["bfloat16", "float16", "float32"]


def _inputs(n, q, d, dtype, device):
    """Unit rows, normalised in place so that making them leaves no larger temporary behind."""
    g = torch.Generator(device=device).manual_seed(0)
    queries = torch.randn(n, d, generator=g, device=device)
    bank = torch.randn(q, d, generator=g, device=device)
    for x in (queries, bank):
        x.div_(x.norm(dim=1, keepdim=True))
    return queries.to(getattr(torch, dtype)), bank.to(getattr(torch, dtype))


def _cpu_name():
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def _status_kib(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_cpu_case(backend, n, q, d, k):
    """Runs in the child process: one case, its peak memory growth and its time."""
    queries, bank = _inputs(n, q, d, "float32", "cpu")
    nearest_neighbors(queries[:8], bank[:64], k=1, backend=backend)  # first-call overheads
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    baseline = _status_kib("VmRSS")
    start = time.perf_counter()
    nearest_neighbors(queries, bank, k=k, backend=backend)
    times = [time.perf_counter() - start]
    peak_mib = (_status_kib("VmHWM") - baseline) / 1024
    while sum(times) < 10 and len(times) < 3:  # repeat the quick cases
        start = time.perf_counter()
        nearest_neighbors(queries, bank, k=k, backend=backend)
        times.append(time.perf_counter() - start)
    return {"peak_mib": round(peak_mib, 1), "seconds": round(min(times), 3)}


def run_cpu():
    rows = []
    for n, q, d, k in CPU_CASES:
        for backend in ("reference", "chunked"):
            spec = json.dumps({"backend": backend, "n": n, "q": q, "d": d, "k": k})
            child = subprocess.run([sys.executable, __file__, "--child", spec],
                                   capture_output=True, text=True, check=True)
            result = json.loads(child.stdout.strip().splitlines()[-1])
            rows.append({"backend": backend, "n": n, "q": q, "d": d, "k": k, "dtype": "float32", **result})
            print(_row(rows[-1]), flush=True)
    return rows


def run_cuda():
    device = torch.device("cuda")
    rows = []
    for n, q, d, k in CUDA_CASES:
        for dtype in CUDA_DTYPES:
            queries, bank = _inputs(n, q, d, dtype, device)
            for backend in ("reference", "chunked", "triton"):
                nearest_neighbors(queries, bank, k=k, backend=backend)  # warm-up, compilation
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                times = []
                for _ in range(5):
                    start = time.perf_counter()
                    values, indices = nearest_neighbors(queries, bank, k=k, backend=backend)
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - start)
                peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
                if backend == "reference":
                    expected = indices
                rows.append({"backend": backend, "n": n, "q": q, "d": d, "k": k, "dtype": dtype,
                             "peak_mib": round(peak_mib, 1),
                             "seconds": round(statistics.median(times), 5),
                             # Share of indices equal to the reference's (float32 near-ties aside).
                             "same_indices": round((indices == expected).float().mean().item(), 6)})
                print(_row(rows[-1]), flush=True)
                del values, indices
            del queries, bank, expected
            torch.cuda.empty_cache()
    return rows


def _row(r):
    extra = f"  same indices {r['same_indices']:.6f}" if "same_indices" in r else ""
    return (f"{r['backend']:>9}  N={r['n']:>5} Q={r['q']:>6} D={r['d']} k={r['k']:>2} {r['dtype']:>8}  "
            f"peak {r['peak_mib']:>9.1f} MiB  {r['seconds']:>9.4f} s{extra}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/knn_<device>.json)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(measure_cpu_case(spec["backend"], spec["n"], spec["q"], spec["d"], spec["k"])))
        return
    machine = {"device": args.device, "torch": torch.__version__, "python": platform.python_version(),
               "cpu": _cpu_name(), "threads": torch.get_num_threads(),
               # Other work on the machine slows the timings (not the memory): recorded with them.
               "load_average_at_start": os.getloadavg()[0]}
    if args.device == "cuda":
        import triton
        machine.update(gpu=torch.cuda.get_device_name(), triton=triton.__version__)
        rows = run_cuda()
    else:
        rows = run_cpu()
    out = args.out or ROOT / "benchmarks" / "results" / f"knn_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "results": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
