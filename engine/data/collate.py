"""One micro-batch assembled from its samples: the DataLoader's collate step and the batch dict.

`PrepareBatch` runs in the DataLoader worker processes and does everything but decoding: reads
each image's bytes and size, draws each view's crop window and augmentation, tokenises the
captions, and makes the EDA copy and the MLM mask when the DataSpec asks. What it draws comes
from (seed, epoch, sample id) alone, never from a worker's state, so the number of workers
does not change a batch. After DALI has decoded the images, `assemble_batch` puts them and the
text together in the dict the training loop takes (spec.py lists its keys).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from engine.data.augment import ViewBatch, draw_view
from engine.data.dali import PLACEHOLDER_PNG, HostBatch
from engine.data.eda import Eda
from engine.data.mlm import MASK_ID, mask_rows
from engine.data.records import BAD_RECORDS_KEY, IMAGE_SIZE_KEY, SAMPLE_ID_KEY
from engine.data.spec import DataSpec
from engine.data.text import ClipTokenizer, strip_punctuation

# The random streams of one sample are keyed (seed, epoch, sample id, stream); image views use
# their index (0, 1) as the stream. Separate streams keep, say, an EDA edit from correlating
# with a crop.
TEXT_AUG_STREAM, MLM_STREAM = 16, 17


@dataclass
class TrainPayload:
    """What travels beside the images through DALI."""

    text: torch.Tensor       # [B, context] token ids (MLM-masked when the spec asks)
    sample_id: torch.Tensor  # [B] index of each sample in the dataset
    epoch: int
    batch_in_epoch: int = -1  # set by the main process, which alone knows the position
    mlm_labels: torch.Tensor | None = None  # [B, context]
    text_aug: torch.Tensor | None = None    # [B, context]
    bad_records: list[list[str]] = dataclasses.field(default_factory=list)  # per sample: reasons replaced


@dataclass(frozen=True)
class PrepareBatch:
    """DataLoader collate step, run in the worker processes: everything but decoding."""

    tokenizer: ClipTokenizer
    spec: DataSpec
    seed: int
    epoch: int
    eda: Eda | None = None  # given when spec.text_aug

    def __call__(self, samples: list[dict]) -> HostBatch:
        ids = [int(sample[SAMPLE_ID_KEY]) for sample in samples]
        encoded, replaced = [], []
        draws = [[] for _ in range(self.spec.image_views)]
        for sample, sample_id in zip(samples, ids):
            image = np.frombuffer(sample["jpg"], dtype=np.uint8)
            size = sample[IMAGE_SIZE_KEY]
            replaced.append(size is None)
            if size is None:  # no good stand-in found: the last resort, see dali._placeholder_png
                image, size = PLACEHOLDER_PNG, (16, 16)
            encoded.append(image)
            for view, view_draws in enumerate(draws):
                view_draws.append(draw_view(*size, self.spec.augment, self.spec.crop_scale,
                                            self.seed, self.epoch, sample_id, view))
        captions = [sample["txt"] for sample in samples]
        if self.spec.strip_punctuation:
            captions = [strip_punctuation(caption) for caption in captions]
        payload = TrainPayload(text=self.tokenizer(captions), sample_id=torch.tensor(ids, dtype=torch.long),
                               epoch=self.epoch, bad_records=[sample[BAD_RECORDS_KEY] for sample in samples])
        if self.spec.text_aug:
            payload.text_aug = self.tokenizer([self.eda(caption, (self.epoch, sample_id, TEXT_AUG_STREAM))
                                               for caption, sample_id in zip(captions, ids)])
        if self.spec.mlm:
            payload.text, payload.mlm_labels = mask_rows(
                payload.text, seeds=[_stream_seed(self.seed, self.epoch, i, MLM_STREAM) for i in ids],
                vocab_size=self.tokenizer.vocab_size, mask_id=MASK_ID,
                special_ids=(self.tokenizer.sot_id, self.tokenizer.eot_id), pad_id=self.tokenizer.pad_id)
        return HostBatch(encoded=encoded, payload=payload, replaced=np.array(replaced),
                         views=tuple(ViewBatch.stack(view_draws, self.spec.augment) for view_draws in draws))


def _stream_seed(seed: int, epoch: int, sample_id: int, stream: int) -> int:
    """A 64-bit torch seed for one of a sample's random streams."""
    return int(np.random.SeedSequence((seed, epoch, sample_id, stream)).generate_state(1, np.uint64)[0])


def assemble_batch(images: tuple[torch.Tensor, ...], payload: TrainPayload) -> dict:
    """The batch dict, with the keys DataSpec.batch_keys names, in that order."""
    batch = {"image": images[0]}
    if len(images) == 2:
        batch["image2"] = images[1]
    batch["text"] = payload.text
    if payload.mlm_labels is not None:
        batch["mlm_labels"] = payload.mlm_labels
    if payload.text_aug is not None:
        batch["text_aug"] = payload.text_aug
    batch["sample_id"] = payload.sample_id
    return batch
