"""The "bf16 training" part of benchmarks/gpu/check.sh: ViT-B/32 trained in bf16 for 50 steps
on JPEGs that DALI decodes on the GPU, run as a user runs it, and summarised into one JSON.

  1. writes a JPEG MDS dataset (columns jpg, txt) in code: --images photos of --size pixels,
     flat colours with noise (quality 90), captioned with their colour (8 colours);
  2. runs `deepspeed --num_gpus 1 launchers/pretrain.py --model vit-b-32 --precision bf16
     --steps 50 --global-batch 256 --data DATA --log-every 5 --eval-every 1000
     --checkpoint-every 50 --out RUN` (RUN is emptied first: an existing one would be resumed),
     stopped at the deadline (--deadline-s, default: check.sh's STEP_S less 15 s);
  3. reads RUN/plan.json and RUN/metrics.jsonl into --json: the device, the plan's precision,
     ZeRO stage, optimizer and decode device (with its reason), the medians of samples/s and
     time/step_s over the logged intervals after the first, the final loss, whether every
     logged loss is finite, and the skipped steps.

The part counts only when the run ends, every loss is finite and the plan decoded on the GPU;
the exit status says which failed (the run's own, 2: decoded on the CPU, 3: a loss not
finite or no loss logged). The last line printed starts with "figure:", for check.sh's summary.

    python benchmarks/gpu/train_bf16.py --json OUT/train_bf16_gpu.json        # a GPU machine
    python benchmarks/gpu/train_bf16.py --write-only --images 16 --data /tmp/j   # the writer alone
"""
import argparse
import importlib
import io
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STAGE = Path("/tmp/clipzero-gpu")
COLOURS = ["red", "green", "blue", "yellow", "cyan", "magenta", "white", "black"]
RGB = [(220, 30, 30), (30, 200, 40), (30, 50, 220), (230, 220, 30), (30, 210, 220), (210, 40, 210),
       (235, 235, 235), (20, 20, 20)]


def write_jpeg_mds(out: Path, images: int, size: tuple[int, int], seed: int = 0) -> dict:
    """`images` JPEGs of `size` (w, h): a flat colour field plus uniform noise, captioned with
    the colour, as an MDS dataset at `out` (replaced). Returns what was written."""
    import numpy as np
    from PIL import Image
    from streaming import MDSWriter

    started = time.perf_counter()
    shutil.rmtree(out, ignore_errors=True)
    rng = np.random.default_rng(seed)
    width, height = size
    total_bytes = 0
    with MDSWriter(out=str(out), columns={"jpg": "bytes", "txt": "str"}, size_limit=1 << 25) as writer:
        for index in range(images):
            colour = index % len(COLOURS)
            noise = rng.integers(-40, 41, (height, width, 3), dtype=np.int16)
            pixels = np.clip(noise + np.array(RGB[colour], dtype=np.int16), 0, 255).astype(np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
            total_bytes += buffer.tell()
            writer.write({"jpg": buffer.getvalue(), "txt": f"a photo of the colour {COLOURS[colour]}"})
    return {"images": images, "size": [width, height], "jpeg_kib_mean": round(total_bytes / images / 1024, 1),
            "write_s": round(time.perf_counter() - started, 2)}


def launch(args, deadline_s: float) -> dict:
    """The user's command on one GPU, to its end or the deadline; its output passes through."""
    sys.path.insert(0, str(ROOT))
    from engine.dist import free_port

    shutil.rmtree(args.run, ignore_errors=True)
    dials = ["--model", "vit-b-32", "--precision", "bf16", "--steps", str(args.steps), "--global-batch",
             str(args.global_batch), "--data", str(args.data), "--log-every", "5", "--eval-every", "1000",
             "--checkpoint-every", str(args.steps), "--out", str(args.run)]
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1",
               "--master_port", str(free_port()), "launchers/pretrain.py", *dials]
    env = dict(os.environ)
    env.setdefault("CLIPZERO_CACHE", str(STAGE / "cache"))
    print("$ deepspeed --num_gpus 1 launchers/pretrain.py " + " ".join(dials), flush=True)
    started = time.perf_counter()
    # A session of its own, so that the deadline (or check.sh's timeout, through the handler)
    # ends the launcher and the rank it started, not only the launcher.
    process = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True)

    def stop(*_):
        for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            try:
                os.killpg(process.pid, sig)
                process.wait(grace)
                return
            except ProcessLookupError:
                return
            except subprocess.TimeoutExpired:
                continue

    def on_signal(signum, _frame):
        stop()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    timed_out = False
    try:
        rc = process.wait(max(1.0, deadline_s))
    except subprocess.TimeoutExpired:
        timed_out = True
        print(f"bf16 training: past its {deadline_s:.0f} s, stopping it", flush=True)
        stop()
        rc = 124  # as timeout(1) says it
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    return {"command": "deepspeed --num_gpus 1 launchers/pretrain.py " + " ".join(dials).replace(str(args.data), "DATA"),
            "exit_code": rc, "timed_out": timed_out, "wall_s": round(time.perf_counter() - started, 1)}


def _median(rows, key):
    values = [row[key] for row in rows if isinstance(row.get(key), (int, float))]
    return statistics.median(values) if values else None


