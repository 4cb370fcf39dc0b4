"""One linear SVM per class on the frozen image features, mAP on VOC07's test split: the
protocol CLIP-Lite reports (engine/eval/voc07.py). Standalone only, as the linear probe."""
from __future__ import annotations

from engine.eval.base import EvalOption, Evaluation
from engine.eval.shard import ALONE


class Voc07Svm(Evaluation):
    options = (
        EvalOption("train", "VOCdevkit year folder or a folder with labels.json (the classifiers are fit on it)",
                   metavar="DIR", required=True),
        EvalOption("test", "the set scored, laid out as --train", metavar="DIR", required=True),
        EvalOption("train_split", "on a VOCdevkit folder: ImageSets/Main split of --train (default: trainval)",
                   metavar="NAME"),
        EvalOption("test_split", "on a VOCdevkit folder: ImageSets/Main split of --test (default: test)",
                   metavar="NAME"),
    )
    during_training = False

    def score(self, model, device="cpu", interrupted=None, ranks=ALONE):
        # Deferred: scikit-learn takes seconds to import, and --help lists every evaluation.
        from engine.eval.voc07 import voc07_svm
        return voc07_svm(model, self.given["train"], self.given["test"], self.given["train_split"],
                         self.given["test_split"], device)
