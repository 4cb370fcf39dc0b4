"""Linear probe: a multinomial logistic regression on frozen image features, scored top-1 on a
test set, with CLIP's protocol (Radford et al. 2021, appendix A.3):

- scikit-learn's L-BFGS logistic regression, at most 1,000 iterations;
- its L2 strength chosen on a validation split held out of the training set (the datasets
  that have none are split, as here): C swept over 1e-6 .. 1e6 by CLIP's parametric binary
  search (a grid every 2 decades, then the interval around the best halved until 8 steps per
  decade, CLIP's 96 steps over 12 decades), the best validation top-1 winning;
- the classifier refit with that C on training + validation, scored on the test set.

Features are the image tower's pooled output before the projection to the shared embedding
(`TowerOutput.features`): CLIP probes "the features before the linear projection to the
embedding space" of its ViTs and CLIP-Lite the ResNet-50's pooled 2048-d output, not its
critic's projection. For CLIP's ModifiedResNet presets the attention pool's output is both
(the pool's output projection is the embedding). Features are used as the tower gives them,
not normalised, as CLIP's probes did.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from engine.errors import UserError
from engine.eval.benchmark import Result, encode_image_files
from engine.eval.images import ImageFolder, read_image_folder
from engine.eval.load_run import LoadedRun

SEED = 0                       # the validation split's draw: the same images every time
VALIDATION_SHARE = 0.2         # of each class's training images
LOG10_C_RANGE = (-6.0, 6.0)    # CLIP's sweep range
COARSE_STEP = 2.0              # the first grid, in decades: 1e-6, 1e-4, ..., 1e6
FINEST_STEP = 1 / 8            # 8 steps per decade
MAX_ITER = 1000


def image_features(run: LoadedRun, files: Sequence[Path], what: str,
                   device: torch.device | str) -> tuple[np.ndarray, list[int], int]:
    """The image tower's pre-projection features of `files` ([kept, D] float64), the indices of
    the files kept and how many were left out (unfit images, as the held-out set leaves them).

    Decoded and encoded a batch at a time: a probe's training set (ImageNet's 1.28M images)
    cannot sit in memory as decoded floats, only as features."""
    def features_of(images: torch.Tensor) -> torch.Tensor:
        return run.model.image_outputs(images).features

    features, kept, left_out = encode_image_files(run, list(files), what, device, encode=features_of)
    return features.double().numpy(), kept, left_out


def fit_counting_unconverged(estimator, x: np.ndarray, y: np.ndarray) -> bool:
    """Fit; True when the solver stopped at its iteration limit. A sweep makes dozens of fits:
    their non-convergence is reported as one count, not a warning each."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        estimator.fit(x, y)
    unconverged = False
    for warning in caught:
        if issubclass(warning.category, ConvergenceWarning):
            unconverged = True
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    return unconverged


