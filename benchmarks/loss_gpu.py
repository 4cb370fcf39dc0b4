"""Symmetric InfoNCE on a GPU, forward + backward: open_clip's ClipLoss, inf-cl, our reference
and our Triton path side by side, at global batches up to 262,144.

Memory: growth of torch.cuda.max_memory_allocated over what is allocated once the inputs
exist (peak reset there), for one forward + backward. Time: CUDA events around forward +
backward, the median of several runs after a warm-up (which includes Triton's compilation).
Throughput: the matmul FLOPs our kernels actually do (recomputation included,
kernels.contrastive.triton.matmul_flops; an fp32 product done as three TF32 ones counts once)
over that time, against torch.matmul's rate on 8192^3 measured first in the same dtype and
TF32 setting. open_clip and inf-cl are optional
(guarded imports): absent, their rows say so. Cases whose logits cannot fit are skipped with
the estimate; others that run out of memory are recorded as such. About 3-4 minutes on an H100.

    python benchmarks/loss_gpu.py [--out benchmarks/results/loss_gpu.json]
    python benchmarks/loss_gpu.py --dry-run    # CPU, tiny sizes: checks the script, not a GPU
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from kernels.contrastive import contrastive_loss  # noqa: E402

SIZES = [4096, 16384, 65536, 262144]
DIMS = [512]
DTYPES = ["bfloat16", "float32"]
METHODS = ["open_clip", "inf_cl", "reference", "ours"]
# The reference and ClipLoss hold two [B, B] logit matrices and their two log-softmaxes
# before backward starts: at least this many B^2 elements, in the input dtype.
DENSE_LOGIT_COPIES = 4


def _open_clip_loss():
    try:
        from open_clip.loss import ClipLoss
    except ImportError as error:
        return None, f"open_clip not importable: {error}"
    loss = ClipLoss()
    return (lambda a, b, s: loss(a, b, s)), ""


def _inf_cl_loss():
    try:
        from inf_cl import cal_flash_loss
    except ImportError as error:
        return None, f"inf_cl not importable: {error}"
    # cal_flash_loss is inf-cl's single-GPU tiled loss (what cal_inf_loss runs when
    # torch.distributed is not initialised; cal_inf_loss's scale gradient all-reduces, so it
    # needs a process group): one direction, a loss per row, computed in fp32 whatever the inputs.
    return (lambda a, b, s: (cal_flash_loss(a, b, scale=s).mean()
                             + cal_flash_loss(b, a, scale=s).mean()) / 2), ""


def _methods(device):
    triton_backend = "triton" if device == "cuda" else "chunked"  # dry run: no compiled Triton
    return {
        "open_clip": _open_clip_loss(),
        "inf_cl": _inf_cl_loss() if device == "cuda" else (None, "inf_cl needs CUDA"),
        "reference": ((lambda a, b, s: contrastive_loss(a, b, s, backend="reference")), ""),
        "ours": ((lambda a, b, s: contrastive_loss(a, b, s, backend=triton_backend)), ""),
    }


class _Clock:
    """CUDA events on a GPU; the host clock in a dry run."""

    def __init__(self, device):
        self.cuda = device == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def time_ms(self, fn):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        begin = time.perf_counter()
        fn()
        return (time.perf_counter() - begin) * 1e3

    def reset_peak(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        return 0

    def peak_growth(self, base):
        return torch.cuda.max_memory_allocated() - base if self.cuda else None


def _inputs(batch, dim, dtype, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    a = torch.randn(batch, dim, generator=g, device=device)
    b = torch.randn(batch, dim, generator=g, device=device)
    for x in (a, b):
        x.div_(x.norm(dim=1, keepdim=True))
    a, b = a.to(dtype).requires_grad_(), b.to(dtype).requires_grad_()
    return a, b, torch.tensor(1 / 0.07, device=device, requires_grad=True)


def _step(fn, a, b, scale):
    a.grad = b.grad = scale.grad = None
    loss = fn(a, b, scale)
    loss.backward()
    return loss


def matmul_peak_tflops(dtype, device, clock, size=8192, reps=10):
    """torch.matmul's rate on size^3 in `dtype` under the current TF32 setting."""
    x = torch.randn(size, size, device=device).to(dtype)
    y = torch.randn(size, size, device=device).to(dtype)
    x @ y
    clock.sync()
    times = [clock.time_ms(lambda: x @ y) for _ in range(reps)]
    return 2 * size ** 3 / (statistics.median(times) * 1e-3) / 1e12


