"""What a run shows beyond its scalars, as a loop hook (engine/observe/hooks.py):

  batches       the first training batch a run takes: a grid of its augmented views with
                their captions and text views ("train/views")
  step_done     keeps each trained step's logit scale for the next log
  logged        the logit scale's histogram over the steps since the last log
  evaluated     on a fixed batch of held-out pairs (the set's first, the same on every rank
                though each holds only its block of the set: engine/eval/shard.first_rows):
                the image-text cosine similarity heatmap and the embedding norms' histograms
                ("heldout/..."; TensorBoard's eval/heldout/..., metrics.tensorboard_tag)

Every rank calls every hook: `evaluated` runs forwards, which under ZeRO-3 gather parameters
and so must run on all ranks; what is drawn and written, only rank 0 (the writer's) does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from engine.observe.hooks import LoopHook
from engine.observe.metrics import MetricsWriter
from engine.observe.visuals import IMAGE_KEYS, TokenText, batch_views, heatmap

VIEW_SAMPLES = 8    # samples in the views grid
PROBE_PAIRS = 16    # held-out pairs in the similarity heatmap


@dataclass(frozen=True)
class HeldOutProbe:
    """The first held-out pairs, ready for the towers: the same batch at every evaluation."""
    images: torch.Tensor    # [N, 3, S, S] normalised, CPU
    tokens: torch.Tensor    # [N, L]
    captions: list[str]     # as the text tower reads them

    @classmethod
    def first(cls, images: torch.Tensor, captions: list[str], tokenizer,
              clean_text: Callable[[str], str] | None = None, count: int = PROBE_PAIRS) -> HeldOutProbe:
        """`clean_text`: the normalisation training applies to captions (CLIP-Lite's)."""
        captions = [clean_text(c) if clean_text else c for c in captions[:count]]
        return cls(images[:count], tokenizer(captions), captions)


class Charts(LoopHook):
    def __init__(self, writer: MetricsWriter, *, model: torch.nn.Module | None = None,
                 probe: HeldOutProbe | None = None, device: torch.device | None = None):
        """`model`: the TwoTower the probe runs through, on `device` (None: no heatmap)."""
        self.writer = writer
        self._model, self._probe, self._device = model, probe, device
        self._scales: list[torch.Tensor] = []

    def batches(self, batches: Iterator[dict], first_step: int) -> Iterator[dict]:
        """`batches`, the first of them drawn at `first_step` on its way through."""
        first = True
        for batch in batches:
            if first and self.writer.enabled:
                picture, samples, notes = batch_views(batch, TokenText(), VIEW_SAMPLES)
                self.writer.image(first_step, "train/views", picture, notes=notes,
                                  columns=[key for key in IMAGE_KEYS if key in batch], samples=samples)
            first = False
            yield batch

    def step_done(self, step: int, losses: dict[str, torch.Tensor], skipped: bool) -> None:
        if self.writer.enabled and not skipped and "logit_scale" in losses:
            self._scales.append(losses["logit_scale"].detach().float().reshape(()))

    def logged(self, step: int, values: dict[str, float]) -> None:
        if self._scales:
            self.writer.histogram(step, "logit_scale", torch.stack(self._scales).cpu().numpy())
        self._scales.clear()

    @torch.no_grad()
    def evaluated(self, step: int, metrics: dict[str, float]) -> None:
        if self._probe is None or self._model is None:
            return
        model, probe = self._model, self._probe
        was_training = model.training
        model.eval()
        try:
            image = model.image_outputs(probe.images.to(self._device)).embedding.float()
            text = model.text_outputs(probe.tokens.to(self._device)).embedding.float()
        finally:
            model.train(was_training)
        if not self.writer.enabled:
            return
        similarity = (F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T).cpu().numpy()
        self.writer.histogram(step, "heldout/image_embedding_norm", image.norm(dim=-1).cpu().numpy())
        self.writer.histogram(step, "heldout/text_embedding_norm", text.norm(dim=-1).cpu().numpy())
        notes = (f"Cosine similarity of held-out image i (row) and caption j (column), the first "
                 f"{len(probe.captions)} pairs; the diagonal holds the true pairs. Colours span "
                 f"[{similarity.min():.3f}, {similarity.max():.3f}], dark to bright.\n\n"
                 + "\n".join(f"{j + 1}. {caption}" for j, caption in enumerate(probe.captions)))
        self.writer.image(step, "heldout/similarity", heatmap(similarity), notes=notes,
                          matrix=np.round(similarity.astype(np.float64), 4).tolist(), captions=probe.captions)
