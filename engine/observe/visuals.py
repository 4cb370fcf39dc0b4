"""Pictures of a run, as uint8 RGB arrays [H, W, 3]: a batch's views, a similarity heatmap.

No plotting library: tiles are pasted with numpy, colours come from a small hand-made map.
"""
from __future__ import annotations

import numpy as np
import torch
from open_clip.tokenizer import SimpleTokenizer
from PIL import Image

from engine.data.dali import CLIP_MEAN, CLIP_STD
from engine.data.mlm import IGNORE_INDEX, MASK_ID

CELL = 128       # a view's tile, in pixels: small images are enlarged, large ones reduced
GAP = 4          # grey space between tiles
GAP_GREY = 128
HEATMAP_CELL = 16
# Viridis at five points (matplotlib's colour map, dark blue -> yellow), interpolated linearly.
_VIRIDIS = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], dtype=np.float64)
IMAGE_KEYS = ("image", "image2")  # a batch's image views, in order (engine/data/spec.py)


def to_pixels(images: torch.Tensor) -> np.ndarray:
    """CLIP-normalised images [N, 3, S, S] -> uint8 [N, S, S, 3], the normalisation undone."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    pixels = (images.detach().float().cpu() * std + mean).clamp(0, 1) * 255
    return pixels.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _tile(pixels: np.ndarray, size: int) -> np.ndarray:
    """One image [S, S, 3] at `size` x `size`: nearest-neighbour up (crisp pixels), box filter down."""
    image = Image.fromarray(pixels)
    if image.size != (size, size):
        smaller = image.size[0] < size
        image = image.resize((size, size), Image.Resampling.NEAREST if smaller else Image.Resampling.BOX)
    return np.asarray(image)


def grid(rows: list[list[np.ndarray]], cell: int = CELL, gap: int = GAP) -> np.ndarray:
    """Images [S, S, 3] laid out as `rows` of tiles, grey between them."""
    columns = max(len(row) for row in rows)
    height, width = len(rows) * cell + (len(rows) + 1) * gap, columns * cell + (columns + 1) * gap
    out = np.full((height, width, 3), GAP_GREY, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            top, left = gap + r * (cell + gap), gap + c * (cell + gap)
            out[top:top + cell, left:left + cell] = _tile(image, cell)
    return out


class TokenText:
    """Token rows of ClipTokenizer back to text: start, end and padding dropped, DeCLIP's mask
    token shown as [mask]."""

    def __init__(self):
        self._bpe = SimpleTokenizer()
        self._sot = self._bpe.encoder["<start_of_text>"]
        self._eot = self._bpe.encoder["<end_of_text>"]

    def __call__(self, row: torch.Tensor) -> str:
        ids = row.tolist()
        ids = ids[1 if ids and ids[0] == self._sot else 0:]
        ids = ids[:ids.index(self._eot)] if self._eot in ids else ids
        words, run = [], []
        for token in ids:
            if token == MASK_ID:
                words += [self._bpe.decode(run), "[mask]"]
                run = []
            else:
                run.append(token)
        words.append(self._bpe.decode(run))
        return " ".join(word.strip() for word in words if word.strip())


def batch_views(batch: dict, text: TokenText, count: int) -> tuple[np.ndarray, list[dict], str]:
    """The first `count` samples of a training batch: a grid (one row per sample, its image views
    side by side), each sample's text views as data, and the same as markdown.

    Text views: "caption" (as the towers see it unmasked: for MLM batches, the masked positions
    restored from "mlm_labels"), "mlm_input" (the masked caption, when the batch has MLM) and
    "text_aug" (the EDA copy, when it has one)."""
    count = min(count, len(batch["text"]))
    keys = [key for key in IMAGE_KEYS if key in batch]
    views = [to_pixels(batch[key][:count]) for key in keys]
    tokens = batch["text"][:count].cpu()
    samples = []
    for i in range(count):
        sample = {"sample_id": int(batch["sample_id"][i])} if "sample_id" in batch else {}
        if "mlm_labels" in batch:
            labels = batch["mlm_labels"][i].cpu()
            chosen = labels != IGNORE_INDEX
            sample["caption"] = text(torch.where(chosen, labels, tokens[i]))
            sample["mlm_input"] = text(tokens[i])
        else:
            sample["caption"] = text(tokens[i])
        if "text_aug" in batch:
            sample["text_aug"] = text(batch["text_aug"][i].cpu())
        samples.append(sample)
    picture = grid([[view[i] for view in views] for i in range(count)])
    return picture, samples, _views_markdown(keys, samples)


_TEXT_VIEW_NAMES = {"caption": "caption", "mlm_input": "MLM input", "text_aug": "EDA copy"}


def _views_markdown(keys: list[str], samples: list[dict]) -> str:
    lines = [f"Rows top to bottom; columns: {', '.join(keys)} (CLIP normalisation undone)."]
    for row, sample in enumerate(samples, 1):
        where = f" (sample {sample['sample_id']})" if "sample_id" in sample else ""
        lines.append(f"\n**row {row}**{where}")
        lines += [f"- {label}: {sample[key]}" for key, label in _TEXT_VIEW_NAMES.items() if key in sample]
    return "\n".join(lines)


def colour_map(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB along _VIRIDIS."""
    position = np.clip(values, 0, 1) * (len(_VIRIDIS) - 1)
    low = np.minimum(position.astype(int), len(_VIRIDIS) - 2)
    weight = (position - low)[..., None]
    return np.round(_VIRIDIS[low] * (1 - weight) + _VIRIDIS[low + 1] * weight).astype(np.uint8)


def heatmap(matrix: np.ndarray, cell: int = HEATMAP_CELL) -> np.ndarray:
    """A matrix as coloured squares, its smallest value darkest and its largest brightest."""
    low, high = float(matrix.min()), float(matrix.max())
    scaled = (matrix - low) / (high - low) if high > low else np.zeros_like(matrix)
    return np.repeat(np.repeat(colour_map(scaled), cell, axis=0), cell, axis=1)
