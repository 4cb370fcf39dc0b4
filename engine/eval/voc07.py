"""PASCAL VOC07 classification by one-vs-all linear SVMs on frozen image features: the number
CLIP-Lite reports (its voc_clf.py, VirTex's), the protocol of Goyal et al. 2019 ("Scaling and
benchmarking self-supervised visual representation learning": fair_self_supervision_benchmark
tools/svm, later VISSL's SVMTrainer). Per class:

- features: the image tower's pre-projection features (engine/eval/linear_probe.py says why),
  each L2-normalised, x / (|x| + 1e-5) as VISSL (CLIP-Lite divides by |x| alone);
- LinearSVC(C, class_weight {+1: 2, -1: 1}, L2 penalty, squared hinge, dual, tol 1e-4,
  max_iter 2000), all three references alike;
- C from CLIP-Lite's list 0.01, 0.1, 1, 10 (Goyal's scripts sweep 26: 1e-7 .. 100 and
  0.5^4 .. 0.5^19), the one with the best mean AP over 3-fold cross-validation on the training
  set (scikit-learn's cross_val_score: unshuffled StratifiedKFold), the first on ties; then
  refit on the whole training set;
- "difficult" images (VOC label 0) are negatives in training and left out of the test AP;
- test AP: CLIP-Lite's is scikit-learn's average_precision_score, non-interpolated (computed
  here by our own function, equal to it to the bit). Goyal's and VISSL's is the area under the
  monotone precision envelope (all-point interpolated, VOC2010 style), reported beside it as
  `voc07_svm_map_interpolated` (tied scores here are one threshold; the references rank them in
  argsort order, which real SVM scores never meet). Neither uses the VOC07 devkit's 11-point AP.

The references leave LinearSVC unseeded; random_state=0 here fixes liblinear's coordinate order,
so a rerun gives the same numbers.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold
from sklearn.svm import LinearSVC

from engine.errors import UserError
from engine.eval.benchmark import Result
from engine.eval.linear_probe import fit_counting_unconverged, image_features
from engine.eval.load_run import LoadedRun

COSTS = (0.01, 0.1, 1.0, 10.0)
FOLDS = 3
PRESENT, ABSENT, DIFFICULT = 1, -1, 0       # VOC's own label values, kept as they are
LABELS_FILE = "labels.json"


# --- average precision ---------------------------------------------------------------------

def _precision_recall(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall at each distinct score, from the highest down; tied scores are one
    threshold (their order must not change the number)."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    ranked_scores = np.asarray(scores, dtype=np.float64)[order]
    hits = np.asarray(positive, dtype=np.float64)[order]
    true_positives, false_positives = np.cumsum(hits), np.cumsum(1.0 - hits)
    ends_a_tie = np.r_[ranked_scores[1:] != ranked_scores[:-1], True]
    true_positives, false_positives = true_positives[ends_a_tie], false_positives[ends_a_tie]
    if true_positives[-1] == 0:
        raise ValueError("average precision needs at least one positive")
    return true_positives / (true_positives + false_positives), true_positives / true_positives[-1]


def average_precision(positive: np.ndarray, scores: np.ndarray) -> float:
    """Non-interpolated AP: the sum over thresholds of the precision there times the recall it
    adds. Summed from the lowest threshold up, as scikit-learn sums, so the two agree exactly."""
    precision, recall = _precision_recall(positive, scores)
    recall_added = np.diff(np.r_[0.0, recall])
    return float(np.sum((recall_added * precision)[::-1]))


def interpolated_average_precision(positive: np.ndarray, scores: np.ndarray) -> float:
    """All-point interpolated AP (Goyal et al.'s svm_helper, VISSL): each threshold's precision
    replaced by the best precision at its recall or beyond, before the same sum."""
    precision, recall = _precision_recall(positive, scores)
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * envelope))


# --- the SVM protocol on features ----------------------------------------------------------

def l2_normalise(features: np.ndarray) -> np.ndarray:
    return features / (np.linalg.norm(features, axis=1, keepdims=True) + 1e-5)


def training_labels(targets: np.ndarray) -> np.ndarray:
    """+1 for present, -1 for absent and difficult: the references train on difficult images
    as negatives (only the test leaves them out)."""
    return np.where(targets == PRESENT, 1, -1)


def _svm(cost: float) -> LinearSVC:
    return LinearSVC(C=cost, class_weight={1: 2, -1: 1}, penalty="l2", loss="squared_hinge", dual=True,
                     tol=1e-4, max_iter=2000, intercept_scaling=1.0, random_state=0)


@dataclass(frozen=True)
class SvmOutcome:
    average_precision: list[float]              # per class, on the test set
    interpolated_average_precision: list[float]
    cost: list[float]                           # per class, chosen by cross-validation
    unconverged: int                            # fits stopped at max_iter


def svm_protocol(train_x: np.ndarray, train_targets: np.ndarray, test_x: np.ndarray, test_targets: np.ndarray,
                 costs=COSTS, folds: int = FOLDS) -> SvmOutcome:
    """One SVM per class (a column of the [images, classes] targets, VOC's 1 / -1 / 0)."""
    train_x, test_x = l2_normalise(train_x), l2_normalise(test_x)
    costs = sorted(costs)     # "first on ties" then means the smallest cost, as in CLIP-Lite's ascending list
    test_ap, test_interpolated_ap, chosen, unconverged = [], [], [], 0
    for column in range(train_targets.shape[1]):
        labels = training_labels(train_targets[:, column])
        mean_fold_ap: dict[float, float] = {}
        for cost in costs:
            fold_ap = []
            for fit, held_out in StratifiedKFold(n_splits=folds).split(train_x, labels):
                svm = _svm(cost)
                unconverged += fit_counting_unconverged(svm, train_x[fit], labels[fit])
                fold_ap.append(average_precision(labels[held_out] == 1, svm.decision_function(train_x[held_out])))
            mean_fold_ap[cost] = float(np.mean(fold_ap))
        cost = max(costs, key=lambda c: (mean_fold_ap[c], -c))
        svm = _svm(cost)
        unconverged += fit_counting_unconverged(svm, train_x, labels)
        scored = test_targets[:, column] != DIFFICULT
        positive = test_targets[scored, column] == PRESENT
        scores = svm.decision_function(test_x[scored])
        test_ap.append(average_precision(positive, scores))
        test_interpolated_ap.append(interpolated_average_precision(positive, scores))
        chosen.append(cost)
    return SvmOutcome(test_ap, test_interpolated_ap, chosen, unconverged)


# --- the data: a VOCdevkit year folder, or a folder with labels.json -----------------------

@dataclass(frozen=True)
class MultiLabelSet:
    files: list[Path]
    targets: np.ndarray        # [images, classes] int8: 1 present, -1 absent, 0 difficult
    classes: list[str]
    split: str | None = None   # a VOCdevkit folder's ImageSets/Main split


def is_vocdevkit(root: Path) -> bool:
    return (root / "ImageSets" / "Main").is_dir()


def read_vocdevkit(root: Path, split: str, option: str) -> MultiLabelSet:
    """VOC2007/ImageSets/Main/<class>_<split>.txt ('<image id> <1|-1|0>' per line, every image
    of the split in every class's file) and VOC2007/JPEGImages/<image id>.jpg."""
    main = root / "ImageSets" / "Main"
    suffix = f"_{split}.txt"
    class_files = sorted(p for p in main.glob(f"*{suffix}") if p.is_file() and len(p.name) > len(suffix))
    if not class_files:
        splits = sorted({p.stem.rsplit("_", 1)[1] for p in main.glob("*_*.txt")})
        raise UserError(f"{option} {root}: no ImageSets/Main/<class>{suffix} files; give the split with "
                        f"{option}-split (splits there: {', '.join(splits) or 'none'})")
    classes = [p.name[:-len(suffix)] for p in class_files]
    per_class: list[dict[str, int]] = []
    for path in class_files:
        labels: dict[str, int] = {}
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2 or fields[1] not in ("1", "-1", "0"):
                raise UserError(f"{path}:{number}: expected '<image id> <1|-1|0>' (present, absent, difficult), "
                                f"found {line.strip()!r}")
            if fields[0] in labels:
                raise UserError(f"{path}:{number}: image {fields[0]} is listed twice; list each image once")
            labels[fields[0]] = int(fields[1])
        per_class.append(labels)
    images = sorted(set().union(*per_class))
    for path, labels in zip(class_files, per_class):
        missing = [image for image in images if image not in labels]
        if missing:
            raise UserError(f"{path} has no line for image(s) {', '.join(missing[:5])} (listed in other "
                            f"*{suffix} files): every class file of a split must list every image")
    files = [root / "JPEGImages" / f"{image}.jpg" for image in images]
    targets = np.array([[labels[image] for labels in per_class] for image in images], dtype=np.int8)
    return MultiLabelSet(_existing(files, option, root), targets, classes, split)


def read_labels_json(root: Path, option: str, classes: list[str] | None = None) -> MultiLabelSet:
    """DIR/labels.json: {"<image file, relative to DIR>": ["<class>", ...], ...}. An image with
    an empty list is a negative for every class. `classes`: the training set's, for a test set
    (a class it does not know is refused); None: the sorted names found here."""
    path = root / LABELS_FILE
    try:
        listing = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise UserError(f"{option} {root}: {path} is not valid JSON ({error})") from error
    if not isinstance(listing, dict) or not listing:
        raise UserError(f"{option} {root}: {path} must be a non-empty JSON object mapping each image file "
                        f"(relative to {root}) to a list of class names")
    for image, names in listing.items():
        if not (isinstance(names, list) and all(isinstance(n, str) and n.strip() for n in names)):
            raise UserError(f"{option} {root}: {path}: the value of {image!r} must be a list of class names, "
                            f"e.g. [\"dog\", \"person\"] ([] for none), not {names!r}")
    found = sorted({name for names in listing.values() for name in names})
    if classes is None:
        classes = found
    unknown = [name for name in found if name not in classes]
    if unknown:
        raise UserError(f"{option} {root}: {path} names class(es) {unknown[:10]} that --train does not have; "
                        f"its classes are {classes[:20]}")
    images = sorted(listing)
    targets = np.array([[PRESENT if name in listing[image] else ABSENT for name in classes] for image in images],
                       dtype=np.int8).reshape(len(images), len(classes))
    return MultiLabelSet(_existing([root / image for image in images], option, root), targets, classes)


def _existing(files: list[Path], option: str, root: Path) -> list[Path]:
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise UserError(f"{option} {root}: {len(missing)} listed image(s) do not exist, e.g. {missing[0]}; "
                        f"add them or remove their lines")
    return files


def read_multilabel(directory: str, split: str | None, default_split: str, option: str,
                    classes: list[str] | None = None) -> MultiLabelSet:
    root = Path(directory)
    if not root.is_dir():
        raise UserError(f"{option} {directory}: not a directory; give a VOCdevkit year folder (VOCdevkit/VOC2007) "
                        f"or a folder with {LABELS_FILE}")
    if is_vocdevkit(root):
        return read_vocdevkit(root, split or default_split, option)
    if split is not None:
        raise UserError(f"{option}-split {split}: only a VOCdevkit folder (with ImageSets/Main) has splits; "
                        f"{directory} is not one")
    if (root / LABELS_FILE).is_file():
        return read_labels_json(root, option, classes)
    inside = sorted(p.name for p in root.iterdir() if p.is_dir() and is_vocdevkit(p))
    hint = f" (did you mean {root / inside[0]}?)" if inside else ""
    raise UserError(f"{option} {directory}: neither a VOCdevkit year folder (ImageSets/Main/, JPEGImages/) nor a "
                    f"folder with {LABELS_FILE} mapping image file -> list of class names{hint}")


def check_class_counts(train: np.ndarray, test: np.ndarray, classes: list[str]) -> None:
    """Each class needs FOLDS positives and FOLDS negatives in training (one of each in every
    cross-validation fold) and a positive in the test set (else its AP is undefined)."""
    for column, name in enumerate(classes):
        positives = int(np.sum(train[:, column] == PRESENT))
        if positives < FOLDS or len(train) - positives < FOLDS:
            raise UserError(f"class {name!r} has {positives} positive and {len(train) - positives} negative usable "
                            f"image(s) in --train: the {FOLDS}-fold cross-validation that picks its SVM cost "
                            f"needs at least {FOLDS} of each; add images or drop the class")
        if not np.any(test[:, column] == PRESENT):
            raise UserError(f"class {name!r} has no positive usable image in --test (difficult ones do not "
                            f"count): its AP is undefined; add one or drop the class")


def voc07_svm(run: LoadedRun, train: str, test: str, train_split: str | None = None, test_split: str | None = None,
              device: torch.device | str = "cpu") -> Result:
    train_set = read_multilabel(train, train_split, "trainval", "--train")
    test_set = read_multilabel(test, test_split, "test", "--test", classes=train_set.classes)
    if test_set.classes != train_set.classes:
        raise UserError(f"--train {train} and --test {test} have different classes: only in --train "
                        f"{sorted(set(train_set.classes) - set(test_set.classes))[:10]}, only in --test "
                        f"{sorted(set(test_set.classes) - set(train_set.classes))[:10]}")
    check_class_counts(train_set.targets, test_set.targets, train_set.classes)   # before the slow part
    train_x, train_kept, train_left_out = image_features(run, train_set.files, f"--train {train}", device)
    test_x, test_kept, test_left_out = image_features(run, test_set.files, f"--test {test}", device)
    train_targets, test_targets = train_set.targets[train_kept], test_set.targets[test_kept]
    check_class_counts(train_targets, test_targets, train_set.classes)   # images left out may have thinned one
    outcome = svm_protocol(train_x, train_targets, test_x, test_targets)
    metrics = {"voc07_svm_map": float(np.mean(outcome.average_precision)),
               "voc07_svm_map_interpolated": float(np.mean(outcome.interpolated_average_precision)),
               **{f"voc07_svm_ap_{name}": ap for name, ap in zip(train_set.classes, outcome.average_precision)}}
    counts = {"train_images": len(train_targets), "test_images": len(test_targets),
              "classes": len(train_set.classes), "test_difficult_labels": int(np.sum(test_targets == DIFFICULT)),
              "left_out": train_left_out + test_left_out, "unconverged_fits": outcome.unconverged}
    # Named by folder, and by split for a VOCdevkit (its train and test are one folder).
    train_part, test_part = train_set.split or Path(train).resolve().name, test_set.split or Path(test).resolve().name
    name = f"{Path(train).resolve().name}-{train_part}-{test_part}" if train_set.split else f"{train_part}-{test_part}"
    data = f"{train} {train_set.split or ''} (train), {test} {test_set.split or ''} (test)".replace("  (", " (")
    return Result("voc07-svm", name, data, metrics, counts,
                  settings={f"C_{name}": cost for name, cost in zip(train_set.classes, outcome.cost)})
