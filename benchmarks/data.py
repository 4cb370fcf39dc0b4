"""The training data path: images/s of our CPU pipeline against open_clip's, and how much of a
training step waits for data.

  1. images/s at 224 px, side by side on the same MDS samples, cores and worker count:
       ours       engine.data.loader.TrainLoader, decode_device="cpu", DataSpec() (CLIP's random
                  resized crop, scale 0.9-1): DataLoader workers read each record and draw its
                  crop window, DALI's CPU pipeline decodes the window, resizes and normalises;
       open_clip  open_clip.image_transform(224, is_train=True) on PIL-decoded images, and
                  open_clip's tokenizer, in the DataLoader workers of a StreamingDataset over
                  the same shards (the way streaming's docs apply torchvision transforms).
     on two sets: "photos", synthetic ~500x375 JPEGs (smooth random colour fields plus noise,
     quality 90) written to a temporary MDS directory, and "digits", the built-in 32 px PNGs
     (engine/data/embedded.py), which both pipelines upscale to 224. Each measurement runs in
     its own process (fresh workers, no shared caches), ours and open_clip's alternating; each
     warms up, then times a fixed number of batches (both pipelines restart their workers every
     epoch, as they do in training). Two figures per measurement: images per wall-clock second,
     what training sees, and images per CPU-second (the time of the process, its DALI threads
     and its workers), what the pipeline costs. On a shared machine the first moves with the
     load of other people's work, the second hardly does. Reported: the median of the repeats,
     and the ratios ours / open_clip (> 1: ours is faster, or cheaper).
  2. the share of step time spent waiting for data in a 2-rank CPU training run of the
     launcher's defaults (debug model, built-in digits): `deepspeed --num_gpus 2
     launchers/pretrain.py`, read from its metrics.jsonl ("time/data_wait_s" / "time/step_s"),
     over the logged intervals after the first (which holds the workers' and DALI's start, and
     is reported apart), and split into the intervals that start an epoch (the loader forks
     new workers then) and those that do not.
  3. with a CUDA device only: images/s of the same TrainLoader decoding on the GPU (DALI's
     "mixed" nvJPEG decoder), on the photos, for one GPU, and its ratio to the CPU path; at
     the plan's share of JPEGs for the hardware JPEG decoder (engine/plan/decode.py) and, as the
     lever off and further on, at 0 (nvJPEG's CUDA decoder alone) and 0.9; and at the plan's
     share with whole images decoded instead of the crop window.

Absolute figures depend on the machine and its load; the ratios are the result. The default
run takes about 4 minutes on 2 shared cores.

    python benchmarks/data.py [--photos 512 --batch 32 --workers <cores> --timed 24 --repeats 3 --steps 40]
"""
import argparse
import functools
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.loss import _cpu_name  # noqa: E402
from benchmarks.versions import versions  # noqa: E402

PIPELINES = ("ours", "open_clip")
IMAGE_SIZE = 224
SEED = 0
# Environment that would make the single-process TrainLoader believe it is one rank of many.
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE")
CAPTION_WORDS = ("a", "photo", "of", "the", "sky", "over", "hills", "at", "dusk", "blurry", "close", "up",
                 "river", "city", "dog", "on", "grass", "painting", "red", "blue", "morning")


