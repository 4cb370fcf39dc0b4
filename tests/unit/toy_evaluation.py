"""An evaluation written outside engine/, as a user would write one: one class, its options
declared, importable as `toy_evaluation:CountFiles` (tests/unit on the path). Used by
tests/unit/test_eval_plugin.py and tests/integration/test_plugin_evaluation.py."""
from pathlib import Path

import torch

from engine.errors import UserError
from engine.eval.base import EvalOption, Evaluation
from engine.eval.benchmark import Result
from engine.eval.shard import ALONE

PLUGIN = "toy_evaluation:CountFiles"


class CountFiles(Evaluation):
    """The files in a folder, each counted `weight` times; and how alike the model finds a blank
    image and the words "a blank image" (a number that moves with the weights)."""
    options = (EvalOption("folder", "the folder whose files are counted", metavar="DIR", required=True),
               EvalOption("weight", "what each file counts for", metavar="NUMBER", default="1"))

    @classmethod
    def open(cls, given):
        evaluation = cls(cls.with_defaults(given))
        if not Path(evaluation.path).is_dir():
            raise UserError(f"{evaluation.path}: not a directory; give the folder whose files are counted")
        try:
            float(evaluation.given["weight"])
        except ValueError as error:
            raise UserError(f"weight={evaluation.given['weight']}: give a number") from error
        return evaluation

    @torch.no_grad()
    def score(self, model, device="cpu", interrupted=None, ranks=ALONE):
        blank = torch.zeros((1, 3, model.image_size, model.image_size), device=device)
        image = model.model.encode_image(blank).float()
        text = model.model.encode_text(model.tokenizer(["a blank image"]).to(device)).float()
        files = len([p for p in Path(self.path).iterdir() if p.is_file()])
        return Result("count-files", self.set_name, self.path,
                      {"toy_files": files * float(self.given["weight"]),
                       "toy_blank_similarity": float((image * text).sum())},
                      {"files": files})
