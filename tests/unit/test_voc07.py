"""VOC07 one-vs-all SVMs (engine/eval/voc07.py): our AP against scikit-learn's and by hand, the
protocol on features that separate the classes (mAP 1, difficult images left out of the test)
and on shuffled labels (about the positive rate), the cost chosen as cross_val_score would, and
the launcher's path over a tiny VOCdevkit tree and a labels.json folder, bad layouts refused."""
import io
import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import average_precision_score
from sklearn.model_selection import cross_val_score
from torch import nn

from engine.data.text import ClipTokenizer
from engine.errors import UserError
from engine.eval import voc07
from engine.eval.load_run import LoadedRun
from engine.models.towers import TowerOutput
from launchers import evaluate as launcher

SIDE = 32
CLASSES = ["blue", "green", "red"]    # sorted, as the class files list them
CHANNEL = {"red": 0, "green": 1, "blue": 2}


def test_ap_equals_scikit_learns_on_a_hand_made_multilabel_set():
    # 6 images x 3 classes; class 0 ranked [+, -, +, -, -, +] -> AP (1 + 2/3 + 3/6) / 3 = 13/18.
    positive = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1], [0, 1, 1], [1, 0, 0]], dtype=bool)
    scores = np.array([[0.9, 0.2, 0.5], [0.8, 0.7, 0.1], [0.7, 0.6, 0.4], [0.6, 0.1, 0.3], [0.5, 0.9, 0.8],
                       [0.4, 0.3, 0.2]])
    ours = [voc07.average_precision(positive[:, c], scores[:, c]) for c in range(3)]
    theirs = [average_precision_score(positive[:, c], scores[:, c]) for c in range(3)]
    assert ours == theirs and ours[0] == pytest.approx(13 / 18)
    assert np.mean(ours) == pytest.approx(average_precision_score(positive, scores, average="macro"))


def test_ap_equals_scikit_learns_on_random_scores_with_ties():
    rng = np.random.default_rng(0)
    for trial in range(200):
        count = int(rng.integers(2, 60))
        positive = rng.random(count) < rng.uniform(0.05, 0.9)
        positive[rng.integers(count)] = True
        scores = rng.normal(size=count)
        if trial % 2:
            scores = np.round(scores, 1)   # many ties
        assert voc07.average_precision(positive, scores) == average_precision_score(positive, scores)


def test_interpolated_ap_by_hand():
    # Ranked [+, -, -, +, +]: precision 1, 1/2, 1/3, 2/4, 3/5 at recall 1/3, 1/3, 1/3, 2/3, 1.
    positive, scores = np.array([1, 0, 0, 1, 1], dtype=bool), np.array([5.0, 4, 3, 2, 1])
    assert voc07.average_precision(positive, scores) == pytest.approx((1 + 2 / 4 + 3 / 5) / 3)
    # The envelope lifts 2/4 to 3/5 (the best precision at that recall or beyond).
    assert voc07.interpolated_average_precision(positive, scores) == pytest.approx((1 + 3 / 5 + 3 / 5) / 3)
    # A tie is one threshold: scores 3 (-), 2 (+, -), 1 (+) give precision 0, 1/3, 1/2 at recall 0, 1/2, 1.
    positive, scores = np.array([0, 1, 0, 1], dtype=bool), np.array([3.0, 2, 2, 1])
    assert voc07.average_precision(positive, scores) == pytest.approx(1 / 2 * 1 / 3 + 1 / 2 * 1 / 2)
    assert voc07.interpolated_average_precision(positive, scores) == pytest.approx(1 / 2 * 1 / 2 + 1 / 2 * 1 / 2)
    assert voc07.average_precision(positive, scores) == voc07.average_precision(positive[[0, 2, 1, 3]],
                                                                                scores[[0, 2, 1, 3]])