def validation_split(labels: np.ndarray, share: float = VALIDATION_SHARE,
                     seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """(fit, validation) indices into `labels`: `share` of each class held out (at least one
    image, never all of them), drawn by a seeded generator, so that reruns choose the same C."""
    rng = np.random.default_rng(seed)
    fit, held_out = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        count = min(len(members) - 1, max(1, round(share * len(members))))
        held_out.append(members[:count])
        fit.append(members[count:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(held_out))


def search_log10_c(score: Callable[[float], float]) -> tuple[float, dict[float, float]]:
    """CLIP's parametric binary search for the best log10 C by `score`: the coarse grid, then
    the best point's neighbours at half the previous step, down to FINEST_STEP. Returns the
    best exponent and every exponent tried with its score. Ties go to the smaller C (the
    stronger regularisation): a separable validation set scores many C's at 100%."""
    low, high = LOG10_C_RANGE
    scores: dict[float, float] = {}

    def try_exponent(exponent: float) -> None:
        if low <= exponent <= high and exponent not in scores:
            scores[exponent] = score(exponent)

    def best() -> float:
        return max(scores, key=lambda exponent: (scores[exponent], -exponent))

    for exponent in np.arange(low, high + COARSE_STEP / 2, COARSE_STEP):
        try_exponent(float(exponent))
    step = COARSE_STEP
    while step > FINEST_STEP:   # multiples of 1/8 are exact in binary: no float drift
        step /= 2
        centre = best()
        try_exponent(centre - step)
        try_exponent(centre + step)
    return best(), scores


@dataclass(frozen=True)
class ProbeOutcome:
    test_top1: float
    test_mean_per_class_recall: float
    validation_top1: float            # of the chosen C, fit on the training part only
    c: float                          # the chosen C (scikit-learn's inverse L2 strength)
    tried: dict[float, float]         # log10 C -> validation top-1, every C the search fit
    fit_images: int
    validation_images: int
    unconverged: int                  # fits stopped at MAX_ITER


def probe_features(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                   seed: int = SEED) -> ProbeOutcome:
    """The protocol on features: C chosen on a validation split of the training set (the test
    set takes no part in it), then the refit on all the training set scored on the test set."""
    fit, held_out = validation_split(train_y, VALIDATION_SHARE, seed)
    unconverged = 0

    def validation_top1(log10_c: float) -> float:
        nonlocal unconverged
        model = LogisticRegression(C=10.0 ** log10_c, max_iter=MAX_ITER)
        unconverged += fit_counting_unconverged(model, train_x[fit], train_y[fit])
        return float(np.mean(model.predict(train_x[held_out]) == train_y[held_out]))

    log10_c, tried = search_log10_c(validation_top1)
    final = LogisticRegression(C=10.0 ** log10_c, max_iter=MAX_ITER)
    unconverged += fit_counting_unconverged(final, train_x, train_y)   # the validation part back in
    predicted = final.predict(test_x)
    per_class = [np.mean(predicted[test_y == label] == label) for label in np.unique(test_y)]
    return ProbeOutcome(float(np.mean(predicted == test_y)), float(np.mean(per_class)), tried[log10_c],
                        10.0 ** log10_c, tried, len(fit), len(held_out), unconverged)


def read_class_folders(root: str, option: str) -> ImageFolder:
    try:
        return read_image_folder(root)
    except UserError as error:
        # read_image_folder's messages name zero-shot's option; name the one given here.
        raise UserError(str(error).replace("--images", option, 1)) from None


def check_same_classes(train: ImageFolder, test: ImageFolder, train_dir: str, test_dir: str) -> None:
    if train.folders != test.folders:
        only_train = sorted(set(train.folders) - set(test.folders))
        only_test = sorted(set(test.folders) - set(train.folders))
        raise UserError(f"--train {train_dir} and --test {test_dir} must have the same class folders: only in "
                        f"--train: {only_train[:10] or 'none'}; only in --test: {only_test[:10] or 'none'}. Add "
                        f"the missing folders (an empty one is fine in --test) or remove the extra ones")


def check_training_classes(labels: np.ndarray, folders: list[str], train_dir: str) -> None:
    counts = np.bincount(labels, minlength=len(folders))
    few = [f"{folders[i]} ({counts[i]})" for i in np.flatnonzero(counts < 2)]
    if few:
        raise UserError(f"--train {train_dir}: every class needs at least 2 usable images (one is held out to "
                        f"choose the regularisation); too few in {', '.join(few[:10])}")


def linear_probe(run: LoadedRun, train: str, test: str, device: torch.device | str = "cpu") -> Result:
    train_folder = read_class_folders(train, "--train")
    test_folder = read_class_folders(test, "--test")
    check_same_classes(train_folder, test_folder, train, test)
    check_training_classes(np.array(train_folder.labels), train_folder.folders, train)   # before the slow part
    train_x, train_kept, train_left_out = image_features(run, train_folder.files, f"--train {train}", device)
    test_x, test_kept, test_left_out = image_features(run, test_folder.files, f"--test {test}", device)
    train_y = np.array([train_folder.labels[i] for i in train_kept])
    test_y = np.array([test_folder.labels[i] for i in test_kept])
    check_training_classes(train_y, train_folder.folders, train)   # images left out may have thinned a class
    outcome = probe_features(train_x, train_y, test_x, test_y)
    metrics = {"linear_probe_top1": outcome.test_top1,
               "linear_probe_mean_per_class_recall": outcome.test_mean_per_class_recall,
               "linear_probe_validation_top1": outcome.validation_top1}
    counts = {"train_images": outcome.fit_images, "validation_images": outcome.validation_images,
              "test_images": len(test_y), "classes": len(train_folder.folders),
              "left_out": train_left_out + test_left_out, "unconverged_fits": outcome.unconverged}
    name = f"{Path(train).resolve().name}-{Path(test).resolve().name}"
    return Result("linear-probe", name, f"{train} (train), {test} (test)", metrics, counts,
                  settings={"C": float(f"{outcome.c:.4g}")})
