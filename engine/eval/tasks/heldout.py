"""The held-out split of the training data (`--eval-data`, the built-in data's own by default):
retrieval both ways on its pairs, and zero-shot when its MDS carries classes (a `cls` column
and a classes.json). Training adds it itself, its metrics unprefixed (zeroshot_top1, ...);
given as `--eval heldout:MDS` it scores another such set like any dialled one.

The set is decoded once, into memory, split over the ranks (engine/eval/eval_set.py), and
scored by engine/eval/evaluate.py: the numbers every run has logged since its first version."""
from __future__ import annotations

from engine.data.mds import describe_mds
from engine.eval.base import EvalOption, Evaluation
from engine.eval.benchmark import Result
from engine.eval.eval_set import EvalSet, load_eval_set
from engine.eval.evaluate import evaluate
from engine.eval.shard import ALONE


class HeldOutSplit(Evaluation):
    options = (EvalOption("data", "an MDS directory, its classes (if any) in classes.json", metavar="MDS",
                          required=True),)
    standalone = False   # launchers/evaluate.py --task retrieval --pairs MDS scores its retrieval

    eval_set: EvalSet | None = None   # decoded by load()

    @classmethod
    def open(cls, given):
        evaluation = cls(cls.with_defaults(given))
        describe_mds(evaluation.path)   # an MDS index, read without decoding
        return evaluation

    def load(self, image_size, ranks=ALONE):
        self.eval_set = load_eval_set(self.path, image_size, ranks)

    def score(self, model, device="cpu", interrupted=None, ranks=ALONE):
        metrics = evaluate(model.model, self.eval_set, model.tokenizer, device, clean_text=model.clean_text,
                           interrupted=interrupted)
        return Result("heldout", self.set_name, self.path, metrics)
