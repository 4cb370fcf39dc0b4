"""Symmetric InfoNCE on the CPU, forward + backward, fp32, D = 512: our reference, open_clip's
ClipLoss and our chunked path side by side at B = 4096, 16384 and 65536.

Each case runs in its own subprocess so that its peak resident memory is its own: the growth
of VmHWM (/proc/self/status) over the resident size once imports and inputs exist, the peak
having been reset there through /proc/self/clear_refs. That first forward + backward is also
timed; small cases then repeat and report the median. Every case runs under an address-space
limit (RLIMIT_AS) of the mappings it has at that point plus a budget that fits in the memory
this machine has available, so a case that cannot fit fails cleanly ("did not fit in N GiB")
instead of waking the OOM killer. Targets checked and printed: at 16384, ours at most 1/8 of
open_clip's peak and no slower; at 65536, ours under 4 GiB. Writes JSON (machine, versions,
figures, ratios, targets). The 65536 chunked case takes several minutes on 2 cores.

    python benchmarks/loss.py [--out benchmarks/results/loss_cpu.json]
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = [4096, 16384, 65536]
METHODS = ["reference", "open_clip", "ours"]
DIM = 512
GIB = 2 ** 30
# Headroom left to the rest of the machine when choosing the per-case memory budget.
SPARE_BYTES = 3 * GIB
MAX_BUDGET_BYTES = 20 * GIB


def _status_kib(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _available_bytes():
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise KeyError("MemAvailable")


def _loss_fn(method):
    if method == "open_clip":
        from open_clip.loss import ClipLoss

        loss = ClipLoss()
        return lambda a, b, s: loss(a, b, s)
    from kernels.contrastive import contrastive_loss

    backend = "reference" if method == "reference" else "chunked"
    return lambda a, b, s: contrastive_loss(a, b, s, backend=backend)


def run_case(method, batch, budget_bytes, reps):
    """In the subprocess: one method at one size; returns the case's figures as a dict."""
    import torch

    fn = _loss_fn(method)
    g = torch.Generator().manual_seed(batch)
    a, b = torch.randn(batch, DIM, generator=g), torch.randn(batch, DIM, generator=g)
    for x in (a, b):
        x.div_(x.norm(dim=1, keepdim=True))
    a.requires_grad_()
    b.requires_grad_()
    scale = torch.tensor(1 / 0.07, requires_grad=True)
    # The limit counts address space, not memory: give the case its budget above what is
    # mapped now (libraries, thread stacks, inputs).
    limit = _status_kib("VmSize") * 1024 + budget_bytes
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    base_kib = _status_kib("VmRSS")
    row = dict(method=method, batch=batch, dim=DIM, dtype="float32",
               budget_gib=budget_bytes / GIB, threads=torch.get_num_threads())
    times = []
    try:
        for _ in range(reps):
            a.grad = b.grad = scale.grad = None
            start = time.perf_counter()
            loss = fn(a, b, scale)
            loss.backward()
            times.append(time.perf_counter() - start)
            if len(times) == 1:
                row["peak_mib"] = (_status_kib("VmHWM") - base_kib) / 1024
    except (RuntimeError, MemoryError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return dict(row, status="did not fit", why=f"did not fit in {budget_bytes / GIB:.1f} GiB: {first}")
    return dict(row, status="ok", loss=float(loss.detach()), seconds=statistics.median(times),
                seconds_all=times)


def _in_subprocess(method, batch, budget_bytes, reps):
    command = [sys.executable, __file__, "--case", method, str(batch), str(budget_bytes), str(reps)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        why = (result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[-1]
        return dict(method=method, batch=batch, dim=DIM, dtype="float32", status="failed", why=why)
    return json.loads(lines[-1])


def _cpu_name():
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def _targets(cases):
    ok = {(c["method"], c["batch"]): c for c in cases if c["status"] == "ok"}
    ours16, clip16, ours64 = ok.get(("ours", 16384)), ok.get(("open_clip", 16384)), ok.get(("ours", 65536))
    targets = []
    if ours16 and clip16:
        ratio = ours16["peak_mib"] / clip16["peak_mib"]
        targets.append(dict(name="16k: ours <= 1/8 of open_clip's peak memory", value=ratio, passed=ratio <= 1 / 8))
        speed = clip16["seconds"] / ours16["seconds"]
        targets.append(dict(name="16k: ours no slower than open_clip (speed-up >= 1)", value=speed, passed=speed >= 1))
    else:
        targets.append(dict(name="16k: ours vs open_clip", value=None, passed=False,
                            why="a 16k case did not run"))
    targets.append(dict(name="64k: ours finishes under 4 GiB",
                        value=None if ours64 is None else ours64["peak_mib"] / 1024,
                        passed=bool(ours64) and ours64["peak_mib"] < 4096))
    return targets


def _ratios(cases):
    ok = {(c["method"], c["batch"]): c for c in cases if c["status"] == "ok"}
    rows = []
    for (method, batch), ours in ok.items():
        if method != "ours":
            continue
        for other in ("reference", "open_clip"):
            theirs = ok.get((other, batch))
            if theirs:
                rows.append(dict(batch=batch, versus=other,
                                 memory_ratio=ours["peak_mib"] / theirs["peak_mib"],
                                 speedup=theirs["seconds"] / ours["seconds"],
                                 loss_rel_diff=abs(ours["loss"] - theirs["loss"]) / abs(theirs["loss"])))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/loss_cpu.json"))
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--case", nargs=4, metavar=("METHOD", "B", "BUDGET_BYTES", "REPS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        method, batch, budget, reps = args.case
        print(json.dumps(run_case(method, int(batch), int(budget), int(reps))))
        return

    import torch

    started = time.perf_counter()
    budget = min(MAX_BUDGET_BYTES, _available_bytes() - SPARE_BYTES)
    report = dict(device=_cpu_name(), cores=os.cpu_count(), torch=torch.__version__,
                  threads=torch.get_num_threads(), budget_gib=budget / GIB,
                  load_average_before=os.getloadavg(), cases=[])
    print(f"{report['device']}, {report['cores']} cores, torch {report['torch']}; per-case "
          f"budget {budget / GIB:.1f} GiB; load average {report['load_average_before'][0]:.2f}")
    for batch in args.sizes:
        for method in args.methods:
            reps = 3 if batch <= 4096 else 1  # large cases: the first (measured) run alone
            row = _in_subprocess(method, batch, budget, reps)
            report["cases"].append(row)
            figures = (f"{row['seconds']:8.2f} s {row['peak_mib']:9.0f} MiB" if row["status"] == "ok"
                       else f"{row['status']}: {row['why']}")
            print(f"{method:>10} B={batch:<6} {figures}", flush=True)
    report["ratios"] = _ratios(report["cases"])
    report["targets"] = _targets(report["cases"])
    report["load_average_after"] = os.getloadavg()
    report["seconds"] = time.perf_counter() - started
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")

    print(f"\n{'method':>10} {'B':>6} {'seconds':>9} {'peak MiB':>9}  status")
    for row in report["cases"]:
        ok = row["status"] == "ok"
        print(f"{row['method']:>10} {row['batch']:>6} {row['seconds'] if ok else float('nan'):>9.2f} "
              f"{row['peak_mib'] if ok else float('nan'):>9.0f}  {row['status'] if ok else row['why']}")
    for row in report["ratios"]:
        print(f"B={row['batch']}: ours / {row['versus']}: memory {row['memory_ratio']:.3f}, "
              f"speed-up {row['speedup']:.2f}x, loss rel. diff {row['loss_rel_diff']:.1e}")
    for target in report["targets"]:
        value = "n/a" if target["value"] is None else f"{target['value']:.3f}"
        print(f"{'PASS' if target['passed'] else 'FAIL'}  {target['name']}: {value}")
    print(f"wrote {args.out} in {report['seconds']:.0f} s")


if __name__ == "__main__":
    main()
