"""The built-in default dataset: scikit-learn's 1,797 handwritten digits as image-caption pairs.

It ships inside scikit-learn, so a smoke test needs no download and no conversion step. Each
8x8 digit becomes a 32x32 RGB PNG with one caption drawn from a few templates; a fixed,
class-stratified held-out split (30 images per class) supports zero-shot and retrieval eval.

The MDS copies are written once into a cache directory. Two ranks may call `ensure_digits` at
the same moment, and a writer may have crashed half way, so each writer builds in a private
sibling directory and publishes it with one atomic rename; the loser of a race drops its copy.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from streaming import MDSWriter

from engine.data.mds import cache_root

CLASSNAMES: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Training captions: "{}" is filled with the digit's word ("seven") or numeral ("7").
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a photo of the number {}",
    "handwritten {}",
    "a handwritten digit {}",
    "the digit {} written by hand",
    "a low resolution scan of the number {}",
    "a blurry picture of a {}",
    "{} in pen on white paper",
)

# Zero-shot prompts, filled with CLASSNAMES.
PROMPT_TEMPLATES: tuple[str, ...] = (
    "a photo of the number {}.",
    "a handwritten {}.",
    "the digit {}.",
    "a low resolution scan of the number {}.",
)

# Bump the version when the images, captions or split change, so old caches are not reused.
DATASET_NAME = "digits-v1"
HELDOUT_PER_CLASS = 30
IMAGE_SIDE = 32
CAPTION_SEED = 20240607
SPLIT_SEED = 1797
MDS_COLUMNS = {"jpg": "bytes", "txt": "str", "cls": "int"}
_PARTIAL_MARK = ".partial-"


@dataclass(frozen=True)
class EmbeddedDataset:
    train: Path    # MDS directory
    heldout: Path  # MDS directory, about 300 images, stratified by class, never in train


def ensure_digits(cache_dir: Path | None = None) -> EmbeddedDataset:
    """Return the digits MDS directories, writing them on first use."""
    cache_dir = Path(cache_dir) if cache_dir is not None else cache_root()
    final = cache_dir / DATASET_NAME
    dataset = EmbeddedDataset(train=final / "train", heldout=final / "heldout")
    if final.is_dir():
        return dataset

    cache_dir.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_partials(cache_dir)
    partial = cache_dir / f"{DATASET_NAME}{_PARTIAL_MARK}{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        _write_digits(partial)
        os.rename(partial, final)
    except OSError:
        # Another process published first (rename onto a non-empty directory fails): use theirs.
        if not final.is_dir():
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return dataset


def _remove_abandoned_partials(cache_dir: Path) -> None:
    """Delete half-written copies left by crashed writers on this host (their pid is gone)."""
    host_prefix = f"{DATASET_NAME}{_PARTIAL_MARK}{socket.gethostname()}-"
    for path in cache_dir.glob(f"{host_prefix}*"):
        pid_text = path.name[len(host_prefix):]
        if pid_text.isdigit() and not _pid_alive(int(pid_text)):
            shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_digits(out: Path) -> None:
    digits = load_digits()
    labels = digits.target.astype(np.int64)
    heldout_ids = _stratified_heldout(labels)
    is_heldout = np.zeros(len(labels), dtype=bool)
    is_heldout[heldout_ids] = True
    captions = _captions(labels)

    classes = {"classnames": list(CLASSNAMES), "templates": list(PROMPT_TEMPLATES)}
    for split, members in (("train", np.flatnonzero(~is_heldout)), ("heldout", np.flatnonzero(is_heldout))):
        split_dir = out / split
        with MDSWriter(out=str(split_dir), columns=MDS_COLUMNS, size_limit="1mb") as writer:
            for index in members:
                writer.write({
                    "jpg": _digit_png(digits.images[index]),
                    "txt": captions[index],
                    "cls": int(labels[index]),
                })
        (split_dir / "classes.json").write_text(json.dumps(classes, indent=1))


def _stratified_heldout(labels: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(SPLIT_SEED)
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:HELDOUT_PER_CLASS] for c in range(len(CLASSNAMES))]
    return np.sort(np.concatenate(chosen))


def _captions(labels: np.ndarray) -> list[str]:
    rng = np.random.default_rng(CAPTION_SEED)
    templates = rng.integers(len(CAPTION_TEMPLATES), size=len(labels))
    use_word = rng.random(len(labels)) < 0.5
    return [
        CAPTION_TEMPLATES[t].format(CLASSNAMES[c] if word else str(c))
        for t, c, word in zip(templates, labels, use_word)
    ]


def _digit_png(pixels: np.ndarray) -> bytes:
    """8x8 ink levels 0..16 -> 32x32 RGB PNG, dark ink on white like a scanned page."""
    gray = (255 - np.round(pixels * (255 / 16))).astype(np.uint8)
    image = Image.fromarray(gray, mode="L").resize((IMAGE_SIDE, IMAGE_SIDE), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()
