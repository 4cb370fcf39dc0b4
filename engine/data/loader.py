"""The one training iterator: MDS shards -> DataLoader workers -> DALI -> device batches.

    StreamingDataset (shuffled, partitioned by rank, micro-batch aware)
      -> torch DataLoader workers: read samples, read image headers, draw each view's crop
         window and augmentation, tokenise (EDA copy, MLM masking: whatever the DataSpec asks)
      -> DALI: decode (nvJPEG on GPU), crop each view, resize, augment, normalise
      -> {"image", ["image2"], "text", ["mlm_labels"], ["text_aug"], "sample_id"} (see spec.py)

Determinism. The batches a rank sees are a function of (data, seed, micro_batch, world size,
rank) only:
  * streaming's sample order depends on the seed, epoch and world, and its per-worker split
    hands out whole micro-batches round-robin, which the DataLoader reads back round-robin,
    so the number of workers does not change the order;
  * each epoch keeps exactly `batches_per_epoch` full micro-batches on every rank and drops
    the tail, where streaming pads ranks with repeated samples; every rank therefore steps the
    same number of times and ranks never share a sample within an epoch;
  * crop windows, augmentations, EDA edits and MLM masks come from (seed, epoch, sample id),
    never from DALI's generators or a worker's state.
The epoch and the position in it are ours: before each epoch we hand streaming an explicit
resume point (`load_state_dict`), so a restart needs only (epoch, batch) and the prefetching
done by the DataLoader and DALI never leaks into the saved state.
"""
from __future__ import annotations

import gc
import logging
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from streaming import StreamingDataset
from streaming.base.util import clean_stale_shared_memory
from torch.utils.data import DataLoader

from engine.data.augment import ViewBatch, draw_view
from engine.data.dali import PLACEHOLDER_PNG, DecodedBatches, HostBatch, probe_image, train_pipeline
from engine.data.eda import Eda
from engine.data.mds import describe_mds, is_remote, local_copy_dir
from engine.data.mlm import MASK_ID, mask_rows
from engine.data.spec import DataSpec
from engine.data.text import ClipTokenizer, strip_punctuation
from engine.data.wordnet import WordNet
from engine.errors import UserError

logger = logging.getLogger(__name__)

SAMPLE_ID_KEY = "__sample_id__"
# The random streams of one sample are keyed (seed, epoch, sample id, stream); image views use
# their index (0, 1) as the stream. Separate streams keep, say, an EDA edit from correlating
# with a crop.
TEXT_AUG_STREAM, MLM_STREAM = 16, 17


class StreamingDatasetWithIds(StreamingDataset):
    """StreamingDataset whose samples also carry their index (crop seeds and logs need it)."""

    def get_item(self, sample_id: int, retry: int = 7):
        sample = super().get_item(sample_id, retry)
        sample[SAMPLE_ID_KEY] = int(sample_id)
        return sample


@dataclass
class TrainPayload:
    """What travels beside the images through DALI."""

    text: torch.Tensor       # [B, context] token ids (MLM-masked when the spec asks)
    sample_id: torch.Tensor  # [B] index of each sample in the dataset
    epoch: int
    batch_in_epoch: int = -1  # set by the main process, which alone knows the position
    mlm_labels: torch.Tensor | None = None  # [B, context]
    text_aug: torch.Tensor | None = None    # [B, context]


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
            size = probe_image(sample["jpg"])
            replaced.append(size is None)
            if size is None:  # see dali._placeholder_png for why an image is replaced, not dropped
                image, size = PLACEHOLDER_PNG, (16, 16)
            encoded.append(image)
            for view, view_draws in enumerate(draws):
                view_draws.append(draw_view(*size, self.spec.augment, self.spec.crop_scale,
                                            self.seed, self.epoch, sample_id, view))
        captions = [sample["txt"] for sample in samples]
        if self.spec.strip_punctuation:
            captions = [strip_punctuation(caption) for caption in captions]
        payload = TrainPayload(text=self.tokenizer(captions), sample_id=torch.tensor(ids, dtype=torch.long),
                               epoch=self.epoch)
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