def run_case(method, fn, batch, dim, dtype, device, clock, budget_s, free_bytes):
    """One method at one size: status, median ms, all times, peak growth in MiB."""
    row = dict(method=method, batch=batch, dim=dim, dtype=str(dtype).replace("torch.", ""))
    dense_bytes = DENSE_LOGIT_COPIES * batch * batch * torch.finfo(dtype).bits // 8
    if method in ("open_clip", "reference") and free_bytes is not None and dense_bytes > free_bytes:
        return dict(row, status="skipped", why=f"needs at least {dense_bytes / 2**30:.0f} GiB of "
                                                f"logits, {free_bytes / 2**30:.0f} GiB free")
    try:
        a, b, scale = _inputs(batch, dim, dtype, device, seed=batch + dim)
        warm = clock.time_ms(lambda: _step(fn, a, b, scale))  # compilation, allocator warm-up
        a.grad = b.grad = scale.grad = None  # so the peak counts the gradients, as it counts the loss's
        base = clock.reset_peak()
        loss = float(_step(fn, a, b, scale).detach())
        peak = clock.peak_growth(base)
        reps = max(1, min(10, int(budget_s * 1e3 / max(warm, 1e-3))))
        times = [clock.time_ms(lambda: _step(fn, a, b, scale)) for _ in range(reps)]
    except torch.OutOfMemoryError as error:
        return dict(row, status="out of memory", why=str(error).splitlines()[0])
    finally:
        a = b = scale = None  # free this case's tensors before the next one is measured
        if clock.cuda:
            torch.cuda.empty_cache()
    return dict(row, status="ok", loss=loss, ms=statistics.median(times), ms_all=times,
                warmup_ms=warm, peak_mib=None if peak is None else peak / 2**20)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/loss_gpu.json"))
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES)
    parser.add_argument("--dims", type=int, nargs="+", default=DIMS)
    parser.add_argument("--dtypes", nargs="+", default=DTYPES, choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--case-budget-s", type=float, default=4.0, help="timed runs per case, in seconds")
    parser.add_argument("--total-budget-s", type=float, default=270.0, help="cases after this are skipped")
    parser.add_argument("--dry-run", action="store_true", help="CPU, sizes 64 and 256, the chunked path as 'ours'")
    args = parser.parse_args()
    if args.dry_run:
        device, args.sizes, args.dims = "cpu", [64, 256], [32]
        if args.out == parser.get_default("out"):
            parser.error("--dry-run needs --out elsewhere than the real results")
    elif not torch.cuda.is_available():
        parser.error("no CUDA device: run this on a GPU machine, or pass --dry-run")
    else:
        device = "cuda"
    clock = _Clock(device)
    started = time.perf_counter()
    methods = _methods(device)
    dtypes = [getattr(torch, name) for name in args.dtypes]
    report = dict(
        device=torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)",
        torch=torch.__version__, triton=_triton_version(), dry_run=args.dry_run,
        ours_backend="triton" if device == "cuda" else "chunked",
        tf32=torch.backends.cuda.matmul.allow_tf32,
        unavailable={name: why for name, (fn, why) in methods.items() if fn is None},
        matmul_peak_tflops={str(d).replace("torch.", ""): matmul_peak_tflops(
            d, device, clock, size=8192 if device == "cuda" else 256) for d in dtypes},
        cases=[])
    for dim in args.dims:
        for dtype in dtypes:
            for batch in args.sizes:
                for method in args.methods:
                    fn, why = methods[method]
                    if fn is None:
                        row = dict(method=method, batch=batch, dim=dim, status="unavailable", why=why)
                    elif time.perf_counter() - started > args.total_budget_s:
                        row = dict(method=method, batch=batch, dim=dim, status="skipped",
                                   why="over --total-budget-s")
                    else:
                        free = torch.cuda.mem_get_info()[0] if device == "cuda" else None
                        row = run_case(method, fn, batch, dim, dtype, device, clock,
                                       args.case_budget_s, free)
                    row["dtype"] = str(dtype).replace("torch.", "")
                    if method == "ours" and row["status"] == "ok":
                        _add_throughput(row, report["matmul_peak_tflops"][row["dtype"]])
                    report["cases"].append(row)
                    print(_line(row), flush=True)
    report["comparisons"] = _comparisons(report["cases"])
    report["seconds"] = time.perf_counter() - started
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    _print_table(report)
    print(f"wrote {args.out} in {report['seconds']:.0f} s")


