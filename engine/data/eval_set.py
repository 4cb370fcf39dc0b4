"""A held-out MDS set, decoded once into memory for zero-shot, retrieval and probe evaluation.

Every rank loads the whole set (streaming's non-distributed reader, no shared memory), so
evaluation needs no gather of images; the set is meant to be small (hundreds to a few
thousand images: N x 3 x S x S floats stay in memory).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from engine.data.dali import PLACEHOLDER_PNG, DecodedBatches, HostBatch, eval_pipeline, probe_image
from engine.data.mds import describe_mds, is_remote
from engine.errors import UserError

logger = logging.getLogger(__name__)

DECODE_BATCH = 64


@dataclass(frozen=True)
class EvalSet:
    images: torch.Tensor               # [N, 3, S, S] float, normalised, CPU
    captions: list[str]
    labels: torch.Tensor | None        # LongTensor [N] when the MDS has a `cls` column
    classnames: list[str] | None       # from classes.json
    templates: list[str] | None


def load_eval_set(path: str | Path, image_size: int) -> EvalSet:
    """Decode every sample of an MDS directory with CLIP's eval transform."""
    from streaming import LocalDataset

    path = str(path)
    if is_remote(path):
        raise UserError(f"eval set {path}: evaluation reads a local MDS directory; copy it to local disk first.")
    info = describe_mds(path)
    dataset = LocalDataset(local=path)
    has_labels = "cls" in info.columns
    captions: list[str] = []
    labels: list[int] = []

    def host_batches() -> Iterator[HostBatch]:
        for start in range(0, len(dataset), DECODE_BATCH):
            ids = range(start, min(start + DECODE_BATCH, len(dataset)))
            encoded, unreadable = [], []
            for sample_id in ids:
                sample = dataset[sample_id]
                captions.append(sample["txt"])
                if has_labels:
                    labels.append(int(sample["cls"]))
                unreadable.append(probe_image(sample["jpg"]) is None)
                # a placeholder keeps images, captions and labels aligned (see dali._placeholder_png)
                encoded.append(PLACEHOLDER_PNG if unreadable[-1] else np.frombuffer(sample["jpg"], dtype=np.uint8))
            yield HostBatch(encoded=encoded, payload=np.array(ids), replaced=np.array(unreadable))

    decoded = DecodedBatches(
        host_batches(), device=torch.device("cpu"),
        build=lambda source: eval_pipeline(source, batch_size=DECODE_BATCH, image_size=image_size,
                                           num_threads=max(1, min(8, len(os.sched_getaffinity(0))))))
    chunks, replaced = [], []
    for (images,), host in decoded:
        chunks.append(images)
        replaced.extend(host.payload[host.replaced].tolist())
    if replaced:
        logger.warning("eval set %s: %d undecodable image(s) replaced by a flat placeholder (sample ids %s)",
                       path, len(replaced), replaced[:20])

    classes = info.classes or {}
    return EvalSet(
        images=torch.cat(chunks),
        captions=captions,
        labels=torch.tensor(labels, dtype=torch.long) if has_labels else None,
        classnames=list(classes["classnames"]) if "classnames" in classes else None,
        templates=list(classes["templates"]) if "templates" in classes else None,
    )
