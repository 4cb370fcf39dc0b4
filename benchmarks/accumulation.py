"""Gradient accumulation on the CPU: one optimizer step's peak memory and time, for each method
(clip, declip, clip-lite), in three modes on the same global batch B:

  full           one micro-batch of B, plain forward + backward (the reference);
  gradcache  k micro-batches of B/k through engine.train.step.gradcache_step
                 (GradCache: embeddings without gradients, the cross terms over all B rows,
                 then a recompute with gradients per micro-batch);
  plain          k micro-batches of B/k, each loss backpropagated on its own (the training
                 loop's other step, engine.train.step.plain_step), so each micro-batch is a
                 B/k-sized contrastive problem.

The model is a preset as the planner builds it for the method (default "debug", 32 px), in
training mode, with the objective's default options. A small `Engine` adapter (forward, a
backward that divides by k, a no-op step) stands in for DeepSpeed's: DeepSpeed's own buffers
(optimizer state, gradient buckets) are the same in all three modes, so what differs, and is
measured, is the activations. Each case runs in its own subprocess, as benchmarks/loss.py
does: peak MiB is the growth of VmHWM over the resident size once the task and the batch exist
and a 2-samples-per-micro-batch step has run (so that the libraries' one-time set-up, ~50 MiB,
is not counted), the peak reset there through /proc/self/clear_refs; it spans a warm-up step
and --repeats timed ones, and includes the step's parameter gradients. Seconds is the median
of the timed steps. The default B = 256 (not 64) makes the activations, not allocator noise,
dominate at 32 px. The whole run takes about 2 minutes on 2 cores.

Read the table per method: "mem x" and "time x" are ratios to that method's full step.
gradcache should hold about 1/k of full's activation memory (plus the step's embeddings)
for about 4/3 of its time (one extra forward per micro-batch; more where micro-batches are so
small that per-call overhead dominates); plain needs about as much memory as gradcache,
for less time, but trains on a different (B/k-sized) loss. "loss" is the first full-size step's.
The gradient check ("grad diff") builds the tasks as tests/unit/test_gradcache.py does (towers
in eval mode on calibrated BatchNorm statistics, batch terms off), where gradcache must
equal full to fp32 rounding and plain must not.

    python benchmarks/accumulation.py [--batch 256 --accum 4 --repeats 3 --model debug]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.loss import _cpu_name, _status_kib  # noqa: E402
from benchmarks.step_gpu import synthetic_batch  # noqa: E402

METHODS = ("clip", "declip", "clip-lite")
MODES = ("full", "gradcache", "plain")
SOT, EOT = 49406, 49407
CPU = "cpu"


class Engine:
    """What the accumulation paths use of DeepSpeed's engine: its forward, a backward that
    divides by the accumulation steps, and an optimizer step (a no-op: no optimizer here)."""

    def __init__(self, task, accumulation_steps: int):
        import torch

        self.module, self.device, self.accumulation_steps = task, torch.device(CPU), accumulation_steps

    def __call__(self, batch, **kwargs):
        return self.module(batch, **kwargs)

    def gradient_accumulation_steps(self) -> int:
        return self.accumulation_steps

    def backward(self, loss):
        (loss / self.accumulation_steps).backward()

    def step(self):
        pass


def build_task(method: str, model_name: str, batch: int, exact: bool = False):
    """The method's ModelWithLoss with the planner's default objective options, and a fake batch of
    `batch` samples. `exact`: the unit test's setup, where accumulation cannot change the
    gradients by design (towers on calibrated BatchNorm statistics, batch terms off)."""
    import torch

    from engine.objectives.method import lookup
    from engine.models.two_tower import TwoTower
    from engine.objectives.clip import ClipObjective
    from engine.objectives.clip_lite import ClipLiteObjective
    from engine.objectives.declip import DeclipObjective
    from engine.model_with_loss import ModelWithLoss

    torch.manual_seed(0)  # the same weights and batch in every mode
    preset = lookup(method, model_name).preset
    model = TwoTower(preset, EOT, SOT)
    if method == "declip":
        objective = DeclipObjective(model, queue_size=dict(lookup(method, model_name).recipe.options)["queue_size"])
        if exact:
            objective.weights = {**objective.weights, "simsiam": 0.0, "mlm": 0.0}
    elif method == "clip-lite":
        objective = ClipLiteObjective(model, prior="off" if exact else "cooperative")
    else:
        objective = ClipObjective()
    data = synthetic_batch(objective, batch, preset.image_size, preset.context_length, CPU)
    if exact:
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.momentum = None  # running statistics = the average over the batches seen
        with torch.no_grad():
            model.image_outputs(data["image"])
            model.text_outputs(data["text"])
        model.eval()  # the towers only: the objective's heads keep batch statistics
    return ModelWithLoss(model, objective), data


def train_step(mode: str, task, batch: dict, k: int) -> dict:
    """One optimizer step's forwards and backwards; returns the step's named losses."""
    from engine.train.step import make_step

    engine = Engine(task, k)
    if mode == "full":
        return make_step("plain")(engine, [batch])
    micro_batches = [dict(zip(batch, parts)) for parts in zip(*(v.chunk(k) for v in batch.values()))]
    return make_step(mode)(engine, micro_batches)


def run_case(method: str, mode: str, model_name: str, batch: int, k: int, repeats: int) -> dict:
    """In the subprocess: one warm-up step, then `repeats` timed ones; peak over all of them."""
    import gc

    import torch

    task, data = build_task(method, model_name, batch)
    k = 1 if mode == "full" else k
    # A step on 2 samples per micro-batch first, so that what the libraries set up once
    # (oneDNN kernels, autograd's threads: ~50 MiB) lands in the baseline, not in the peak.
    train_step(mode, task, {name: x[:2 * k] for name, x in data.items()}, k)
    task.zero_grad(set_to_none=True)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    base_kib = _status_kib("VmRSS")
    times, first_loss = [], None
    for _ in range(1 + repeats):
        task.zero_grad(set_to_none=True)  # as the optimizer leaves them: the step allocates its gradients
        start = time.perf_counter()
        losses = train_step(mode, task, data, k)
        times.append(time.perf_counter() - start)
        first_loss = float(losses["loss"]) if first_loss is None else first_loss
    return dict(method=method, mode=mode, model=model_name, batch=batch, micro_batch=batch // k,
                threads=torch.get_num_threads(), status="ok", loss_first_step=first_loss,
                peak_mib=(_status_kib("VmHWM") - base_kib) / 1024,
                seconds=statistics.median(times[1:]), seconds_all=times)


def gradient_agreement(method: str, model_name: str, batch: int, k: int) -> dict:
    """Max over parameters of max |g - g_full| / max |g_full| for gradcache and plain, in
    the exact setup (see build_task); a tensor that is zero but for rounding is measured
    against a thousandth of the largest gradient, as tests/unit/test_gradcache.py does."""
    grads = {}
    for mode in MODES:
        task, data = build_task(method, model_name, batch, exact=True)
        train_step(mode, task, data, 1 if mode == "full" else k)
        grads[mode] = {n: p.grad for n, p in task.named_parameters() if p.grad is not None}
    full = grads["full"]
    largest = max(float(g.abs().max()) for g in full.values())
    return {mode: max(float((grads[mode][n] - g).abs().max()) / max(float(g.abs().max()), 1e-3 * largest)
                      for n, g in full.items())
            for mode in MODES[1:]}


def _in_subprocess(method, mode, args) -> dict:
    command = [sys.executable, __file__, "--case", method, mode, args.model, str(args.batch),
               str(args.accum), str(args.repeats)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        why = (result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[-1]
        return dict(method=method, mode=mode, status="failed", why=why)
    return json.loads(lines[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256, help="global batch B")
    parser.add_argument("--accum", type=int, default=4, help="micro-batches k per step")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--model", default="debug")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/accumulation_cpu.json"))
    parser.add_argument("--case", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        method, mode, model, batch, k, repeats = args.case
        print(json.dumps(run_case(method, mode, model, int(batch), int(k), int(repeats))))
        return
    if args.batch % args.accum:
        parser.error(f"--batch {args.batch} must be a multiple of --accum {args.accum}")

    import torch

    started = time.perf_counter()
    report = dict(device=_cpu_name(), cores=os.cpu_count(), torch=torch.__version__,
                  threads=torch.get_num_threads(), load_average_before=os.getloadavg(),
                  model=args.model, batch=args.batch, accum=args.accum, repeats=args.repeats,
                  cases=[], gradient_agreement={})
    print(f"{report['device']}, {report['cores']} cores, torch {report['torch']}, "
          f"load average {report['load_average_before'][0]:.2f}; {args.model}, B={args.batch}, k={args.accum}")
    for method in args.methods:
        for mode in MODES:
            row = _in_subprocess(method, mode, args)
            report["cases"].append(row)
            print(f"  {method:>9} {mode:>13}: " + (f"{row['peak_mib']:7.1f} MiB {row['seconds']:7.3f} s"
                                                    if row["status"] == "ok" else row["why"]), flush=True)
        report["gradient_agreement"][method] = gradient_agreement(method, args.model, args.batch, args.accum)
    full = {r["method"]: r for r in report["cases"] if r["mode"] == "full" and r["status"] == "ok"}
    for row in report["cases"]:
        if row["status"] == "ok" and row["method"] in full:
            row["memory_ratio"] = row["peak_mib"] / full[row["method"]]["peak_mib"]
            row["time_ratio"] = row["seconds"] / full[row["method"]]["seconds"]
    report["load_average_after"] = os.getloadavg()
    report["seconds"] = time.perf_counter() - started
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")

    print(f"\n{'method':>9} {'mode':>13} {'peak MiB':>9} {'seconds':>8} {'mem x':>6} {'time x':>6} "
          f"{'loss':>7} {'grad diff*':>10}")
    for row in report["cases"]:
        if row["status"] != "ok":
            print(f"{row['method']:>9} {row['mode']:>13}  {row['why']}")
            continue
        diff = report["gradient_agreement"][row["method"]].get(row["mode"])
        print(f"{row['method']:>9} {row['mode']:>13} {row['peak_mib']:9.1f} {row['seconds']:8.3f} "
              f"{row.get('memory_ratio', float('nan')):6.2f} {row.get('time_ratio', float('nan')):6.2f} "
              f"{row['loss_first_step']:7.3f} {'' if diff is None else f'{diff:10.1e}'}")
    print("* max relative gradient difference from full, with the towers in eval mode on calibrated "
          "BatchNorm\n  statistics and the batch terms off (DeCLIP's SimSiam and MLM, CLIP-Lite's prior): "
          "there gradcache\n  equals full by design and plain does not. The measured runs train as "
          "configured, where BatchNorm\n  and the batch terms see one micro-batch at a time, so their "
          f"first-step losses differ.\nwrote {args.out} in {report['seconds']:.0f} s")


if __name__ == "__main__":
    main()
