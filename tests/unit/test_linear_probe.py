"""The linear probe (engine/eval/linear_probe.py): CLIP's search for C, run on a validation
split of the training set and never on the test set; features that separate the classes score
100%, shuffled labels about chance; and the launcher's path over tiny ImageFolders
with a model built so that only the pre-projection features can score."""
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from torch import nn

from engine.data.text import ClipTokenizer
from engine.errors import UserError
from engine.eval import linear_probe as probe
from engine.eval.load_run import LoadedRun
from engine.models.towers import TowerOutput
from launchers import evaluate as launcher

SIDE = 32
COLOURS = {"apple": (220, 30, 30), "boat": (30, 200, 40), "cloud": (40, 60, 230), "drum": (230, 220, 40)}


def clusters(per_class: int, seed: int, classes: int = 4, spread: float = 0.3):
    """Points around well-apart centres (5 x the basis vectors), labels in class order."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), per_class)
    return 5.0 * np.eye(classes + 2)[labels] + spread * rng.normal(size=(len(labels), classes + 2)), labels


def test_validation_split_is_seeded_per_class_and_inside_train():
    labels = np.array([0] * 2 + [1] * 5 + [2] * 10 + [3] * 23)
    fit, held_out = probe.validation_split(labels)
    assert sorted(np.r_[fit, held_out].tolist()) == list(range(len(labels)))   # a partition of train
    assert [int(np.sum(labels[held_out] == c)) for c in range(4)] == [1, 1, 2, 5]   # 20%, at least one
    assert all(np.any(labels[fit] == c) for c in range(4))                          # never all of a class
    again = probe.validation_split(labels)
    assert np.array_equal(again[1], held_out)
    assert not np.array_equal(probe.validation_split(labels, seed=1)[1], held_out)


def test_search_walks_down_to_an_eighth_of_a_decade():
    best, tried = probe.search_log10_c(lambda e: -abs(e - 1.375))
    assert best == 1.375
    assert {-6.0, -4.0, -2.0, 0.0, 2.0, 4.0, 6.0} <= set(tried) and len(tried) == 7 + 2 * 4
    assert all(-6 <= e <= 6 and (8 * e).is_integer() for e in tried)
    # A plateau (every C from 0.1 up is perfect): the smallest perfect C, the strongest regularisation.
    best, _ = probe.search_log10_c(lambda e: float(e >= -1))
    assert best == -1.0


def test_separable_features_score_everything():
    train_x, train_y = clusters(30, seed=0)
    test_x, test_y = clusters(15, seed=1)
    outcome = probe.probe_features(train_x, train_y, test_x, test_y)
    assert (outcome.test_top1, outcome.test_mean_per_class_recall, outcome.validation_top1) == (1.0, 1.0, 1.0)
    assert (outcome.fit_images, outcome.validation_images) == (4 * 24, 4 * 6) and outcome.unconverged == 0


def test_shuffled_labels_score_about_chance():
    """Labels shuffled away from their images on both sides: what the probe learns means nothing
    and its predictions are independent of the test labels. (Shuffling the training labels
    alone maps each tight cluster to one arbitrary class: 0, 25, 50 ... % by luck.)"""
    train_x, train_y = clusters(15, seed=0)
    test_x, test_y = clusters(40, seed=1)
    rng = np.random.default_rng(2)
    outcome = probe.probe_features(train_x, rng.permutation(train_y), test_x, rng.permutation(test_y))
    assert abs(outcome.test_top1 - 0.25) < 0.12      # 4 classes; the true labels give 1.0


def test_c_is_chosen_on_the_validation_split_never_the_test_set(monkeypatch):
    # Overlapping clusters, so that validation accuracy depends on C.
    train_x, train_y = clusters(15, seed=3, spread=3.0)
    test_x, test_y = clusters(15, seed=4, spread=3.0)
    calls = []

    class Recording(LogisticRegression):
        def fit(self, x, y):
            calls.append(("fit", x.copy(), self.C))
            return super().fit(x, y)

        def predict(self, x):
            calls.append(("predict", x.copy(), self.C))
            return super().predict(x)

    monkeypatch.setattr(probe, "LogisticRegression", Recording)
    outcome = probe.probe_features(train_x, train_y, test_x, test_y)
    fit, held_out = probe.validation_split(train_y)
    *sweep, (_, last_fit, last_fit_c), (_, last_predict, last_predict_c) = calls
    assert len(sweep) == 2 * len(outcome.tried)
    assert all(np.array_equal(x, train_x[fit]) for kind, x, _ in sweep if kind == "fit")
    assert all(np.array_equal(x, train_x[held_out]) for kind, x, _ in sweep if kind == "predict")
    assert np.array_equal(last_fit, train_x) and np.array_equal(last_predict, test_x)   # the refit, scored once
    assert last_fit_c == last_predict_c == outcome.c
    assert len(set(outcome.tried.values())) > 1   # C mattered on this data
    # The test labels take no part: shuffling them changes the score, not the choice.
    shuffled = probe.probe_features(train_x, train_y, test_x, np.random.default_rng(5).permutation(test_y))
    monkeypatch.undo()
    assert (shuffled.c, shuffled.tried) == (outcome.c, outcome.tried) and shuffled.test_top1 != outcome.test_top1


class ColourFeatures(nn.Module):
    """Pre-projection features: the image's mean normalised colour. The embedding is the same
    for every image, so a probe of the embedding could only score chance."""

    def image_outputs(self, images):
        colour = images.float().mean((2, 3))
        return TowerOutput(torch.ones_like(colour), colour)


def hand_made_run() -> LoadedRun:
    return LoadedRun(model=ColourFeatures().eval(), tokenizer=ClipTokenizer(16), clean_text=None,
                     plan={"method": "clip", "model": "test"}, run_dir=None, checkpoint=None, step=0,
                     image_size=SIDE)


def png(colour, width=SIDE) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, SIDE), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def image_folder(root, per_class: int, shift: int = 0):
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for copy in range(per_class):   # shades of the class colour, of different sizes
            shade = tuple(min(255, max(0, v + 8 * (copy + shift) - 12)) for v in colour)
            (root / name / f"{copy}.png").write_bytes(png(shade, SIDE + 4 * copy))
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    return image_folder(root / "train", 4), image_folder(root / "test", 2, shift=1)


def test_the_launchers_path_probes_the_features(folders, tmp_path, monkeypatch, capsys):
    train, test = folders
    (train / "apple" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")   # left out, counted
    result = probe.linear_probe(hand_made_run(), str(train), str(test))
    (train / "apple" / "broken.png").unlink()
    assert result.task == "linear-probe" and result.name == "train-test"
    assert result.metrics == {"linear_probe_top1": 1.0, "linear_probe_mean_per_class_recall": 1.0,
                              "linear_probe_validation_top1": 1.0}
    assert set(result.settings) == {"C"} and 1e-6 <= result.settings["C"] <= 1e6
    assert result.counts == {"train_images": 12, "validation_images": 4, "test_images": 8, "classes": 4, "left_out": 1,
                      "unconverged_fits": 0}

    monkeypatch.setattr("engine.eval.load_run.load_run", lambda path, device: hand_made_run())
    out = tmp_path / "probe.json"
    assert launcher.main(["nowhere", "--task", "linear-probe", "--train", str(train), "--test", str(test),
                          "--out", str(out), "--device", "cpu"]) == 0
    written = json.loads(out.read_text())
    assert written["task"] == "linear-probe" and written["metrics"]["linear_probe_top1"] == 1.0
    assert "linear_probe_top1" in capsys.readouterr().out


def test_bad_folders_are_refused_with_the_fix(folders, tmp_path):
    train, test = folders
    run = hand_made_run()
    with pytest.raises(UserError, match=r"--train .*nowhere: not a directory"):
        probe.linear_probe(run, str(tmp_path / "nowhere"), str(test))
    other = image_folder(tmp_path / "other", 2)
    (other / "drum").rename(other / "egg")
    with pytest.raises(UserError, match=r"same class folders: only in --train: \['drum'\]; only in --test: \['egg'\]"):
        probe.linear_probe(run, str(train), str(other))
    thin = image_folder(tmp_path / "thin", 2)
    (thin / "boat" / "1.png").unlink()
    with pytest.raises(UserError, match=r"at least 2 usable images .* boat \(1\)"):
        probe.linear_probe(run, str(thin), str(test))


@pytest.mark.parametrize("args, message", [
    (["--task", "linear-probe", "--train", "a"], "--task linear-probe needs --test"),
    (["--task", "voc07-svm", "--test", "a"], "--task voc07-svm needs --train"),
    (["--task", "zeroshot", "--images", "a", "--train", "b"],
     "--train belongs to --task linear-probe or voc07-svm, not --task zeroshot"),
    (["--task", "linear-probe", "--train", "a", "--test", "b", "--train-split", "trainval"],
     "--train-split belongs to --task voc07-svm, not --task linear-probe"),
    (["--task", "linear-probe", "--train", "a", "--test", "b", "--images", "c"],
     "--images belongs to --task zeroshot, not --task linear-probe"),
])
def test_options_of_another_task_are_refused(args, message):
    with pytest.raises(UserError) as caught:
        launcher.check_options(launcher.parse_args(["run", *args]))
    assert str(caught.value) == message