def multilabel(count: int, seed: int, classes: int = 4, noise: float = 0.05):
    """VOC targets (1 / -1) at a ~30% positive rate, features that carry them: the indicators and
    a constant (so that an image of no class does not normalise to pure noise), plus noise."""
    rng = np.random.default_rng(seed)
    present = rng.random((count, classes)) < 0.3
    targets = np.where(present, voc07.PRESENT, voc07.ABSENT).astype(np.int8)
    features = np.c_[present, np.ones(count)] + noise * rng.normal(size=(count, classes + 1)).clip(-3, 3)
    return features, targets


def test_separable_features_score_map_1_with_difficult_images_left_out():
    train_x, train_targets = multilabel(120, seed=0)
    test_x, test_targets = multilabel(80, seed=1)
    # Two difficult test images: one that looks positive for class 0, one that looks negative for
    # class 1. Counted as a negative or as a positive, one of them would cost AP.
    looks_positive = np.flatnonzero(test_targets[:, 0] == voc07.PRESENT)[0]
    looks_negative = np.flatnonzero(test_targets[:, 1] == voc07.ABSENT)[0]
    test_targets[looks_positive, 0] = test_targets[looks_negative, 1] = voc07.DIFFICULT
    outcome = voc07.svm_protocol(train_x, train_targets, test_x, test_targets)
    assert outcome.average_precision == pytest.approx([1.0] * 4)    # every positive ranked first
    assert outcome.interpolated_average_precision == pytest.approx([1.0] * 4)
    assert outcome.unconverged == 0 and all(cost in voc07.COSTS for cost in outcome.cost)

    as_negative = test_targets.copy()
    as_negative[looks_positive, 0] = voc07.ABSENT
    assert voc07.svm_protocol(train_x, train_targets, test_x, as_negative).average_precision[0] < 1.0
    as_positive = test_targets.copy()
    as_positive[looks_negative, 1] = voc07.PRESENT
    assert voc07.svm_protocol(train_x, train_targets, test_x, as_positive).average_precision[1] < 1.0


def test_shuffled_labels_score_about_the_positive_rate():
    """Labels shuffled away from their images on both sides: the SVMs learn nothing, and their
    test ranking is independent of the test labels. (With the test labels kept, a direction
    learned from noise still sorts these strongly structured features, far above or below
    chance per class.)"""
    train_x, train_targets = multilabel(160, seed=2)
    test_x, test_targets = multilabel(240, seed=3)
    rng = np.random.default_rng(4)
    train_targets, test_targets = train_targets[rng.permutation(160)], test_targets[rng.permutation(240)]
    outcome = voc07.svm_protocol(train_x, train_targets, test_x, test_targets)
    rate = np.mean(test_targets == voc07.PRESENT)
    assert abs(np.mean(outcome.average_precision) - rate) < 0.1   # the true labels give 1.0


def test_difficult_images_train_as_negatives():
    assert voc07.training_labels(np.array([1, -1, 0], dtype=np.int8)).tolist() == [1, -1, -1]


def test_each_class_gets_the_cost_cross_val_score_would_choose():
    """The references pick the cost by scikit-learn's cross_val_score (3 folds, its AP scorer):
    our folds and our AP must choose the same."""
    train_x, train_targets = multilabel(90, seed=5, noise=0.8)
    test_x, test_targets = multilabel(30, seed=6)
    outcome = voc07.svm_protocol(train_x, train_targets, test_x, test_targets)
    features = voc07.l2_normalise(train_x)
    for column, chosen in enumerate(outcome.cost):
        labels = voc07.training_labels(train_targets[:, column])
        means = [cross_val_score(voc07._svm(cost), features, labels, cv=3, scoring="average_precision").mean()
                 for cost in voc07.COSTS]
        assert chosen == voc07.COSTS[int(np.argmax(means))]
    assert len(set(outcome.cost)) > 1   # the choice was not the same everywhere


# --- the launcher's path, on image files --------------------------------------------------------

