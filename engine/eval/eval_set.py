"""A held-out MDS set, decoded once into memory for zero-shot, retrieval and probe evaluation.

Split over the ranks (engine/eval/shard.py): each rank reads only the sample ids of its block
(streaming's non-distributed reader, no shared memory), decodes them and holds their images,
N/W x 3 x S x S floats; the evaluation all-gathers the embeddings. One process
(launchers/evaluate.py) holds the whole set. The set is meant to be small (hundreds to a few
thousand images).

Records left out as unfit are counted on each rank and the counts added over the ranks before
any warning or refusal (DecodeTally), so that every rank decides alike: a rank whose whole
block is bad does not refuse a set the others can score.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from streaming import LocalDataset

from engine.data.dali import DecodedBatches, HostBatch
from engine.data.mds import describe_mds, is_remote
from engine.data.records import caption_problem, image_problem
from engine.errors import UserError
from engine.eval.shard import ALONE, Ranks, gather_objects

logger = logging.getLogger(__name__)

DECODE_BATCH = 64
EXAMPLES = 20   # item indices a warning names


@dataclass(frozen=True)
class EvalSet:
    """The held-out set as this rank holds it: the kept samples of its block (all of them alone)."""
    images: torch.Tensor               # [K, 3, S, S] float, normalised, CPU
    captions: list[str]                # of those K samples
    labels: torch.Tensor | None        # LongTensor [K] when the MDS has a `cls` column
    classnames: list[str] | None       # from classes.json
    templates: list[str] | None
    ids: torch.Tensor | None = None    # [K] each row's sample id in the whole set
    size: int | None = None            # samples in the whole set, bad ones included
    ranks: Ranks = ALONE               # the ranks it is split over (engine/eval/shard.py)

    def __post_init__(self):
        # A set made in one piece (one process, a test): every row, in order.
        if self.ids is None:
            object.__setattr__(self, "ids", torch.arange(len(self.images)))
        if self.size is None:
            object.__setattr__(self, "size", len(self.images))


@dataclass(frozen=True)
class Decoded:
    images: torch.Tensor          # [K, 3, S, S] normalised, CPU
    kept: list[int]               # index into the input of each decoded image
    left_out: dict[int, str]      # index -> why the item was left out


@dataclass(frozen=True)
class DecodeTally:
    """What a decoding kept, left out (unfit records) and patched (images DALI rejected, kept
    as the flat placeholder), with the first item indices of each for messages. Adds up over
    ranks: the warnings and the refusal are decided on the whole set's tally."""
    items: int
    kept: int
    left_out: int
    reasons: tuple[str, ...]
    left_out_examples: tuple[int, ...]
    replaced: int
    replaced_examples: tuple[int, ...]

    @classmethod
    def total(cls, tallies: list[DecodeTally]) -> DecodeTally:
        return cls(items=sum(t.items for t in tallies), kept=sum(t.kept for t in tallies),
                   left_out=sum(t.left_out for t in tallies),
                   reasons=tuple(sorted({r for t in tallies for r in t.reasons})),
                   left_out_examples=tuple(sorted(i for t in tallies for i in t.left_out_examples)[:EXAMPLES]),
                   replaced=sum(t.replaced for t in tallies),
                   replaced_examples=tuple(sorted(i for t in tallies for i in t.replaced_examples)[:EXAMPLES]))

    def report(self, what: str, log: bool = True) -> None:
        """Warn (when `log`) of what was left out or replaced; refuse a set with nothing usable."""
        if log and self.left_out:
            logger.warning("%s: %d item(s) left out (%s; e.g. items %s)", what, self.left_out,
                           ", ".join(self.reasons), list(self.left_out_examples))
        if log and self.replaced:
            logger.warning("%s: %d image(s) the decoder rejected replaced by a flat placeholder (items %s)",
                           what, self.replaced, list(self.replaced_examples))
        if not self.kept:
            raise UserError(f"{what}: none of its {self.items} item(s) is usable ({self.left_out} bad); "
                            f"convert it with `python launchers/convert.py <source> <out>`.")


