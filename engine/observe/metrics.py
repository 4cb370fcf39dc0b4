"""Where numbers go: TensorBoard (<run>/tensorboard/) and JSON lines (<run>/metrics.jsonl).

Only rank 0 writes; other ranks get a writer that drops everything, so call sites need no
rank checks.

metrics.jsonl holds one JSON object per line, each with the "step" it belongs to:

  scalars     {"step": 8, "loss": 2.1, "lr": 0.001, ...}      no "kind": a log or evaluation line
  text        {"step": 0, "kind": "text", "tag": "plan", "text": "<plain text>"}
  image       {"step": 1, "kind": "image", "tag": "train/views",
               "path": "visuals/train-views-step00000001.png", ...}   the PNG under the run
               directory, and what the picture shows as data (the writer's caller adds the
               fields: the views' captions, a heatmap's matrix, ...)
  histogram   {"step": 8, "kind": "histogram", "tag": "logit_scale", "count": 8, "min": ..,
               "max": .., "mean": .., "std": .., "quantiles": {"0.1": .., "0.25": .., "0.5": ..,
               "0.75": .., "0.9": ..}}

Every chart TensorBoard shows is in one of these lines: a reader of scalars skips lines that
have a "kind"; a reader of charts picks them by "kind" and "tag".

TensorBoard groups charts by the part of a tag before its first "/", so its tags are sorted
into a few SECTIONS by `tensorboard_tag(name)`, the one mapping from a metrics.jsonl name (or
chart tag) to a TensorBoard tag; metrics.jsonl keeps the names as they are (benchmarks, tests
and the README read them). Rules, first match wins:

  name                                  TensorBoard tag
  train|eval|perf|memory|data/<rest>    unchanged (memory/max_rss_gb, data/bad_records/<reason>,
                                        eval/<set>/<metric> of each --eval set, train/views)
  time/<rest>                           perf/<rest>            (time/step_s -> perf/step_s)
  samples_per_s, tflops_per_s, mfu      perf/<name>
  zeroshot_*, retrieval_*               eval/heldout/<name>    (the held-out split's metrics)
  heldout/<rest>                        eval/heldout/<rest>    (its charts: heatmap, norms)
  anything else                         train/<name>           (loss, loss/<term>, lr,
                                                                logit_scale, skipped_steps)

Scalars, histograms and images (with their notes) go through it; text (the plan) keeps its tag.
"heldout" is reserved: an --eval set of that name is renamed (engine/eval/periodic.py), so
that eval/heldout/ holds the held-out split alone. A run resumed across this change shows
its steps up to the checkpoint under the old, flat tags and the later ones under these.
"""
import json
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
VISUALS = "visuals"  # the PNGs, under the run directory
_STEP_IN_NAME = re.compile(r"-step(\d+)\.png$")

SECTIONS = ("train", "eval", "perf", "memory", "data")  # every TensorBoard tag's first part
HELD_OUT_SET = "heldout"  # the held-out split's set name: eval/heldout/<metric>
_PERF = ("samples_per_s", "tflops_per_s", "mfu")
_HELD_OUT_TASKS = ("zeroshot_", "retrieval_")  # engine/eval/evaluate.py's metric names


def tensorboard_tag(name: str) -> str:
    """The TensorBoard tag of a metrics.jsonl name: under one of SECTIONS (module docstring)."""
    section, _, rest = name.partition("/")
    if section in SECTIONS and rest:
        return name
    if section == "time" and rest:
        return f"perf/{rest}"
    if name in _PERF:
        return f"perf/{name}"
    if name.startswith(_HELD_OUT_TASKS):
        return f"eval/{HELD_OUT_SET}/{name}"
    if section == HELD_OUT_SET and rest:
        return f"eval/{name}"
    return f"train/{name}"