def _triton_version():
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def _add_throughput(row, peak):
    from kernels.contrastive.triton import matmul_flops

    flops = matmul_flops(row["batch"], row["batch"], row["dim"], symmetric=True)
    row["matmul_tflop"] = flops / 1e12
    row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
    row["fraction_of_matmul_peak"] = row["tflops"] / peak


def _comparisons(cases):
    """Per size: our peak memory and time against each other method that ran, and how far our
    loss is from the reference's where both ran."""
    ok = {(c["method"], c["batch"], c["dim"], c["dtype"]): c for c in cases if c["status"] == "ok"}
    rows = []
    for (method, batch, dim, dtype), ours in ok.items():
        if method != "ours":
            continue
        row = dict(batch=batch, dim=dim, dtype=dtype)
        for other in ("open_clip", "inf_cl", "reference"):
            theirs = ok.get((other, batch, dim, dtype))
            if theirs is None:
                continue
            row[f"speedup_vs_{other}"] = theirs["ms"] / ours["ms"]
            if ours["peak_mib"] and theirs["peak_mib"]:
                row[f"memory_ratio_vs_{other}"] = ours["peak_mib"] / theirs["peak_mib"]
            if other == "reference":
                row["loss_rel_diff_vs_reference"] = abs(ours["loss"] - theirs["loss"]) / abs(theirs["loss"])
        rows.append(row)
    return rows


def _line(row):
    if row["status"] != "ok":
        return f"{row['method']:>10} B={row['batch']:<7} D={row['dim']:<5} {row.get('dtype', ''):<9} {row['status']}: {row['why']}"
    mem = "-" if row["peak_mib"] is None else f"{row['peak_mib']:.0f} MiB"
    extra = f"  {row['tflops']:.0f} TFLOP/s" if "tflops" in row else ""
    return (f"{row['method']:>10} B={row['batch']:<7} D={row['dim']:<5} {row['dtype']:<9} "
            f"{row['ms']:10.2f} ms  {mem:>11}{extra}")


def _print_table(report):
    print(f"\n{report['device']}, torch {report['torch']}, triton {report['triton']}, "
          f"tf32 {report['tf32']}; torch.matmul peak TFLOP/s: "
          + ", ".join(f"{k} {v:.0f}" for k, v in report["matmul_peak_tflops"].items()))
    print(f"{'method':>10} {'B':>7} {'D':>5} {'dtype':>9} {'ms':>10} {'peak MiB':>10} {'TFLOP/s':>8} {'of peak':>7}")
    for row in report["cases"]:
        if row["status"] != "ok":
            print(f"{row['method']:>10} {row['batch']:>7} {row['dim']:>5} {row['dtype']:>9}   {row['status']}")
            continue
        mem = "-" if row["peak_mib"] is None else f"{row['peak_mib']:.0f}"
        tflops = f"{row['tflops']:.0f}" if "tflops" in row else ""
        frac = f"{row['fraction_of_matmul_peak']:.0%}" if "tflops" in row else ""
        print(f"{row['method']:>10} {row['batch']:>7} {row['dim']:>5} {row['dtype']:>9} "
              f"{row['ms']:>10.2f} {mem:>10} {tflops:>8} {frac:>7}")


if __name__ == "__main__":
    main()