class TrainLoader:
    """Endless, exactly resumable iterator of training micro-batches for one rank."""

    def __init__(self, data: str, *, micro_batch: int, image_size: int, spec: DataSpec, seed: int, workers: int,
                 decode_device: str, tokenizer: ClipTokenizer, rank: int, world_size: int,
                 wordnet: str | Path | None = None, local_cache: Path | None = None):
        """`spec` says what each batch holds; `wordnet` is a WordNet 3.0 directory for EDA's synonym
        replacement (engine.data.wordnet.find_wordnet()), or None to edit by swaps and deletions only."""
        _check_arguments(micro_batch, image_size, seed, workers, decode_device)
        local_world_size = _streaming_world(rank, world_size)
        describe_mds(data, local_cache)  # fails early, with the fix, on a path that is not usable MDS
        self.micro_batch = micro_batch
        self.image_size = image_size
        self.spec = spec
        self.seed = seed
        self.workers = workers
        self.decode_device = decode_device
        self.tokenizer = tokenizer
        self.eda = Eda(WordNet(wordnet) if wordnet else None, seed) if spec.text_aug else None
        self.uses_synonyms = self.eda is not None and self.eda.uses_synonyms  # for the run plan to state
        self.world_size = world_size
        self.undecodable_images = 0  # replaced by the placeholder, in batches yielded so far
        self._num_nodes = world_size // local_world_size

        # A crashed run leaves streaming's shared memory behind, and a remote dataset then
        # refuses its cache directory as "in use". Nothing else in this process may be using
        # streaming's shared memory yet: the training loader is the only StreamingDataset.
        clean_stale_shared_memory()
        self._dataset = StreamingDatasetWithIds(
            remote=data if is_remote(data) else None,
            local=str(local_copy_dir(data, local_cache)),
            batch_size=micro_batch, shuffle=True, shuffle_seed=seed,
            num_canonical_nodes=self._num_nodes)
        self.dataset_size = int(self._dataset.epoch_size)
        self.batches_per_epoch = self.dataset_size // world_size // micro_batch
        if self.batches_per_epoch == 0:
            raise UserError(
                f"dataset {data} has {self.dataset_size} samples, fewer than one micro-batch per rank "
                f"({micro_batch} x {world_size} ranks); lower the batch size or use more data.")
        self.samples_per_epoch = self.batches_per_epoch * micro_batch * world_size
        self._epoch = 0
        self._batch_in_epoch = 0
        self._device = _decode_torch_device(decode_device)
        self._active: weakref.ref | None = None

    # ---- position ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Position after the batches yielded so far, with the values it is only valid for."""
        return {"epoch": self._epoch, "batch_in_epoch": self._batch_in_epoch, "seed": self.seed,
                "micro_batch": self.micro_batch, "world_size": self.world_size,
                "dataset_size": self.dataset_size}

    def load_state_dict(self, state: dict) -> None:
        expected = {"seed": self.seed, "micro_batch": self.micro_batch, "world_size": self.world_size,
                    "dataset_size": self.dataset_size}
        changed = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
        if changed:
            details = ", ".join(f"{k} was {old}, now {new}" for k, (old, new) in changed.items())
            raise UserError(
                f"cannot resume the data order: {details}. Resume with the same data, seed, micro-batch "
                f"and number of ranks as the checkpoint, or start a new run in a fresh output directory.")
        if not 0 <= state["batch_in_epoch"] < self.batches_per_epoch:
            raise UserError(f"data position {state['batch_in_epoch']} is outside an epoch of "
                            f"{self.batches_per_epoch} batches; the checkpoint does not belong to this data.")
        self._close_active()
        self._epoch, self._batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])

    # ---- iteration --------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        # One live iterator at a time: two would drive the same streaming dataset at once. Held
        # weakly, so that dropping the iterator closes it (and its workers) straight away.
        self._close_active()
        batches = self._batches()
        self._active = weakref.ref(batches)
        return batches

    def _batches(self) -> Iterator[dict]:
        decoded = DecodedBatches(self._host_batches(self._epoch, self._batch_in_epoch),
                                 build=self._build_pipeline, device=self._device)
        try:
            for images, host in decoded:
                payload: TrainPayload = host.payload
                if host.replaced.any():
                    ids = payload.sample_id[torch.from_numpy(host.replaced)].tolist()
                    self.undecodable_images += len(ids)
                    logger.warning("replaced undecodable image(s) of sample id(s) %s with a flat placeholder", ids)
                self._epoch, self._batch_in_epoch = payload.epoch, payload.batch_in_epoch + 1
                if self._batch_in_epoch == self.batches_per_epoch:
                    self._epoch, self._batch_in_epoch = self._epoch + 1, 0
                yield _batch(images, payload)
        finally:
            decoded.close()  # stops the DataLoader workers as soon as the caller drops us

    def _host_batches(self, epoch: int, batch: int) -> Iterator[HostBatch]:
        """Undecoded batches from `batch` of `epoch` on, rolling over epochs forever."""
        while True:
            # Streaming counts epochs itself and ignores a resume point older than its count;
            # setting the count makes the resume point (ours) the only source of truth.
            self._dataset.next_epoch = epoch
            self._dataset.load_state_dict({
                "epoch": epoch, "sample_in_epoch": batch * self.micro_batch * self.world_size,
                "shuffle_seed": self.seed, "num_canonical_nodes": self._num_nodes,
                "initial_physical_nodes": self._num_nodes})
            # Workers restart every epoch (they learn the epoch at start), so fork: it is instant.
            loader = DataLoader(self._dataset, batch_size=self.micro_batch, num_workers=self.workers,
                                collate_fn=PrepareBatch(self.tokenizer, self.spec, self.seed, epoch, self.eda),
                                multiprocessing_context="fork" if self.workers else None)
            batches = _start_workers(loader)
            try:
                for index in range(batch, self.batches_per_epoch):
                    host = next(batches, None)
                    if host is None or len(host.encoded) != self.micro_batch:
                        raise RuntimeError(f"streaming ended epoch {epoch} at batch {index} "
                                           f"of {self.batches_per_epoch}")
                    host.payload.batch_in_epoch = index
                    yield host
            finally:
                del batches  # stops this epoch's workers now, before the next epoch starts its own
            epoch, batch = epoch + 1, 0

    def _build_pipeline(self, source):
        return train_pipeline(source, batch_size=self.micro_batch, image_size=self.image_size,
                              device=self.decode_device, device_id=self._device.index,
                              num_threads=_dali_threads(), augment=self.spec.augment, views=self.spec.image_views)

    def _close_active(self) -> None:
        active = self._active() if self._active is not None else None
        if active is not None:
            active.close()
        self._active = None


