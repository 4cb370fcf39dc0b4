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


class EvalDecoding:
    """CLIP's eval transform over `items` in order, as a stream of ([B, 3, S, S] images, the
    items' indices): encoded image bytes, or the reason an item is already unusable. Streaming
    keeps memory bounded by a batch, whatever the set's size (an ImageNet-size folder does not
    fit in memory as floats).

    An image the record check finds unfit (engine/data/records.py) is left out (as a pair it
    would be a fake one), and checked before DALI sees it: a truncated PNG can crash DALI's CPU
    decoder. One that passes yet DALI rejects stays, as the flat placeholder, so that the
    results keep their alignment with the inputs. `what` names the set in messages; the
    warnings and the refusal of a set with nothing usable come when the stream ends."""

    def __init__(self, items: Iterable[bytes | str], image_size: int, what: str):
        self._items, self._image_size, self.what = items, image_size, what
        self.left_out: dict[int, str] = {}   # index -> why the item was left out
        self.replaced: list[int] = []        # indices of images DALI rejected (placeholders)
        self.count = 0

    def _host_batches(self) -> Iterator[HostBatch]:
        ids, encoded = [], []
        for index, item in enumerate(self._items):
            self.count += 1
            problem = item if isinstance(item, str) else image_problem(item)[0]
            if problem is not None:
                self.left_out[index] = problem
            else:
                ids.append(index)
                encoded.append(np.frombuffer(item, dtype=np.uint8))
            if len(ids) == DECODE_BATCH:
                yield HostBatch(encoded=encoded, payload=np.array(ids))
                ids, encoded = [], []
        if ids:
            yield HostBatch(encoded=encoded, payload=np.array(ids))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, list[int]]]:
        threads = max(1, min(8, len(os.sched_getaffinity(0))))
        decoded = DecodedBatches(self._host_batches(), device=torch.device("cpu"),
                                 build=lambda source: eval_pipeline(source, batch_size=DECODE_BATCH,
                                                                    image_size=self._image_size,
                                                                    num_threads=threads))
        kept = 0
        for (images,), host in decoded:
            kept += len(host.payload)
            self.replaced.extend(host.payload[host.replaced].tolist())
            yield images, host.payload.tolist()
        if self.left_out:
            logger.warning("%s: %d item(s) left out (%s; e.g. items %s)", self.what, len(self.left_out),
                           ", ".join(sorted(set(self.left_out.values()))), sorted(self.left_out)[:20])
        if self.replaced:
            logger.warning("%s: %d image(s) the decoder rejected replaced by a flat placeholder (items %s)",
                           self.what, len(self.replaced), self.replaced[:20])
        if not kept:
            raise UserError(f"{self.what}: none of its {self.count} item(s) is usable ({len(self.left_out)} bad); "
                            f"convert it with `python launchers/convert.py <source> <out>`.")


def decode_for_eval(items: Iterable[bytes | str], image_size: int, what: str) -> Decoded:
    """The whole of an EvalDecoding in memory: for sets meant to be small (the held-out split)."""
    decoding = EvalDecoding(items, image_size, what)
    chunks, kept = [], []
    for images, ids in decoding:
        chunks.append(images)
        kept.extend(ids)
    return Decoded(torch.cat(chunks), kept, decoding.left_out)


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