class ColourFeatures(nn.Module):
    """Pre-projection features: the mean normalised colour; the embedding says nothing."""

    def image_outputs(self, images):
        colour = images.float().mean((2, 3))
        return TowerOutput(torch.ones_like(colour), colour)


def hand_made_run() -> LoadedRun:
    return LoadedRun(model=ColourFeatures().eval(), tokenizer=ClipTokenizer(16), clean_text=None,
                     plan={"method": "clip-lite", "model": "test"}, run_dir=None, checkpoint=None, step=0,
                     image_size=SIDE)


def jpeg(classes, width=SIDE) -> bytes:
    """A solid colour whose channel of each class is bright when the class is present."""
    colour = [25, 25, 25]
    for name in classes:
        colour[CHANNEL[name]] = 230
    buffer = io.BytesIO()
    Image.new("RGB", (width, SIDE), tuple(colour)).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


SUBSETS = [set(s) for r in range(4) for s in itertools.combinations(CLASSES, r)]   # all 8


def write_split(root, split: str, images: dict[str, tuple[set, dict]]):
    """images: id -> (classes in the picture, {class: label} overrides, e.g. 0 for difficult)."""
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    for number, (image, (shown, _)) in enumerate(images.items()):
        (root / "JPEGImages" / f"{image}.jpg").write_bytes(jpeg(shown, SIDE + 4 * (number % 3)))
    for name in CLASSES:
        lines = [f"{image} {overrides.get(name, 1 if name in shown else -1):>2}"
                 for image, (shown, overrides) in images.items()]
        (root / "ImageSets" / "Main" / f"{name}_{split}.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture()
def vocdevkit(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2007"
    write_split(root, "trainval", {f"{i:06d}": (SUBSETS[i % 8], {}) for i in range(16)})
    test = {f"{100 + i:06d}": (SUBSETS[i], {}) for i in range(8)}
    test["000200"] = ({"red"}, {"red": 0})          # a red one marked difficult: looks positive
    test["000201"] = ({"red"}, {"green": 0})        # no green, yet marked difficult for green
    write_split(root, "test", test)
    return root


def test_the_launchers_path_on_a_vocdevkit_tree(vocdevkit, tmp_path, monkeypatch, capsys):
    result = voc07.voc07_svm(hand_made_run(), str(vocdevkit), str(vocdevkit))
    assert result.task == "voc07-svm" and result.name == "VOC2007-trainval-test"
    assert result.data == f"{vocdevkit} trainval (train), {vocdevkit} test (test)"
    assert result.metrics == {"voc07_svm_map": 1.0, "voc07_svm_map_interpolated": 1.0, "voc07_svm_ap_blue": 1.0,
                              "voc07_svm_ap_green": 1.0, "voc07_svm_ap_red": 1.0}
    assert result.counts == {"train_images": 16, "test_images": 10, "classes": 3, "test_difficult_labels": 2,
                             "left_out": 0, "unconverged_fits": 0}
    assert set(result.settings) == {"C_blue", "C_green", "C_red"} and set(result.settings.values()) <= set(voc07.COSTS)

    monkeypatch.setattr("engine.eval.load_run.load_run", lambda path, device: hand_made_run())
    out = tmp_path / "voc.json"
    assert launcher.main(["nowhere", "--task", "voc07-svm", "--train", str(vocdevkit), "--test", str(vocdevkit),
                          "--train-split", "trainval", "--out", str(out), "--device", "cpu"]) == 0
    written = json.loads(out.read_text())
    assert written["metrics"]["voc07_svm_map"] == 1.0 and written["settings"] == result.settings
    printed = capsys.readouterr().out
    assert "voc07_svm_map" in printed and "chosen: C_blue" in printed


def test_a_labels_json_folder(tmp_path):
    for name, subsets in (("train", SUBSETS * 2), ("test", SUBSETS)):
        (tmp_path / name / "pictures").mkdir(parents=True)
        labels = {}
        for number, shown in enumerate(subsets):
            (tmp_path / name / "pictures" / f"{number}.jpg").write_bytes(jpeg(shown))
            labels[f"pictures/{number}.jpg"] = sorted(shown)
        (tmp_path / name / "labels.json").write_text(json.dumps(labels))
    result = voc07.voc07_svm(hand_made_run(), str(tmp_path / "train"), str(tmp_path / "test"))
    assert result.metrics["voc07_svm_map"] == 1.0 and result.name == "train-test"
    assert result.data == f"{tmp_path / 'train'} (train), {tmp_path / 'test'} (test)"
    assert result.counts["train_images"] == 16 and result.counts["test_difficult_labels"] == 0


def _rewrite(path, old, new):
    path.write_text(path.read_text().replace(old, new, 1))


@pytest.mark.parametrize("damage, message", [
    (lambda root: (root / "ImageSets").rename(root / "Sets"), "neither a VOCdevkit year folder"),
    (lambda root: _rewrite(root / "ImageSets/Main/red_trainval.txt", "000002 -1", "000002 yes"),
     r"red_trainval.txt:3: expected '<image id> <1\|-1\|0>'"),
    (lambda root: _rewrite(root / "ImageSets/Main/red_trainval.txt", "000002 -1\n", ""),
     r"red_trainval.txt has no line for image\(s\) 000002"),
    (lambda root: (root / "JPEGImages" / "000005.jpg").unlink(), r"1 listed image\(s\) do not exist"),
    (lambda root: (root / "ImageSets/Main/red_trainval.txt").write_text(
        "".join(f"{i:06d} {1 if i < 2 else -1}\n" for i in range(16))), r"class 'red' has 2 positive and 14 negative"),
    (lambda root: [_rewrite(root / "ImageSets/Main/blue_test.txt", f"{i:06d}  1", f"{i:06d}  0")
                   for i in range(100, 108)], "class 'blue' has no positive usable image in --test"),
    (lambda root: (root / "ImageSets/Main/cat_test.txt").write_text(
        (root / "ImageSets/Main/red_test.txt").read_text().replace(" 1", "-1").replace(" 0", "-1")),
     r"different classes: only in --train \[\], only in --test \['cat'\]"),
])
def test_a_damaged_vocdevkit_is_refused_with_the_fix(vocdevkit, damage, message):
    damage(vocdevkit)
    with pytest.raises(UserError, match=message):
        voc07.voc07_svm(hand_made_run(), str(vocdevkit), str(vocdevkit))


def test_bad_folders_and_labels_are_refused_with_the_fix(vocdevkit, tmp_path):
    run = hand_made_run()
    with pytest.raises(UserError, match=r"did you mean .*VOCdevkit/VOC2007\?"):
        voc07.voc07_svm(run, str(vocdevkit.parent), str(vocdevkit))
    with pytest.raises(UserError, match=r"no ImageSets/Main/<class>_val.txt files; give the split with "
                                        r"--train-split \(splits there: test, trainval\)"):
        voc07.voc07_svm(run, str(vocdevkit), str(vocdevkit), train_split="val")
    folder = tmp_path / "generic"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(jpeg({"red"}))
    with pytest.raises(UserError, match="--test-split val: only a VOCdevkit folder"):
        voc07.voc07_svm(run, str(vocdevkit), str(folder), test_split="val")
    for content, message in (("{not json", "is not valid JSON"),
                             ('{"a.jpg": "red"}', "must be a list of class names"),
                             ("[]", "must be a non-empty JSON object"),
                             ('{"a.jpg": ["cat"]}', r"names class\(es\) \['cat'\] that --train does not have")):
        (folder / "labels.json").write_text(content)
        with pytest.raises(UserError, match=message):
            voc07.voc07_svm(run, str(vocdevkit), str(folder))
