"""An evaluation is one file: one written outside engine/ (tests/unit/toy_evaluation.py) shows
its options in `launchers/evaluate.py --task package.module:Class --help`, runs from that
launcher and from `--eval package.module:Class:PATH`, and is refused with the fix where the
built-in ones are. (tests/integration/test_plugin_evaluation.py runs it in a training run.)"""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.data.text import ClipTokenizer
from engine.errors import UserError
from engine.eval.load_run import LoadedRun
from engine.eval.periodic import TrainedModel, open_periodic_evals, run_periodic_evals
from engine.eval.registry import evaluation_names
from launchers import evaluate as launcher
from toy_evaluation import PLUGIN, CountFiles


class MeanColour(nn.Module):
    """A model of two functions: an image's mean colour; a text's first tokens."""

    def encode_image(self, images):
        return F.normalize(images.mean((2, 3)) + 1.0, dim=-1)

    def encode_text(self, tokens):
        return F.normalize(tokens[:, :3].float(), dim=-1)


def hand_made_run(run_dir) -> LoadedRun:
    return LoadedRun(model=MeanColour(), tokenizer=ClipTokenizer(16), clean_text=None,
                     plan={"method": "clip", "model": "test"}, run_dir=run_dir, checkpoint=run_dir / "checkpoint",
                     step=7, image_size=8)


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "files").mkdir()
    for name in ("a", "b", "c"):
        (tmp_path / "files" / name).write_text(name)
    return tmp_path / "files"


def test_its_options_are_in_help(capsys):
    with pytest.raises(SystemExit) as exit:
        launcher.parse_args(["--task", PLUGIN, "--help"])
    shown = " ".join(capsys.readouterr().out.split())   # unwrapped
    assert exit.value.code == 0
    assert f"--folder DIR {PLUGIN}: the folder whose files are counted" in shown
    assert f"--weight NUMBER {PLUGIN}: what each file counts for" in shown
    assert "--images DIR zeroshot:" in shown          # the built-in ones' stay


def test_it_runs_from_the_launcher(folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("engine.eval.load_run.load_run", lambda path, device: hand_made_run(tmp_path))
    assert launcher.main(["run", "--task", PLUGIN, "--folder", str(folder), "--weight", "2", "--device", "cpu"]) == 0
    written = json.loads((tmp_path / "eval" / "count-files-files.json").read_text())   # RUN/eval/<task>-<set>
    assert written["metrics"]["toy_files"] == 6.0 and written["counts"] == {"files": 3} and written["step"] == 7
    assert "toy_files" in capsys.readouterr().out


def test_it_runs_from_the_eval_dial(folder):
    evals = open_periodic_evals((f"{PLUGIN}:{folder},weight=0.5",))
    assert [(e.task, e.name, e.prefix) for e in evals] == [(PLUGIN, "files", "eval/files/")]
    assert isinstance(evals[0].evaluation, CountFiles)
    run = hand_made_run(folder)
    model = TrainedModel(run.model, run.tokenizer, None, run.image_size)
    metrics = run_periodic_evals(evals, model, torch.device("cpu"))
    assert metrics["eval/files/toy_files"] == 1.5
    assert set(metrics) == {"eval/files/toy_files", "eval/files/toy_blank_similarity"}


@pytest.mark.parametrize("spec, message", [
    ("{plugin}:{folder}/missing", "--eval {plugin}:{folder}/missing: {folder}/missing: not a directory"),
    ("{plugin}:{folder},weight=lots", "weight=lots: give a number"),
    ("{plugin}:{folder},colour=red", "'colour=red' is not an option of {plugin} (it takes weight=...)"),
    ("no_such_module:Thing:{folder}", "--eval no_such_module:Thing: cannot import no_such_module:Thing"),
    ("toy_evaluation:PLUGIN:{folder}", "toy_evaluation:PLUGIN is not a subclass of engine.eval.base.Evaluation"),
    ("linear-probe:{folder}", "linear-probe runs on a trained model only; run it with "
                              "`python launchers/evaluate.py RUN --task linear-probe`"),
    ("classify:{folder}", "give --eval zeroshot:DIR[,classnames=imagenet|FILE][,templates=openai|simple|FILE] "
                          "or --eval retrieval:FILE|MDS[,split=NAME][,image_root=DIR] or --eval heldout:MDS, or "
                          "your own evaluation as --eval package.module:Class:PATH"),
])
def test_a_bad_eval_dial_says_what_to_give(folder, spec, message):
    with pytest.raises(UserError) as error:
        open_periodic_evals((spec.format(plugin=PLUGIN, folder=folder),))
    assert message.format(plugin=PLUGIN, folder=folder) in str(error.value)


@pytest.mark.parametrize("args, message", [
    (["--task", PLUGIN], f"--task {PLUGIN} needs --folder"),
    (["--task", PLUGIN, "--folder", "x", "--images", "y"], f"--images belongs to --task zeroshot, not --task {PLUGIN}"),
    (["--task", PLUGIN, "--folder", "x", "--train", "y"],
     f"--train belongs to --task linear-probe or voc07-svm, not --task {PLUGIN}"),
])
def test_options_are_checked_as_the_built_in_ones(args, message):
    with pytest.raises(UserError) as caught:
        launcher.check_options(launcher.parse_args(["run", *args]))
    assert str(caught.value) == message


def test_the_held_out_split_is_an_evaluation_of_training_only(capsys):
    assert evaluation_names()[:5] == ["zeroshot", "retrieval", "linear-probe", "voc07-svm", "heldout"]
    with pytest.raises(SystemExit):
        launcher.parse_args(["run", "--task", "heldout"])   # not among --task's choices
    assert "invalid choice: 'heldout'" in capsys.readouterr().err