class EvalDecoding:
    """CLIP's eval transform over `items` in order, as a stream of ([B, 3, S, S] images, the
    items' indices, counted from `first_index`): encoded image bytes, or the reason an item is
    already unusable. Streaming keeps memory bounded by a batch, whatever the set's size (an
    ImageNet-size folder does not fit in memory as floats).

    An image the record check finds unfit (engine/data/records.py) is left out (as a pair it
    would be a fake one), and checked before DALI sees it: a truncated PNG can crash DALI's CPU
    decoder. One that passes yet DALI rejects stays, as the flat placeholder, so that the
    results keep their alignment with the inputs. `what` names the set in messages.

    The warnings and the refusal of a set with nothing usable come from `settle`, called once
    the stream is consumed, not from the stream's end: split over ranks, the streams end at
    different points, and settling is a collective every rank must reach at the same one."""

    def __init__(self, items: Iterable[bytes | str], image_size: int, what: str, first_index: int = 0):
        self._items, self._image_size, self.what = items, image_size, what
        self._first_index = first_index
        self.left_out: dict[int, str] = {}   # index -> why the item was left out
        self.replaced: list[int] = []        # indices of images DALI rejected (placeholders)
        self.count = 0
        self.kept = 0

    def _host_batches(self) -> Iterator[HostBatch]:
        ids, encoded = [], []
        for index, item in enumerate(self._items, start=self._first_index):
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
        # deferred: cpu_pipeline imports DALI (about a second); the evaluator loads this module at
        # its start but needs DALI only once images are decoded.
        from engine.data.cpu_pipeline import eval_pipeline

        threads = max(1, min(8, len(os.sched_getaffinity(0))))
        decoded = DecodedBatches(self._host_batches(), device=torch.device("cpu"),
                                 build=lambda source: eval_pipeline(source, batch_size=DECODE_BATCH,
                                                                    image_size=self._image_size,
                                                                    num_threads=threads))
        for (images,), host in decoded:
            self.kept += len(host.payload)
            self.replaced.extend(host.payload[host.replaced].tolist())
            yield images, host.payload.tolist()

    def tally(self) -> DecodeTally:
        return DecodeTally(items=self.count, kept=self.kept, left_out=len(self.left_out),
                           reasons=tuple(sorted(set(self.left_out.values()))),
                           left_out_examples=tuple(sorted(self.left_out)[:EXAMPLES]),
                           replaced=len(self.replaced), replaced_examples=tuple(sorted(self.replaced)[:EXAMPLES]))

    def settle(self, ranks: Ranks = ALONE) -> DecodeTally:
        """The whole set's tally (this rank's added to its peers', a collective), reported: the
        warnings on the first rank only, the refusal (UserError) on every rank alike."""
        whole = DecodeTally.total(gather_objects(self.tally(), ranks))
        whole.report(self.what, log=ranks.rank == 0)
        return whole


def decode_for_eval(items: Iterable[bytes | str], image_size: int, what: str, first_index: int = 0,
                    ranks: Ranks = ALONE) -> Decoded:
    """The whole of an EvalDecoding in memory: for sets meant to be small (the held-out split).
    `items` is this rank's block of a set split over `ranks`, its first item `first_index`."""
    decoding = EvalDecoding(items, image_size, what, first_index)
    chunks, kept = [], []
    for images, ids in decoding:
        chunks.append(images)
        kept.extend(ids)
    decoding.settle(ranks)
    images = torch.cat(chunks) if chunks else torch.empty((0, 3, image_size, image_size))
    return Decoded(images, kept, decoding.left_out)


def load_eval_set(path: str | Path, image_size: int, ranks: Ranks = ALONE) -> EvalSet:
    """Decode this rank's block of an MDS directory's samples with CLIP's eval transform, bad
    records left out (every sample, alone). Every rank of `ranks` calls it (a collective)."""
    path = str(path)
    if is_remote(path):
        raise UserError(f"eval set {path}: evaluation reads a local MDS directory; copy it to local disk first.")
    info = describe_mds(path)
    dataset = LocalDataset(local=path)
    block = ranks.block(len(dataset))
    has_labels = "cls" in info.columns
    captions: list[str] = []   # of the block's samples, in order
    labels: list[int] = []

    def items() -> Iterator[bytes | str]:
        for sample_id in block:
            sample = dataset[sample_id]
            captions.append(sample["txt"])
            labels.append(int(sample["cls"]) if has_labels else -1)
            yield caption_problem(sample["txt"]) or sample["jpg"]

    decoded = decode_for_eval(items(), image_size, f"eval set {path}", block.start, ranks)
    rows = [sample_id - block.start for sample_id in decoded.kept]
    classes = info.classes or {}
    return EvalSet(
        images=decoded.images,
        captions=[captions[i] for i in rows],
        labels=torch.tensor([labels[i] for i in rows], dtype=torch.long) if has_labels else None,
        classnames=list(classes["classnames"]) if "classnames" in classes else None,
        templates=list(classes["templates"]) if "templates" in classes else None,
        ids=torch.tensor(decoded.kept, dtype=torch.long),
        size=len(dataset),
        ranks=ranks,
    )