# ---- data sets ------------------------------------------------------------------------------
def write_photos(out: Path, count: int, width: int, height: int) -> dict:
    """`count` JPEGs of width x height (one in four turned portrait, as in photo collections)
    with short captions, as MDS with the converter's columns. Smooth colour fields plus noise:
    JPEG's cost depends on the content, and flat images would decode unrealistically fast."""
    import numpy as np
    from PIL import Image
    from streaming import MDSWriter

    rng = np.random.default_rng(SEED)
    # One noise texture, cut at a random place for each image: drawing fresh noise per image
    # took most of the set's writing time.
    side = 2 * max(width, height)
    noise = rng.normal(0, 6, size=(side, side, 3)).astype(np.float32)
    sizes = []
    with MDSWriter(out=str(out), columns={"jpg": "bytes", "txt": "str"}, size_limit="8mb") as writer:
        for index in range(count):
            w, h = (height, width) if index % 4 == 3 else (width, height)
            corners = rng.integers(0, 256, size=(3, 4, 3), dtype=np.uint8)  # a 4x3 grid of colours
            field = np.asarray(Image.fromarray(corners).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
            top, left = rng.integers(0, side - max(width, height), size=2)
            pixels = np.clip(field + noise[top:top + h, left:left + w], 0, 255).astype(np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
            sizes.append(buffer.tell())
            caption = " ".join(rng.choice(CAPTION_WORDS, size=int(rng.integers(4, 12))))
            writer.write({"jpg": buffer.getvalue(), "txt": caption})
    return dict(count=count, width=width, height=height, mean_kib=sum(sizes) / len(sizes) / 1024)


# ---- one measurement, in its own process ----------------------------------------------------
def our_batches(data: str, batch: int, workers: int, decode_device: str):
    """`decode_device`: "cpu", "gpu", or "gpu@SHARE" with the hardware JPEG decoder's share,
    and "+whole" to decode whole images and slice the crop from them (train_graph.train_pipeline)."""
    from engine.data import train_graph
    from engine.data.loader import TrainLoader
    from engine.data.spec import DataSpec
    from engine.data.text import ClipTokenizer
    from engine.plan.decode import MAX_DECODE_THREADS  # the plan's rule for one rank

    decode_device, whole, _ = decode_device.partition("+whole")
    if whole:  # this process measures only this variant: the loader's pipeline, whole images decoded
        train_graph.train_pipeline = functools.partial(train_graph.train_pipeline, whole_decode=True)
    device, _, share = decode_device.partition("@")
    loader = TrainLoader.from_data(
        data, micro_batch=batch, image_size=IMAGE_SIZE, spec=DataSpec(), seed=SEED, workers=workers,
        decode_device=device, tokenizer=ClipTokenizer(), rank=0, world_size=1,
        decode_threads=min(MAX_DECODE_THREADS, len(os.sched_getaffinity(0))),
        hw_decoder_load=float(share) if share else None)
    for item in loader:
        yield item["image"]


def open_clip_batches(data: str, batch: int, workers: int):
    """open_clip's training transform over the same MDS samples, epoch after epoch."""
    from PIL import Image
    from streaming import StreamingDataset
    from torch.utils.data import DataLoader
    import open_clip

    transform = open_clip.image_transform(IMAGE_SIZE, is_train=True)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")

    class OpenClipSamples(StreamingDataset):
        def __getitem__(self, index):
            sample = super().__getitem__(index)
            with Image.open(io.BytesIO(sample["jpg"])) as image:
                pixels = transform(image.convert("RGB"))
            return pixels, tokenizer([sample["txt"]])[0]

    samples = OpenClipSamples(local=data, batch_size=batch, shuffle=True, shuffle_seed=SEED)
    loader = DataLoader(samples, batch_size=batch, num_workers=workers, drop_last=True,
                        multiprocessing_context="fork" if workers else None)
    while True:  # each pass is an epoch: the workers restart, as TrainLoader's do
        for images, _tokens in loader:
            yield images


def cpu_seconds() -> float:
    """CPU time of this process (all threads: DALI's among them) and of its children, live and
    ended (the DataLoader workers of this epoch and of the epochs before)."""
    import psutil

    me = psutil.Process()
    own = me.cpu_times()
    total = own.user + own.system + own.children_user + own.children_system
    for child in me.children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.NoSuchProcess:  # ended and reaped since the listing: counted above or lost
            continue
        total += times.user + times.system
    return total


def run_case(pipeline: str, data: str, batch: int, workers: int, warmup: int, timed: int,
             decode_device: str = "cpu") -> dict:
    import torch

    for name in LAUNCHER_VARIABLES:
        os.environ.pop(name, None)
    batches = (our_batches(data, batch, workers, decode_device) if pipeline == "ours"
               else open_clip_batches(data, batch, workers))
    started = time.perf_counter()
    for _ in range(warmup):
        images = next(batches)
    # Workers are reaped only inside next() (on this thread), so no worker's time is counted
    # twice or lost between these two readings.
    warm, cpu_before = time.perf_counter(), cpu_seconds()
    for _ in range(timed):
        images = next(batches)
    if images.is_cuda:
        torch.cuda.synchronize()
    seconds, cpu = time.perf_counter() - warm, cpu_seconds() - cpu_before
    shape = list(images.shape)
    batches.close()  # stops the workers before the process exits
    return dict(pipeline=pipeline, decode_device=decode_device, shape=shape, warmup_s=warm - started,
                seconds=seconds, cpu_seconds=cpu, images_per_s=timed * batch / seconds,
                images_per_cpu_s=timed * batch / cpu)


def in_subprocess(pipeline: str, data: Path, args, decode_device: str = "cpu") -> dict:
    command = [sys.executable, __file__, "--case", pipeline, str(data), decode_device, str(args.batch),
               str(args.workers), str(args.warmup), str(args.timed)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        why = (result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[-1]
        raise RuntimeError(f"{pipeline} on {data} failed: {why}")
    return json.loads(lines[-1])


def compare(sets: dict[str, Path], args) -> dict:
    """Each set: every repeat runs ours, then open_clip's; medians and their ratios."""
    results = {}
    for name, data in sets.items():
        runs = {pipeline: [] for pipeline in PIPELINES}
        for repeat in range(args.repeats):
            for pipeline in PIPELINES:
                row = in_subprocess(pipeline, data, args)
                runs[pipeline].append(row)
                print(f"  {name:>6} repeat {repeat + 1}: {pipeline:>9} {row['images_per_s']:7.1f} images/s, "
                      f"{row['images_per_cpu_s']:6.1f} per CPU-second (warm-up {row['warmup_s']:.1f} s)", flush=True)
        results[name] = {"runs": runs}
        for measure in ("images_per_s", "images_per_cpu_s"):
            medians = {p: statistics.median(r[measure] for r in rows) for p, rows in runs.items()}
            results[name][f"median_{measure}"] = medians
            results[name][f"ratio_{measure}"] = medians["ours"] / medians["open_clip"]
    return results


# ---- data wait in a training run ------------------------------------------------------------
def data_wait_share(steps: int, log_every: int, ranks: int) -> dict:
    """Run the launcher's defaults on `ranks` CPU ranks; the data-wait share of each logged
    interval. Evaluation and checkpoints happen only after the last logged step, so that no
    interval's wall time holds them."""
    import torch

    from engine.dist import free_port

    beside = Path(sys.executable).with_name("deepspeed")  # this interpreter's DeepSpeed
    deepspeed = str(beside) if beside.exists() else "deepspeed"
    # A CPU run wherever this runs: the figure is about the CPU data path. The deepspeed launcher
    # sets CUDA_VISIBLE_DEVICES for its ranks itself, so on a machine with GPUs each rank is
    # started through `env`, which hides them again.
    hide_gpus = ["--no_python", "--no_local_rank", "env", "CUDA_VISIBLE_DEVICES=", sys.executable]
    with tempfile.TemporaryDirectory(prefix="clipzero-data-bench-") as tmp:
        out = Path(tmp) / "run"
        command = [deepspeed, "--num_gpus", str(ranks), "--master_port", str(free_port()),
                   *(hide_gpus if torch.cuda.is_available() else []), "launchers/pretrain.py",
                   "--steps", str(steps), "--log-every", str(log_every), "--eval-every", str(steps),
                   "--checkpoint-every", str(steps), "--out", str(out)]
        print("$ " + " ".join(command), flush=True)
        started = time.perf_counter()
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1200)
        wall = time.perf_counter() - started
        if result.returncode != 0:
            raise RuntimeError(f"training run failed (exit {result.returncode}):\n{result.stdout[-3000:]}\n"
                               f"{result.stderr[-3000:]}")
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        plan = json.loads((out / "plan.json").read_text())
    steps_per_epoch = plan["dataset_size"] // plan["global_batch"]
    intervals, previous = [], 0
    for row in (r for r in rows if "time/step_s" in r):
        # Step k * steps_per_epoch + 1 starts an epoch: its first batch comes from freshly forked workers.
        epoch_start = any(k * steps_per_epoch + 1 in range(previous + 1, row["step"] + 1)
                          for k in range(1, row["step"] // steps_per_epoch + 1))
        intervals.append(dict(step=row["step"], steps=row["step"] - previous, step_s=row["time/step_s"],
                              data_wait_s=row["time/data_wait_s"], samples_per_s=row["samples_per_s"],
                              epoch_start=epoch_start))
        previous = row["step"]
    # The first interval holds the start of the workers and of DALI's pipeline: reported apart.
    steady = intervals[1:]
    within = [r for r in steady if not r["epoch_start"]]
    return dict(command=" ".join(command).replace(str(out), "<tmp>/run"), ranks=ranks, wall_s=wall,
                plan={k: plan.get(k) for k in ("model", "global_batch", "micro_batch", "workers", "image_size",
                                               "decode_device", "dataset_size")},
                steps_per_epoch=steps_per_epoch, intervals=intervals, **wait_summary("steady", steady),
                **wait_summary("within_epoch", within),
                **wait_summary("epoch_start", [r for r in steady if r["epoch_start"]]),
                **wait_summary("first_interval", intervals[:1]))


def wait_summary(name: str, intervals: list[dict]) -> dict:
    """Mean step time and data wait over the intervals (weighted by their steps), and the share."""
    steps = sum(r["steps"] for r in intervals)
    if not steps:
        return {name: None}
    step_s = sum(r["steps"] * r["step_s"] for r in intervals) / steps
    wait_s = sum(r["steps"] * r["data_wait_s"] for r in intervals) / steps
    return {name: dict(steps=steps, step_s=step_s, data_wait_s=wait_s, data_wait_share=wait_s / step_s)}


# ---- main -----------------------------------------------------------------------------------
def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, default=512, help="synthetic JPEGs in the photos set")
    parser.add_argument("--photo-size", type=int, nargs=2, default=(500, 375), metavar=("W", "H"))
    parser.add_argument("--batch", type=int, default=32, help="images per batch, both pipelines")
    parser.add_argument("--workers", type=int, default=os.cpu_count(),
                        help="DataLoader workers, both pipelines (default: one per core)")
    parser.add_argument("--warmup", type=int, default=3, help="batches before timing")
    parser.add_argument("--timed", type=int, default=24, help="batches timed per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40, help="training steps of the data-wait run")
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--skip", nargs="*", default=[], choices=["images", "wait", "gpu"])
    parser.add_argument("--out", help="default: benchmarks/results/data_<cpu|gpu>.json")
    parser.add_argument("--case", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        pipeline, data, device, batch, workers, warmup, timed = args.case
        print(json.dumps(run_case(pipeline, data, int(batch), int(workers), int(warmup), int(timed), device)))
        return
    if args.photos < args.batch:
        parser.error(f"--photos {args.photos} is less than one batch of {args.batch}")

    import torch

    from engine.data.embedded import ensure_digits

    has_gpu = torch.cuda.is_available()
    out = Path(args.out or ROOT / f"benchmarks/results/data_{'gpu' if has_gpu else 'cpu'}.json")
    started = time.perf_counter()
    report = dict(machine=dict(cpu=_cpu_name(), cores=os.cpu_count(), load_average_before=os.getloadavg(),
                               gpu=torch.cuda.get_device_name(0) if has_gpu else None,
                               **versions("torch", "dali", "open_clip", "streaming", "pillow")),
                  arguments={k: v for k, v in vars(args).items() if k not in ("case", "out")},
                  image_size=IMAGE_SIZE)
    print(f"{report['machine']['cpu']}, {report['machine']['cores']} cores, load average "
          f"{report['machine']['load_average_before'][0]:.2f}; batch {args.batch}, {args.workers} workers, "
          f"{args.timed} timed batches x {args.repeats} repeats", flush=True)
    with tempfile.TemporaryDirectory(prefix="clipzero-data-bench-") as tmp:
        photos = Path(tmp) / "photos"
        report["photos"] = write_photos(photos, args.photos, *args.photo_size)
        sets = {"photos": photos, "digits": ensure_digits().train}
        if "images" not in args.skip:
            print("images/s at 224 px, ours vs open_clip:", flush=True)
            report["images_per_s"] = compare(sets, args)
        if "gpu" in args.skip:
            report["gpu"], report["gpu_reason"] = None, "skipped with --skip gpu"
        elif not has_gpu:
            report["gpu"], report["gpu_reason"] = None, "no CUDA device visible"
            print("GPU decode: skipped, no CUDA device visible", flush=True)
        else:
            report["gpu"] = gpu_decode(photos, args, report)
    if "wait" not in args.skip:
        print(f"data wait in a {args.ranks}-rank CPU training run of {args.steps} steps:", flush=True)
        report["data_wait"] = data_wait_share(args.steps, args.log_every, args.ranks)
    report["machine"]["load_average_after"] = os.getloadavg()
    report["seconds"] = time.perf_counter() - started
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print_summary(report)
    print(f"wrote {out} in {report['seconds']:.0f} s")


def gpu_decode(photos: Path, args, report: dict) -> dict:
    """Ours decoding on the GPU, at the plan's hardware-decoder share and at 0 and 0.9, and at
    the plan's share decoding whole images, the variants alternating within each repeat."""
    from engine.plan.decode import HW_DECODER_LOAD, has_hw_jpeg_decoder
    from engine.plan.hardware import probe

    plan_share = HW_DECODER_LOAD if has_hw_jpeg_decoder(probe()) else 0.0
    # Each share with the crop window decoded (as training does), and the plan's share with
    # whole images decoded: whether a windowed decode keeps the hardware decoder out.
    shares = [*dict.fromkeys((plan_share, 0.0, 0.9)), f"{plan_share}+whole"]
    runs = {share: [] for share in shares}
    for repeat in range(args.repeats):
        for share in shares:
            row = in_subprocess("ours", photos, args, decode_device=f"gpu@{share}")
            runs[share].append(row)
            print(f"  GPU decode, hardware share {share}, repeat {repeat + 1}: {row['images_per_s']:.1f} images/s",
                  flush=True)
    medians = {share: statistics.median(r["images_per_s"] for r in rows) for share, rows in runs.items()}
    cpu_path = report.get("images_per_s", {}).get("photos", {}).get("median_images_per_s", {}).get("ours")
    median = medians[plan_share]
    result = dict(device=report["machine"]["gpu"], plan_hw_decoder_load=plan_share, median_images_per_s=median,
                  ratio_over_cpu_path=median / cpu_path if cpu_path else None,
                  by_hw_decoder_load={str(share): dict(median_images_per_s=medians[share],
                                                       ratio_over_plan=medians[share] / median, runs=runs[share])
                                      for share in shares})
    print(f"GPU decode (DALI mixed) on the photos: {median:.1f} images/s on one GPU at the plan's share "
          f"{plan_share}; " + ", ".join(f"{share}: {medians[share] / median:.2f}x" for share in shares), flush=True)
    return result


def print_summary(report: dict) -> None:
    if report.get("images_per_s"):
        print(f"\n{'set':>7} {'ours img/s':>11} {'open_clip':>10} {'ratio':>6}   "
              f"{'ours img/CPU-s':>14} {'open_clip':>10} {'ratio':>6}")
    for name, result in report.get("images_per_s", {}).items():
        wall, cpu = result["median_images_per_s"], result["median_images_per_cpu_s"]
        print(f"{name:>7} {wall['ours']:11.1f} {wall['open_clip']:10.1f} {result['ratio_images_per_s']:6.2f}   "
              f"{cpu['ours']:14.1f} {cpu['open_clip']:10.1f} {result['ratio_images_per_cpu_s']:6.2f}")
    if report.get("gpu"):
        ratio = report["gpu"]["ratio_over_cpu_path"]
        print(f"GPU decode on the photos: {report['gpu']['median_images_per_s']:.1f} images/s per GPU"
              + (f", {ratio:.1f}x the CPU path" if ratio else ""))
    wait = report.get("data_wait")
    if wait:
        print(f"\ndata wait / step time, {wait['ranks']} ranks ({wait['steps_per_epoch']} steps per epoch):")
        for part in ("steady", "within_epoch", "epoch_start", "first_interval"):
            if wait[part]:
                print(f"  {part:>14}: {wait[part]['data_wait_share']:6.1%} of {wait[part]['step_s']:.3f} s per step "
                      f"({wait[part]['steps']} steps)")


if __name__ == "__main__":
    main()