def summarise(run: Path) -> dict:
    """plan.json and metrics.jsonl of `run`, as the JSON's figures."""
    out: dict = {}
    plan_path, metrics_path = run / "plan.json", run / "metrics.jsonl"
    if plan_path.exists():
        plan = json.loads(plan_path.read_text())
        reasons = {d["name"]: d["reason"] for d in plan.get("decisions", [])}
        out["plan"] = {key: plan.get(key) for key in (
            "device_name", "world_size", "global_batch", "micro_batch", "grad_accum", "total_steps",
            "precision", "zero_stage", "offload_optimizer", "optimizer", "decode_device",
            "decode_threads", "hw_decoder_load", "workers")}
        out["plan"]["decode_device_reason"] = reasons.get("decode_device")
        out["plan"]["optimizer_reason"] = reasons.get("optimizer")
    rows = []
    if metrics_path.exists():
        for line in metrics_path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "kind" not in row and "samples_per_s" in row:
                rows.append(row)
    losses = [row.get("loss") for row in rows]
    finite = [isinstance(x, (int, float)) and math.isfinite(x) for x in losses]
    steady = rows[1:]  # the first interval holds the warm-up (cuDNN, Triton, DALI, the workers' start)
    out.update(
        steps_logged=[row["step"] for row in rows],
        samples_per_s_median=_median(steady, "samples_per_s"),
        step_s_median=_median(steady, "time/step_s"),
        data_wait_s_median=_median(steady, "time/data_wait_s"),
        tflops_per_s_median=_median(steady, "tflops_per_s"),
        mfu_median=_median(steady, "mfu"),
        max_allocated_gb=max((row.get("memory/max_allocated_gb", 0) for row in rows), default=None),
        losses=[x if ok else None for x, ok in zip(losses, finite)],
        final_loss=losses[-1] if rows and finite[-1] else None,
        all_losses_finite=bool(rows) and all(finite),
        skipped_steps=rows[-1].get("skipped_steps") if rows else None,
        bad_records={k: v for k, v in (rows[-1].items() if rows else ()) if k.startswith("data/bad_records/")},
    )
    return out


def _versions() -> dict:
    found = {"python": platform.python_version()}
    for name, module in (("torch", "torch"), ("deepspeed", "deepspeed"), ("dali", "nvidia.dali"),
                         ("streaming", "streaming"), ("triton", "triton")):
        try:
            found[name] = importlib.import_module(module).__version__
        except Exception as error:  # noqa: BLE001 - recorded, not fatal
            found[name] = f"missing ({type(error).__name__})"
    return found


def _device_name():
    try:
        import torch
        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - the name is a label, not a check
        return None


def verdict(report: dict) -> tuple[int, str]:
    """(exit status, the figure line) of the part."""
    plan = report.get("plan") or {}
    run = report["run"]
    rate, step = report.get("samples_per_s_median"), report.get("step_s_median")
    figure = (f"{rate:,.0f} samples/s (step {step:.3f} s)" if rate and step else "no steady-state interval logged")
    loss = report.get("final_loss")
    figure += f", final loss {loss:.3f}" if loss is not None else ", no final loss"
    figure += (f", losses {'all finite' if report['all_losses_finite'] else 'NOT all finite'}, "
               f"{report.get('skipped_steps')} skipped, decode {plan.get('decode_device')}")
    if run["exit_code"] != 0:
        why = "timed out" if run["timed_out"] else f"the run exited {run['exit_code']}"
        rc = run["exit_code"] if 0 < run["exit_code"] < 256 else 1
        return rc, f"{figure}; {why}: this part does not count"
    if plan.get("decode_device") != "gpu":
        return 2, (f"{figure}; the plan decoded on the CPU ({plan.get('decode_device_reason')}): "
                   "this part does not count")
    if not report["all_losses_finite"]:
        return 3, f"{figure}; this part does not count"
    return 0, figure


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="the summary (train_bf16_gpu.json)")
    parser.add_argument("--data", type=Path, default=STAGE / "jpegs")
    parser.add_argument("--run", type=Path, default=STAGE / "train-bf16")
    parser.add_argument("--images", type=int, default=6400, help="25 steps of 256 per epoch")
    parser.add_argument("--size", type=int, nargs=2, default=(256, 192), metavar=("W", "H"))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--global-batch", type=int, default=256)
    parser.add_argument("--deadline-s", type=float, default=None,
                        help="stop the run after this long (default: $STEP_S less 15 s, else 120)")
    parser.add_argument("--write-only", action="store_true", help="write the dataset and exit")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.deadline_s is None:
        args.deadline_s = float(os.environ["STEP_S"]) - 15 if os.environ.get("STEP_S") else 120.0

    data = write_jpeg_mds(args.data, args.images, tuple(args.size))
    print(f"wrote {data['images']} JPEGs of {data['size'][0]}x{data['size'][1]} "
          f"({data['jpeg_kib_mean']} KiB each) in {data['write_s']} s to {args.data}", flush=True)
    if args.write_only:
        return
    if args.json is None:
        parser.error("--json is needed to train")
    run = launch(args, args.deadline_s - (time.perf_counter() - started))
    report = {"part": "bf16 training", "run": run, "data": data, **summarise(args.run)}
    report["versions"] = _versions()
    report["device"] = (report.get("plan") or {}).get("device_name") or _device_name()
    rc, figure = verdict(report)
    report["counts"], report["figure"] = rc == 0, figure
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.json}")
    print(f"figure: {figure}", flush=True)
    sys.exit(rc)


if __name__ == "__main__":
    main()
