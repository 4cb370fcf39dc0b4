"""Evaluations a run does beside its held-out split, named by the `--eval` dial:

  --eval zeroshot:DIR[,classnames=imagenet|FILE][,templates=openai|simple|FILE]
  --eval retrieval:FILE|MDS[,split=test][,image_root=DIR]

The same scoring as `launchers/evaluate.py` (engine/eval/benchmark.py), on the model being
trained, at every evaluation step. Metrics are named `eval/<set>/<metric>`, e.g.
`eval/val/zeroshot_top1`, in TensorBoard and metrics.jsonl. A set named like the held-out
split's charts ("heldout", engine/observe/metrics.tensorboard_tag) is renamed "heldout-2".

Every evaluation is split over the ranks (engine/eval/shard.py): each rank reads, decodes and
encodes only its block of the images and of the texts (class prompts, captions), in forwards
padded to the same count and length on every rank (ZeRO-3 gathers parameters inside each
forward, so all ranks must run the same forwards), and the embeddings are all-gathered; every
rank gets the same numbers. Images are decoded a batch at a time at each evaluation, so a large
folder costs time, not memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from engine.errors import UserError
from engine.eval.benchmark import RetrievalSet, ZeroShotSet, score_retrieval, score_zeroshot
from engine.eval.shard import ALONE, Ranks
from engine.observe.metrics import HELD_OUT_SET

# Options each task takes after its path, as launchers/evaluate.py names them.
TASK_OPTIONS = {"zeroshot": ("classnames", "templates"), "retrieval": ("split", "image_root")}


@dataclass(frozen=True)
class PeriodicEval:
    task: str                 # "zeroshot" | "retrieval"
    name: str                 # the metrics' prefix: eval/<name>/...
    data: ZeroShotSet | RetrievalSet


def _parse(spec: str) -> tuple[str, str, dict[str, str]]:
    usage = ("give --eval zeroshot:DIR[,classnames=imagenet|FILE][,templates=openai|simple|FILE] or "
             "--eval retrieval:FILE|MDS[,split=NAME][,image_root=DIR]")
    task, sep, rest = spec.partition(":")
    if not sep or task not in TASK_OPTIONS or not rest:
        raise UserError(f"--eval {spec}: {usage}")
    path, *pairs = rest.split(",")
    options = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in TASK_OPTIONS[task] or not value:
            allowed = ", ".join(f"{o}=..." for o in TASK_OPTIONS[task])
            raise UserError(f"--eval {spec}: {pair!r} is not an option of {task} (it takes {allowed})")
        options[key] = value
    return task, path, options


def open_periodic_evals(specs: tuple[str, ...]) -> list[PeriodicEval]:
    """Check every `--eval` dial and list its set (no image decoded). Raises UserError."""
    evals: list[PeriodicEval] = []
    for spec in specs:
        task, path, options = _parse(spec)
        try:
            if task == "zeroshot":
                data = ZeroShotSet.open(path, options.get("classnames"), options.get("templates"))
            else:
                data = RetrievalSet.open(path, options.get("split", "test"), options.get("image_root"))
        except UserError as error:
            raise UserError(f"--eval {spec}: {error}") from error
        name = Path(path).resolve().name if task == "zeroshot" else data.name
        # The held-out split's TensorBoard set (eval/heldout/) is taken too: the built-in data's
        # held-out folder is named "heldout", and two series in one tag would mix.
        taken = {HELD_OUT_SET} | {e.name for e in evals}
        unique, n = name, 2
        while unique in taken:  # two sets with the same folder name keep apart in the charts
            unique, n = f"{name}-{n}", n + 1
        evals.append(PeriodicEval(task, unique, data))
    return evals


@dataclass(frozen=True)
class TrainedModel:
    """The model being trained, as scoring sees it (engine/eval/benchmark.ModelToScore)."""
    model: torch.nn.Module
    tokenizer: Callable[[list[str]], torch.Tensor]
    clean_text: Callable[[str], str] | None
    image_size: int


@torch.no_grad()
def run_periodic_evals(evals: list[PeriodicEval], model: TrainedModel, device: torch.device,
                       interrupted: Callable[[], bool] | None = None, ranks: Ranks = ALONE) -> dict[str, float]:
    """Every dialled evaluation on `model` (put in eval mode here and back after), its metrics
    named eval/<set>/<metric>; split over `ranks`, every one of which calls it."""
    metrics: dict[str, float] = {}
    was_training = model.model.training
    model.model.eval()
    try:
        for evaluation in evals:
            score = score_zeroshot if evaluation.task == "zeroshot" else score_retrieval
            result = score(model, evaluation.data, device, interrupted, ranks)
            metrics.update({f"eval/{evaluation.name}/{k}": v for k, v in result.metrics.items()})
    finally:
        model.model.train(was_training)
    return metrics