def _batch(images: tuple[torch.Tensor, ...], payload: TrainPayload) -> dict:
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


def _start_workers(loader: DataLoader):
    """Fork the workers with every existing object frozen out of their garbage collector.

    A forked worker inherits the parent's objects, uncollected garbage included. Were it to
    collect a dead DALI pipeline, the finalizer would join threads that exist only in the
    parent and crash the worker (a segfault). Frozen objects are never collected in the child;
    in the parent, unfreezing hands them back to the collector. No gc.collect() first: a full
    collection of a training process took ~0.5 s at every epoch boundary (CLIP, 117 steps on
    150 pairs, one batch per epoch, 2 CPU cores: 157 s with it, 94 s without).
    """
    if loader.num_workers == 0:
        return iter(loader)
    gc.freeze()
    try:
        return iter(loader)  # forks every worker before returning
    finally:
        gc.unfreeze()


def _check_arguments(micro_batch, image_size, seed, workers, decode_device) -> None:
    if micro_batch < 1 or image_size < 1 or workers < 0 or seed < 0:
        raise UserError(f"micro_batch ({micro_batch}) and image_size ({image_size}) must be positive, "
                        f"workers ({workers}) and seed ({seed}) not negative.")
    if decode_device not in ("cpu", "gpu"):
        raise UserError(f"decode device '{decode_device}' is not one of 'cpu', 'gpu'.")
    if decode_device == "gpu" and not torch.cuda.is_available():
        raise UserError("decode device 'gpu' needs a CUDA GPU and none is visible; decode on 'cpu'.")


def _streaming_world(rank: int, world_size: int) -> int:
    """Check streaming's view of the world (it reads environment variables) matches ours.

    Returns the number of ranks per node. The deepspeed launcher exports LOCAL_SIZE, not the
    LOCAL_WORLD_SIZE streaming reads; without it streaming would take every rank for its own
    node and two ranks on one machine would both claim the same shared memory.
    """
    env_rank, env_world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if (env_rank, env_world) != (rank, world_size):
        raise RuntimeError(f"TrainLoader got rank {rank} of {world_size}, but RANK/WORLD_SIZE in the "
                           f"environment (read by streaming) say {env_rank} of {env_world}.")
    if world_size > 1 and "LOCAL_WORLD_SIZE" not in os.environ:
        if "LOCAL_SIZE" not in os.environ:
            raise RuntimeError("set LOCAL_WORLD_SIZE (ranks on this node) before building the TrainLoader: "
                               "streaming needs it to share memory between the ranks of a node.")
        os.environ["LOCAL_WORLD_SIZE"] = os.environ["LOCAL_SIZE"]
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if world_size % local_world_size:
        raise RuntimeError(f"WORLD_SIZE {world_size} is not a multiple of LOCAL_WORLD_SIZE {local_world_size}.")
    return local_world_size


def _decode_torch_device(decode_device: str) -> torch.device:
    if decode_device == "cpu":
        return torch.device("cpu")
    # One GPU visible per process (SLURM binding) or all of them (deepspeed launcher).
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())


def _dali_threads() -> int:
    cpus = len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(1, min(8, cpus))
