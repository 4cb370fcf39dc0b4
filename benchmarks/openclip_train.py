"""open_clip_train as its users run it, for benchmarks/e2e_openclip.py: the packages it needs, its
epochs for a step count, the training CSV it reads, its command line (through a wrapper that
registers our towers as an open_clip model config), its per-step log lines read back, and its
towers built and wrapped for our evaluation."""
import csv
import importlib.util
import json
import re
import sys
from pathlib import Path

OPEN_CLIP_NAME = "clipzero-vit-debug"   # the name the vit-debug towers are registered under in open_clip
# Modules open_clip_train imports at start-up that open_clip itself does not need (pip names).
OPEN_CLIP_TRAIN_NEEDS = ("pandas", "braceexpand", "webdataset", "fsspec", "tqdm", "torchvision")
# Registers the config (none, "", for a model of open_clip's registry), then runs open_clip_train
# exactly as its own command line would.
OPEN_CLIP_WRAPPER = ("import sys\nfrom open_clip import add_model_config\n"
                     "if sys.argv[1]: add_model_config(sys.argv[1])\n"
                     "from open_clip_train.main import main\nsys.exit(1 if main(sys.argv[2:]) == -1 else 0)")
# One step's line of open_clip_train's log: that step's seconds (logging every step, its
# "Batch (t)" mean is over one step) and samples/s.
TRAIN_LINE = re.compile(r"Train Epoch: \d+ \[.*?\] .*?Batch \(t\): (?P<seconds>[\d.]+), "
                        r"(?P<rate>[\d.eE+-]+)/s")


def missing_packages() -> list[str]:
    return [name for name in OPEN_CLIP_TRAIN_NEEDS if importlib.util.find_spec(name) is None]


def steps_per_epoch(pairs: int, batch: int) -> int:
    """open_clip_train's CSV DataLoader drops the last partial batch: whole batches only."""
    return pairs // batch


def openclip_epochs(steps: int, pairs: int, batch: int) -> tuple[int, int]:
    """(epochs, optimizer steps) for open_clip_train closest to `steps`, at least one epoch."""
    per_epoch = steps_per_epoch(pairs, batch)
    if per_epoch < 1:
        raise ValueError(f"a batch of {batch} is more than the {pairs} training pairs")
    epochs = max(1, int(steps / per_epoch + 0.5))
    return epochs, epochs * per_epoch


def csv_limit(steps: int, batch: int, step_times: bool) -> int | None:
    """Pairs in open_clip_train's CSV: all of the training split (None), or with --step-times the
    first steps x batch, so that its one epoch is exactly `steps` optimizer steps."""
    return steps * batch if step_times else None


def parse_openclip_log(text: str, field: str = "rate") -> list[float]:
    """Per-step samples/s ("rate") or seconds ("seconds") of a run logged every step
    (--log-every-n-steps 1), in step order."""
    return [float(match.group(field)) for match in TRAIN_LINE.finditer(text)]


def openclip_precision(our_precision: str) -> str:
    """open_clip_train's --precision for our plan's: bf16 autocast where ours is bf16, else fp32."""
    return "amp_bf16" if our_precision == "bf16" else "fp32"


def write_training_csv(train_mds: Path, folder: Path, limit: int | None = None) -> tuple[Path, int]:
    """The training split (its first `limit` pairs) as image files plus a CSV of (filepath, title),
    in MDS order; (the CSV, its number of pairs)."""
    from streaming import LocalDataset

    dataset = LocalDataset(local=str(train_mds))
    pairs = len(dataset) if limit is None else min(limit, len(dataset))
    images = folder / "images"
    images.mkdir(parents=True)
    table = folder / "train.csv"
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filepath", "title"])
        for index in range(pairs):
            sample = dataset[index]
            path = images / f"{index:06d}.png"   # the built-in set's "jpg" column holds PNG bytes
            path.write_bytes(sample["jpg"])
            writer.writerow([str(path), sample["txt"]])
    return table, pairs


def openclip_model(model: str, work: Path) -> tuple[str, str]:
    """(open_clip's name for our preset, the config file the wrapper registers: "" for its registry's)."""
    from benchmarks.vs_openclip import OPEN_CLIP_MODEL

    spec = OPEN_CLIP_MODEL[model]
    if isinstance(spec, str):
        return spec, ""
    config = work / f"{OPEN_CLIP_NAME}.json"
    config.write_text(json.dumps(spec))
    return OPEN_CLIP_NAME, str(config)


def openclip_command(plan: dict, table: Path, logs: Path, model: tuple[str, str], epochs: int, precision: str,
                     args) -> list[str]:
    beta1, beta2 = plan["betas"]
    low, high = plan["crop_scale"]
    name, config = model
    command = [sys.executable, "-c", OPEN_CLIP_WRAPPER, config,
               "--train-data", str(table), "--dataset-type", "csv", "--csv-separator", ",",
               "--csv-img-key", "filepath", "--csv-caption-key", "title",
               "--model", name, "--device", "cpu", "--precision", precision,
               "--batch-size", str(args.global_batch), "--epochs", str(epochs),
               "--workers", str(args.workers), "--seed", str(args.seed),
               "--lr", repr(plan["lr"]), "--warmup", str(plan["warmup_steps"]), "--lr-scheduler", "cosine",
               "--wd", repr(plan["weight_decay"]), "--beta1", repr(beta1), "--beta2", repr(beta2),
               "--eps", repr(plan["eps"]), "--aug-cfg", f"scale=({low!r},{high!r})",
               "--logs", str(logs), "--name", "openclip", "--log-every-n-steps", "1",
               "--save-frequency", "0", "--zeroshot-frequency", "0", "--val-frequency", "0"]
    if plan.get("grad_clip"):
        command += ["--grad-clip-norm", repr(plan["grad_clip"])]
    return command


def open_clip_towers(model: tuple[str, str]):
    """The towers as open_clip builds them, the config (if any) registered as the wrapper does."""
    import open_clip

    name, config = model
    if config:
        open_clip.add_model_config(config)
    return open_clip.create_model(name, precision="fp32", device="cpu")


class NormalisedEmbeddings:
    """An open_clip model with the unit-length embeddings engine/eval/evaluate.py expects."""

    def __init__(self, model):
        self.model = model

    @property
    def training(self) -> bool:
        return self.model.training

    def eval(self):
        self.model.eval()

    def train(self, mode: bool = True):
        self.model.train(mode)

    def encode_image(self, images):
        return self.model.encode_image(images, normalize=True)

    def encode_text(self, tokens):
        return self.model.encode_text(tokens, normalize=True)
