"""Evaluations a run does at every evaluation step: the held-out split (engine/eval/tasks/
heldout.py, added by training itself, its metrics unprefixed: zeroshot_top1, ...) and every one
named by the `--eval` dial, NAME:PATH[,option=value...], any evaluation that declares it can run
during training (engine/eval/base.py), a user's own as package.module:Class:PATH:

  --eval zeroshot:DIR[,classnames=imagenet|FILE][,templates=openai|simple|FILE]
  --eval retrieval:FILE|MDS[,split=test][,image_root=DIR]

The same scoring as `launchers/evaluate.py` (engine/eval/benchmark.py), on the model being
trained. A dialled set's metrics are named `eval/<set>/<metric>`, e.g.
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
from typing import Callable

import torch

from engine.errors import UserError
from engine.eval.base import Evaluation
from engine.eval.eval_set import EvalSet
from engine.eval.registry import HELD_OUT, evaluation_class, evaluations, is_registered
from engine.eval.shard import ALONE, Ranks
from engine.observe.metrics import HELD_OUT_SET


@dataclass(frozen=True)
class PeriodicEval:
    task: str                 # the evaluation's name as given: "zeroshot", "package.module:Class"
    name: str                 # the set's name: eval/<name>/... (the held-out split's: "heldout")
    evaluation: Evaluation    # opened: its inputs checked
    prefix: str               # of its metrics' names: "eval/<name>/", "" for the held-out split


def _usage() -> str:
    forms = []
    for name, cls in evaluations("during_training").items():
        path, *rest = cls.options
        forms.append(f"--eval {name}:{path.metavar}" + "".join(f"[,{o.name}={o.metavar}]" for o in rest))
    return f"give {' or '.join(forms)}, or your own evaluation as --eval package.module:Class:PATH"


def _parse(spec: str) -> tuple[str, type[Evaluation], dict[str, str]]:
    """NAME:PATH[,option=value...] -> (NAME, its class, options by name, the path under the first)."""
    head, sep, rest = spec.partition(":")
    if sep and not is_registered(head) and ":" in rest:   # package.module:Class:PATH
        tail, _, rest = rest.partition(":")
        head = f"{head}:{tail}"
    if not sep or not rest or not (is_registered(head) or ":" in head):
        raise UserError(f"--eval {spec}: {_usage()}")
    cls = evaluation_class(head, flag="--eval")
    if not cls.during_training:
        raise UserError(f"--eval {spec}: {head} runs on a trained model only; run it with "
                        f"`python launchers/evaluate.py RUN --task {head}` ({_usage()})")
    path, *pairs = rest.split(",")
    first, *others = cls.options
    options = {first.name: path}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in {o.name for o in others} or not value:
            allowed = ", ".join(f"{o.name}=..." for o in others)
            raise UserError(f"--eval {spec}: {pair!r} is not an option of {head} (it takes {allowed})")
        options[key] = value
    missing = [o.name for o in others if o.required and o.name not in options]
    if missing:
        raise UserError(f"--eval {spec}: {head} needs {', '.join(f'{m}=...' for m in missing)}")
    return head, cls, options


def open_periodic_evals(specs: tuple[str, ...], held_out: str | None = None) -> list[PeriodicEval]:
    """Check the held-out split (when there is one) and every `--eval` dial, and list them, the
    held-out split first (nothing decoded). Raises UserError."""
    evals: list[PeriodicEval] = []
    if held_out is not None:
        evaluation = evaluation_class(HELD_OUT).open({"data": held_out})
        evals.append(PeriodicEval(HELD_OUT, HELD_OUT_SET, evaluation, prefix=""))
    for spec in specs:
        task, cls, options = _parse(spec)
        try:
            evaluation = cls.open(options)
        except UserError as error:
            raise UserError(f"--eval {spec}: {error}") from error
        name = evaluation.set_name
        # The held-out split's TensorBoard set (eval/heldout/) is taken too: the built-in data's
        # held-out folder is named "heldout", and two series in one tag would mix.
        taken = {HELD_OUT_SET} | {e.name for e in evals}
        unique, n = name, 2
        while unique in taken:  # two sets with the same folder name keep apart in the charts
            unique, n = f"{name}-{n}", n + 1
        evals.append(PeriodicEval(task, unique, evaluation, prefix=f"eval/{unique}/"))
    return evals


def held_out_set(evals: list[PeriodicEval]) -> EvalSet | None:
    """The held-out split training added, as loaded (engine/eval/tasks/heldout.py); None without one."""
    return next((e.evaluation.eval_set for e in evals if e.task == HELD_OUT and not e.prefix), None)


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
    """Every evaluation on `model` (put in eval mode here and back after), its metrics named
    with its prefix; split over `ranks`, every one of which calls it."""
    metrics: dict[str, float] = {}
    was_training = model.model.training
    model.model.eval()
    try:
        for periodic in evals:
            result = periodic.evaluation.score(model, device, interrupted, ranks)
            metrics.update({f"{periodic.prefix}{k}": v for k, v in result.metrics.items()})
    finally:
        model.model.train(was_training)
    return metrics
