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
from typing import Iterable, Iterator

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


@dataclass(frozen=True)
class Decoded:
    images: torch.Tensor          # [K, 3, S, S] normalised, CPU
    kept: list[int]               # index into the input of each decoded image
    left_out: dict[int, str]      # index -> why the item was left out


def decode_for_eval(items: Iterable[bytes | str], image_size: int, what: str) -> Decoded:
    """CLIP's eval transform over `items` in order: encoded image bytes, or the reason an item is
    already unusable. An image the record check finds unfit (engine/data/records.py) is left out
    (as a pair it would be a fake one), and checked before DALI sees it: a truncated PNG can crash
    DALI's CPU decoder. One that passes yet DALI rejects stays, as the flat placeholder, so that
    the results keep their alignment with the inputs. `what` names the set in messages."""
    left_out: dict[int, str] = {}
    count = 0

    def host_batches() -> Iterator[HostBatch]:
        nonlocal count
        ids, encoded = [], []
        for index, item in enumerate(items):
            count += 1
            problem = item if isinstance(item, str) else image_problem(item)[0]
            if problem is not None:
                left_out[index] = problem
            else:
                ids.append(index)
                encoded.append(np.frombuffer(item, dtype=np.uint8))
            if len(ids) == DECODE_BATCH:
                yield HostBatch(encoded=encoded, payload=np.array(ids))
                ids, encoded = [], []
        if ids:
            yield HostBatch(encoded=encoded, payload=np.array(ids))

    threads = max(1, min(8, len(os.sched_getaffinity(0))))
    decoded = DecodedBatches(host_batches(), device=torch.device("cpu"), build=lambda source: eval_pipeline(
        source, batch_size=DECODE_BATCH, image_size=image_size, num_threads=threads))
    chunks, kept, replaced = [], [], []
    for (images,), host in decoded:
        chunks.append(images)
        kept.extend(host.payload.tolist())
        replaced.extend(host.payload[host.replaced].tolist())
    if left_out:
        logger.warning("%s: %d item(s) left out (%s; e.g. items %s)", what, len(left_out),
                       ", ".join(sorted(set(left_out.values()))), sorted(left_out)[:20])
    if replaced:
        logger.warning("%s: %d image(s) the decoder rejected replaced by a flat placeholder (items %s)",
                       what, len(replaced), replaced[:20])
    if not chunks:
        raise UserError(f"{what}: none of its {count} item(s) is usable ({len(left_out)} bad); convert it "
                        f"with `python launchers/convert.py <source> <out>`.")
    return Decoded(torch.cat(chunks), kept, left_out)


def load_eval_set(path: str | Path, image_size: int) -> EvalSet:
    """Decode every sample of an MDS directory with CLIP's eval transform; bad records left out."""
    from streaming import LocalDataset

    path = str(path)
    if is_remote(path):
        raise UserError(f"eval set {path}: evaluation reads a local MDS directory; copy it to local disk first.")
    info = describe_mds(path)
    dataset = LocalDataset(local=path)
    has_labels = "cls" in info.columns
    captions: list[str] = []
    labels: list[int] = []

    def items() -> Iterator[bytes | str]:
        for sample_id in range(len(dataset)):
            sample = dataset[sample_id]
            captions.append(sample["txt"])
            labels.append(int(sample["cls"]) if has_labels else -1)
            yield caption_problem(sample["txt"]) or sample["jpg"]

    decoded = decode_for_eval(items(), image_size, f"eval set {path}")
    classes = info.classes or {}
    return EvalSet(
        images=decoded.images,
        captions=[captions[i] for i in decoded.kept],
        labels=torch.tensor([labels[i] for i in decoded.kept], dtype=torch.long) if has_labels else None,
        classnames=list(classes["classnames"]) if "classnames" in classes else None,
        templates=list(classes["templates"]) if "templates" in classes else None,
    )
