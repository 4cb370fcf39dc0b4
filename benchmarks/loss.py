"""Symmetric InfoNCE on the CPU, forward + backward, D = 512: our reference, open_clip's ClipLoss
and our chunked path side by side at B = 4096, 16384 and 65536 in fp32; and, at 4096 and 16384,
ours and open_clip's again fed bf16 embeddings (what bf16 towers hand the loss: ours computes in
fp32 inside, open_clip's in bf16), set against ours in fp32 and open_clip's in bf16.

Each case runs in its own subprocess so that its peak resident memory is its own: the growth
of VmHWM (/proc/self/status) over the resident size once imports and inputs exist, the peak
having been reset there through /proc/self/clear_refs. That first forward + backward is also
timed; small cases then repeat and report the median. Every case runs under an address-space
limit (RLIMIT_AS) of the mappings it has at that point plus a budget that fits in the memory
this machine has available, so a case that cannot fit fails cleanly ("did not fit in N GiB")
instead of waking the OOM killer. Targets checked and printed: at 16384, ours at most 1/8 of
open_clip's peak and no slower; at 65536, ours under 4 GiB (each only where its size ran).
Writes JSON (machine, versions, figures, ratios, targets). The 65536 chunked case takes about
nine minutes on 2 cores; without it the run takes a few.

    python benchmarks/loss.py [--out benchmarks/results/loss_cpu.json]
    python benchmarks/loss.py --sizes 4096 16384 --out benchmarks/results/loss_cpu_bf16.json
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

from benchmarks.versions import versions  # noqa: E402

SIZES = [4096, 16384, 65536]
METHODS = ["reference", "open_clip", "ours"]
# bf16 rows: ours and open_clip's (our reference computes bf16 inputs in fp32, as ours does),
# where open_clip's [B, B] logits fit; at 65536 they do not, and ours alone takes minutes.
BF16_SIZES = [4096, 16384]
BF16_METHODS = ["open_clip", "ours"]
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


def run_case(method, batch, dtype, budget_bytes, reps):
    """In the subprocess: one method at one size in one dtype; returns the case's figures as a dict."""
    import torch

    fn = _loss_fn(method)
    g = torch.Generator().manual_seed(batch)
    a, b = torch.randn(batch, DIM, generator=g), torch.randn(batch, DIM, generator=g)
    for x in (a, b):
        x.div_(x.norm(dim=1, keepdim=True))
    # Unit rows rounded to the dtype, as the objectives hand them over; the scale stays fp32,
    # as the task passes it.
    a, b = a.to(getattr(torch, dtype)), b.to(getattr(torch, dtype))
    a.requires_grad_()
    b.requires_grad_()
    scale = torch.tensor(1 / 0.07, requires_grad=True)
    # The limit counts address space, not memory: give the case its budget above what is
    # mapped now (libraries, thread stacks, inputs).
    limit = _status_kib("VmSize") * 1024 + budget_bytes
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    base_kib = _status_kib("VmRSS")
    row = dict(method=method, batch=batch, dim=DIM, dtype=dtype,
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


def _in_subprocess(method, batch, dtype, budget_bytes, reps):
    command = [sys.executable, __file__, "--case", method, str(batch), dtype, str(budget_bytes), str(reps)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        why = (result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[-1]
        return dict(method=method, batch=batch, dim=DIM, dtype=dtype, status="failed", why=why)
    return json.loads(lines[-1])


def _cpu_name():
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def _ok(cases):
    """(method, batch, dtype) -> the case, for the cases that ran."""
    return {(c["method"], c["batch"], c["dtype"]): c for c in cases if c["status"] == "ok"}


def _targets(cases):
    """The fp32 targets, each only where its size was asked for: a size that ran but did not
    fit or failed fails its target."""
    ok, asked = _ok(cases), {c["batch"] for c in cases}
    ours16, clip16 = ok.get(("ours", 16384, "float32")), ok.get(("open_clip", 16384, "float32"))
    ours64 = ok.get(("ours", 65536, "float32"))
    targets = []
    if 16384 in asked and ours16 and clip16:
        ratio = ours16["peak_mib"] / clip16["peak_mib"]
        targets.append(dict(name="16k: ours <= 1/8 of open_clip's peak memory", value=ratio, passed=ratio <= 1 / 8))
        speed = clip16["seconds"] / ours16["seconds"]
        targets.append(dict(name="16k: ours no slower than open_clip (speed-up >= 1)", value=speed, passed=speed >= 1))
    elif 16384 in asked:
        targets.append(dict(name="16k: ours vs open_clip", value=None, passed=False,
                            why="a 16k case did not run"))
    if 65536 in asked:
        targets.append(dict(name="64k: ours finishes under 4 GiB",
                            value=None if ours64 is None else ours64["peak_mib"] / 1024,
                            passed=bool(ours64) and ours64["peak_mib"] < 4096))
    return targets


# (ours' dtype, the other case's method and dtype): the comparisons the ratios report.
COMPARISONS = [("float32", "reference", "float32"), ("float32", "open_clip", "float32"),
               ("bfloat16", "ours", "float32"), ("bfloat16", "open_clip", "bfloat16")]


def _ratios(cases):
    """Ours against each other case at the same size, measured in this run: memory and time
    ratios, and how far the losses differ (for bf16 against fp32: the inputs' rounding)."""
    ok = _ok(cases)
    rows = []
    for batch in sorted({c["batch"] for c in cases}):
        for dtype, other, other_dtype in COMPARISONS:
            ours, theirs = ok.get(("ours", batch, dtype)), ok.get((other, batch, other_dtype))
            if ours and theirs:
                rows.append(dict(batch=batch, dtype=dtype, versus=other, versus_dtype=other_dtype,
                                 memory_ratio=ours["peak_mib"] / theirs["peak_mib"],
                                 speedup=theirs["seconds"] / ours["seconds"],
                                 loss_rel_diff=abs(ours["loss"] - theirs["loss"]) / abs(theirs["loss"])))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/loss_cpu.json"))
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--bf16-sizes", type=int, nargs="*", default=BF16_SIZES,
                        help="sizes (among --sizes) that also run the bf16 rows; none: fp32 only")
    parser.add_argument("--case", nargs=5, metavar=("METHOD", "B", "DTYPE", "BUDGET_BYTES", "REPS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        method, batch, dtype, budget, reps = args.case
        print(json.dumps(run_case(method, int(batch), dtype, int(budget), int(reps))))
        return

    import torch

    started = time.perf_counter()
    budget = min(MAX_BUDGET_BYTES, _available_bytes() - SPARE_BYTES)
    report = dict(device=_cpu_name(), cores=os.cpu_count(), **versions("torch", "open_clip"),
                  threads=torch.get_num_threads(), budget_gib=budget / GIB,
                  load_average_before=os.getloadavg(), cases=[])
    print(f"{report['device']}, {report['cores']} cores, torch {report['torch']}; per-case "
          f"budget {budget / GIB:.1f} GiB; load average {report['load_average_before'][0]:.2f}")
    for batch in args.sizes:
        bf16 = [m for m in BF16_METHODS if m in args.methods] if batch in args.bf16_sizes else []
        for dtype, methods in (("float32", args.methods), ("bfloat16", bf16)):
            for method in methods:
                reps = 3 if batch <= 4096 else 1  # large cases: the first (measured) run alone
                row = _in_subprocess(method, batch, dtype, budget, reps)
                report["cases"].append(row)
                figures = (f"{row['seconds']:8.2f} s {row['peak_mib']:9.0f} MiB" if row["status"] == "ok"
                           else f"{row['status']}: {row['why']}")
                print(f"{method:>10} {dtype:>8} B={batch:<6} {figures}", flush=True)
    report["ratios"] = _ratios(report["cases"])
    report["targets"] = _targets(report["cases"])
    report["load_average_after"] = os.getloadavg()
    report["seconds"] = time.perf_counter() - started
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")

    print(f"\n{'method':>10} {'dtype':>8} {'B':>6} {'seconds':>9} {'peak MiB':>9}  status")
    for row in report["cases"]:
        ok = row["status"] == "ok"
        print(f"{row['method']:>10} {row['dtype']:>8} {row['batch']:>6} "
              f"{row['seconds'] if ok else float('nan'):>9.2f} "
              f"{row['peak_mib'] if ok else float('nan'):>9.0f}  {row['status'] if ok else row['why']}")
    for row in report["ratios"]:
        print(f"B={row['batch']}: ours {row['dtype']} / {row['versus']} {row['versus_dtype']}: memory "
              f"{row['memory_ratio']:.3f}, speed-up {row['speedup']:.2f}x, loss rel. diff {row['loss_rel_diff']:.1e}")
    for target in report["targets"]:
        value = "n/a" if target["value"] is None else f"{target['value']:.3f}"
        print(f"{'PASS' if target['passed'] else 'FAIL'}  {target['name']}: {value}")
    print(f"wrote {args.out} in {report['seconds']:.0f} s")


if __name__ == "__main__":
    main()