class MetricsWriter:
    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None = None):
        """`resume_step`: the step of the checkpoint this run resumed from. What an earlier run
        logged after it (work lost with a killed run, redone now) is dropped from both
        records, and its pictures with it, so that every step appears once."""
        self.enabled = enabled
        if not enabled:
            return
        # deferred: tensorboard adds about 0.2 s to an import of this module, and only rank 0
        # ever writes.
        from torch.utils.tensorboard import SummaryWriter

        self._run_dir = run_dir
        self._tensorboard = SummaryWriter(log_dir=str(run_dir / "tensorboard"),
                                          purge_step=None if resume_step is None else resume_step + 1)
        path = run_dir / "metrics.jsonl"
        if resume_step is not None and path.exists():
            _drop_lines_after(path, resume_step)
        if resume_step is not None:
            _drop_visuals_after(run_dir / VISUALS, resume_step)
        # Appending keeps the history of a resumed run in one file.
        self._jsonl = open(path, "a", buffering=1)

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for name, value in values.items():
            self._tensorboard.add_scalar(tensorboard_tag(name), value, step)
        self._record({"step": step, **values})

    def text(self, step: int, tag: str, text: str) -> None:
        """Plain text (a table, a log line), shown preformatted in TensorBoard's text tab."""
        if not self.enabled:
            return
        self._tensorboard.add_text(tag, _preformatted(text), step)
        self._record({"step": step, "kind": "text", "tag": tag, "text": text})

    def image(self, step: int, tag: str, pixels: np.ndarray, notes: str | None = None,
              **fields) -> None:
        """An RGB picture, uint8 [H, W, 3]: into TensorBoard, and saved as a PNG under the run
        directory that the jsonl line names beside `fields` (what the picture shows, as data).
        `notes`: markdown shown beside it in TensorBoard's text tab, under the same tag."""
        if not self.enabled:
            return
        name = f"{re.sub(r'[^A-Za-z0-9_.]+', '-', tag)}-step{step:08d}.png"
        path = self._run_dir / VISUALS / name
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        Image.fromarray(pixels).save(tmp, format="PNG")
        os.replace(tmp, path)
        shown = tensorboard_tag(tag)
        self._tensorboard.add_image(shown, pixels, step, dataformats="HWC")
        if notes is not None:
            self._tensorboard.add_text(shown, notes, step)
        self._record({"step": step, "kind": "image", "tag": tag,
                      "path": str(path.relative_to(self._run_dir)), **fields})

    def histogram(self, step: int, tag: str, values) -> None:
        """The distribution of `values` (any array-like of numbers)."""
        if not self.enabled:
            return
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        if values.size == 0:
            return
        self._tensorboard.add_histogram(tensorboard_tag(tag), values, step)
        self._record({"step": step, "kind": "histogram", "tag": tag, **summarise(values)})

    def flush(self) -> None:
        """Everything written so far on disk (TensorBoard buffers its events for up to two minutes)."""
        if self.enabled:
            self._tensorboard.flush()
            self._jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self._tensorboard.close()
            self._jsonl.close()

    def _record(self, row: dict) -> None:
        self._jsonl.write(json.dumps(row) + "\n")


def summarise(values: np.ndarray) -> dict:
    """A histogram's jsonl fields: count, min, max, mean, std and QUANTILES."""
    return {"count": int(values.size), "min": float(values.min()), "max": float(values.max()),
            "mean": float(values.mean()), "std": float(values.std()),
            "quantiles": {str(q): float(v) for q, v in zip(QUANTILES, np.quantile(values, QUANTILES))}}


def _preformatted(text: str) -> str:
    """TensorBoard renders text as markdown: indented lines keep a table's columns."""
    return "\n".join("    " + line for line in text.splitlines())


def _drop_lines_after(path: Path, step: int) -> None:
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError):
            pass  # a line torn by a kill mid-write
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    os.replace(tmp, path)


def _drop_visuals_after(folder: Path, step: int) -> None:
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        match = _STEP_IN_NAME.search(path.name)
        if (match and int(match.group(1)) > step) or path.name.endswith(".tmp"):
            path.unlink()
