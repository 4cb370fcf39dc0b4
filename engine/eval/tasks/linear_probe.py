"""A logistic regression on the image tower's frozen features (CLIP's protocol), fit on one
ImageFolder and scored on another: engine/eval/linear_probe.py. Standalone only: a fit per
evaluation step would cost more than the training it measures."""
from __future__ import annotations

from engine.eval.base import EvalOption, Evaluation
from engine.eval.shard import ALONE


class LinearProbe(Evaluation):
    options = (
        EvalOption("train", "ImageFolder directory", metavar="DIR", required=True),
        EvalOption("test", "the set scored, laid out as --train", metavar="DIR", required=True),
    )
    during_training = False

    def score(self, model, device="cpu", interrupted=None, ranks=ALONE):
        # Deferred: scikit-learn takes seconds to import, and --help lists every evaluation.
        from engine.eval.linear_probe import linear_probe
        return linear_probe(model, self.given["train"], self.given["test"], device)
