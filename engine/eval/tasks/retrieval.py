"""Image-text retrieval, R@1/5/10 both ways, on a Karpathy-split JSON (several captions per
image) or an MDS directory (one per image), scored by engine/eval/benchmark.py."""
from __future__ import annotations

from engine.eval.base import EvalOption, Evaluation
from engine.eval.benchmark import RetrievalSet, score_retrieval
from engine.eval.shard import ALONE


class Retrieval(Evaluation):
    options = (
        EvalOption("pairs", "a Karpathy-split .json or an MDS directory", metavar="FILE|MDS", required=True),
        EvalOption("split", "the Karpathy split to use (default: test)", metavar="NAME", default="test"),
        EvalOption("image_root", "the folder a Karpathy file's image paths start from (default: the file's "
                   "folder)", metavar="DIR"),
    )

    def __init__(self, options, data: RetrievalSet):
        super().__init__(options)
        self.data = data

    @classmethod
    def open(cls, given):
        options = cls.with_defaults(given)
        return cls(options, RetrievalSet.open(options["pairs"], options["split"], options["image_root"]))

    @property
    def set_name(self) -> str:
        return self.data.name

    def score(self, model, device="cpu", interrupted=None, ranks=ALONE):
        return score_retrieval(model, self.data, device, interrupted, ranks)
