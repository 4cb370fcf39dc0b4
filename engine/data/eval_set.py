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

from engine.data.dali import DecodedBatches, HostBatch, eval_pipeline
from engine.data.mds import describe_mds, is_remote
from engine.data.records import caption_problem, image_problem
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

    left_out: dict[int, str] = {}

    def host_batches() -> Iterator[HostBatch]:
        # A bad record is left out of the evaluation (it would be a fake pair), and checked
        # before DALI sees it: a truncated PNG can crash DALI's CPU decoder.
        ids, encoded = [], []
        for sample_id in range(len(dataset)):
            sample = dataset[sample_id]
            problem = caption_problem(sample["txt"]) or image_problem(sample["jpg"])[0]
            if problem is not None:
                left_out[sample_id] = problem
            else:
                captions.append(sample["txt"])
                if has_labels:
                    labels.append(int(sample["cls"]))
                ids.append(sample_id)
                encoded.append(np.frombuffer(sample["jpg"], dtype=np.uint8))
            if len(ids) == DECODE_BATCH or (sample_id == len(dataset) - 1 and ids):
                yield HostBatch(encoded=encoded, payload=np.array(ids))
                ids, encoded = [], []

    decoded = DecodedBatches(
        host_batches(), device=torch.device("cpu"),
        build=lambda source: eval_pipeline(source, batch_size=DECODE_BATCH, image_size=image_size,
                                           num_threads=max(1, min(8, len(os.sched_getaffinity(0))))))
    chunks, replaced = [], []
    for (images,), host in decoded:
        chunks.append(images)
        replaced.extend(host.payload[host.replaced].tolist())
    if left_out:
        logger.warning("eval set %s: %d bad record(s) left out (%s; sample ids %s)", path, len(left_out),
                       ", ".join(sorted(set(left_out.values()))), sorted(left_out)[:20])
    if replaced:  # passed the record check, yet DALI could not decode them: kept aligned by a placeholder
        logger.warning("eval set %s: %d image(s) the decoder rejected replaced by a flat placeholder (sample ids %s)",
                       path, len(replaced), replaced[:20])
    if not chunks:
        raise UserError(f"eval set {path}: none of its {len(dataset)} records is usable ({len(left_out)} bad); "
                        f"convert it with `python launchers/convert.py <source> <mds dir>`.")

    classes = info.classes or {}
    return EvalSet(
        images=torch.cat(chunks),
        captions=captions,
        labels=torch.tensor(labels, dtype=torch.long) if has_labels else None,
        classnames=list(classes["classnames"]) if "classnames" in classes else None,
        templates=list(classes["templates"]) if "templates" in classes else None,
    )
