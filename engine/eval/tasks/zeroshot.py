"""Zero-shot classification of an ImageFolder (DIR/<class>/<image>, classes in sorted folder
order): top-1, top-5 and mean per-class recall, scored by engine/eval/benchmark.py."""
from __future__ import annotations

from engine.eval.base import EvalOption, Evaluation
from engine.eval.benchmark import ZeroShotSet, score_zeroshot
from engine.eval.shard import ALONE


class ZeroShot(Evaluation):
    options = (
        EvalOption("images", "ImageFolder directory, DIR/<class>/<image>", metavar="DIR", required=True),
        EvalOption("classnames", "'imagenet' (open_clip's names), or a FILE: one name per line, a JSON list, "
                   "or a classes.json with 'classnames' (default: the folder names)", metavar="imagenet|FILE"),
        EvalOption("templates", "'openai' (CLIP's 80), 'simple' (open_clip's 7), or a FILE like --classnames, "
                   "each with {} for the class name (default: the --classnames file's 'templates', else openai)",
                   metavar="openai|simple|FILE"),
    )

    def __init__(self, options, data: ZeroShotSet):
        super().__init__(options)
        self.data = data

    @classmethod
    def open(cls, given):
        options = cls.with_defaults(given)
        return cls(options, ZeroShotSet.open(options["images"], options["classnames"], options["templates"]))

    def score(self, model, device="cpu", interrupted=None, ranks=ALONE):
        return score_zeroshot(model, self.data, device, interrupted, ranks)
