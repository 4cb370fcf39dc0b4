"""The one training iterator: MDS shards -> DataLoader workers -> DALI -> device batches.

    StreamingDataset (shuffled, partitioned by rank, micro-batch aware; a bad record replaced by a
                      stand-in of its shard, engine/data/records.py)
      -> torch DataLoader workers: read samples, read image headers, draw each view's crop
         window and augmentation, tokenise (EDA copy, MLM masking: whatever the DataSpec asks;
         collate.py)
      -> DALI: decode (nvJPEG on GPU), crop each view, resize, augment, normalise (on the CPU
         the resize is torch's, between two DALI graphs: cpu_pipeline.py)
      -> {"image", ["image2"], "text", ["mlm_labels"], ["text_aug"], "sample_id"} (see spec.py)

Determinism. The SET of samples in optimizer step t of an epoch is a function of (data, seed,
global batch, canonical nodes C) only, not of the world size, the nodes (any count that divides
C or that C divides; streaming refuses others), the micro-batch/grad-accum split or the number
of workers; what each rank sees is a function of those plus (micro_batch, world, rank):
  * streaming orders an epoch as one sequence F (shuffled by seed and epoch over C canonical
    nodes, whatever the number of physical nodes: engine/data/streams.py; the plan picks C and
    keeps it on resume) and deals it out position by position: with P nodes of R ranks, rank r
    of node p takes F[p + P*r], F[p + P*r + W], ... (W = P*R ranks; partition 'orig'). A
    rank's micro-batch b is therefore its share of F[b*B*W, (b+1)*B*W), and optimizer step t
    (grad_accum micro-batches on every rank) is exactly F[t*G, (t+1)*G) for the global batch
    G = W * grad_accum * B. Which rank holds which of a step's samples,
    and in what order, does change with the layout (the loss over the gathered batch does not);
  * streaming's per-worker split hands out whole micro-batches round-robin, which the DataLoader
    reads back round-robin, so the number of workers does not change the order;
  * an epoch is `steps_per_epoch` = dataset_size // G whole optimizer steps, `grad_accum`
    micro-batches each on every rank, and drops the tail (where streaming pads ranks with
    repeated samples): no step holds samples of two epochs, every rank steps the same number of
    times and no sample repeats within an epoch (unless a mixture's weights draw a dataset beyond
    its size, engine/data/streams.py);
  * crop windows, augmentations, EDA edits and MLM masks come from (seed, epoch, sample id),
    never from DALI's generators or a worker's state.
The epoch and the position in it are ours: before each epoch we hand streaming an explicit
resume point (`load_state_dict`), so the prefetching done by the DataLoader and DALI never leaks
into the saved state. The saved position is (epoch, samples of the epoch consumed by all ranks
together): the same on every rank and valid for any world size, so a run may resume on another
number of ranks or nodes, or with another micro-batch, as long as the data, seed and global
batch stay. Only positions between optimizer steps can be loaded (the loop saves no other).
"""
from __future__ import annotations

import functools
import json
import logging
import os
import weakref
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import DataLoader

from engine import dist
from engine.data.collate import PrepareBatch, TrainPayload, assemble_batch
from engine.data.dali import DecodedBatches, HostBatch
from engine.data.eda import Eda
from engine.data.records import DECODER_REJECTED, NO_SUBSTITUTE, StreamingDatasetWithIds
from engine.data.streaming_dataset import ShardUnavailable
from engine.data.shared_memory import live_streaming_locals, remove_stale_streaming_memory
from engine.data.spec import DataSpec
from engine.data.streams import (CANONICAL_NODES, SHUFFLE_ALGO, SHUFFLE_BLOCK, StreamFacts, describe_streams,
                                 fetches_in_flight, keeps_sample_order, node_counts_keeping_order, streaming_arguments)
from engine.data.text import ClipTokenizer
from engine.data.wordnet import WordNet
from engine.data.workers import start_workers, stop_workers, worker_dies_with_its_rank
from engine.errors import UserError

logger = logging.getLogger(__name__)

# A run stops when more than this share of the samples it took needed a stand-in, once it has
# taken enough of them for the share to mean something.
MAX_BAD_SHARE, MIN_SAMPLES_FOR_VERDICT = 0.5, 256
WARNED_BATCHES = 10  # batches whose bad records are named in a warning


@dataclass(frozen=True)
class LoaderSettings:
    """The loader's slice of the run's plan (RunPlan.loader_settings() fills each field from the
    plan field of the same name): how many samples a micro-batch holds, in which order they come,
    and how they are decoded and cached. A loader outside a run names them itself."""
    micro_batch: int
    image_size: int
    seed: int                           # crop windows, augmentations, EDA edits, MLM masks
    workers: int = 0                    # DataLoader workers of this rank
    decode_device: str = "cpu"
    grad_accum: int = 1                 # micro-batches per optimizer step: epochs end at steps
    decode_threads: int = 1             # DALI's threads
    hw_decoder_load: float | None = None  # the hardware JPEG decoder's share on a GPU (None: DALI's)
    cache_limit: int | None = None      # disk this node's shard cache may take (None: no limit)
    # A batch the data workers have not delivered within this long ends the run, rather than a
    # stalled source hanging it (with peers, their collective timeout would; alone, nothing would).
    collective_timeout_s: float | None = None
    shuffle_seed: int | None = None     # the sample order's seed (None: `seed`)
    shuffle_algo: str = SHUFFLE_ALGO
    shuffle_block: int = SHUFFLE_BLOCK
    canonical_nodes: int = CANONICAL_NODES

    def __post_init__(self):
        if (self.micro_batch < 1 or self.grad_accum < 1 or self.image_size < 1 or self.workers < 0
                or self.seed < 0):
            raise UserError(f"micro_batch ({self.micro_batch}), grad_accum ({self.grad_accum}) and image_size "
                            f"({self.image_size}) must be positive, workers ({self.workers}) and seed ({self.seed}) "
                            f"not negative.")
        if self.decode_device not in ("cpu", "gpu"):
            raise UserError(f"decode device '{self.decode_device}' is not one of 'cpu', 'gpu'.")
        if self.shuffle_seed is None:
            object.__setattr__(self, "shuffle_seed", self.seed)  # frozen: set once, here


class TrainLoader:
    """Endless, exactly resumable iterator of training micro-batches for one rank."""

    def __init__(self, streams: tuple[StreamFacts, ...], settings: LoaderSettings, *, spec: DataSpec,
                 tokenizer: ClipTokenizer, rank: int, world_size: int, wordnet: str | Path | None = None):
        """`streams` are the datasets of --data as the run's prepare() checked them (one, or a
        weighted mixture: engine/data/streams.py); `spec` says what each batch holds; `wordnet`
        is a WordNet 3.0 directory for EDA's synonym replacement (engine.data.wordnet.find_wordnet()),
        or None to edit by swaps and deletions only."""
        if settings.decode_device == "gpu" and not torch.cuda.is_available():
            raise UserError("decode device 'gpu' needs a CUDA GPU and none is visible; decode on 'cpu'.")
        micro_batch, grad_accum, seed = settings.micro_batch, settings.grad_accum, settings.seed
        ranks_on_node = _streaming_world(rank, world_size)
        nodes = world_size // ranks_on_node
        if not keeps_sample_order(settings.canonical_nodes, nodes):  # streaming would refuse mid-epoch
            raise UserError(f"{nodes} nodes cannot take the order of {settings.canonical_nodes} canonical nodes: "
                            f"run on {node_counts_keeping_order(settings.canonical_nodes, nodes)} nodes.")
        self.settings = settings
        self.micro_batch = micro_batch
        self.grad_accum = grad_accum
        self.global_batch = world_size * grad_accum * micro_batch
        self.spec = spec
        self.seed = seed
        self.workers = settings.workers
        self.tokenizer = tokenizer
        self.eda = Eda(WordNet(wordnet) if wordnet else None, seed) if spec.text_aug else None
        self.world_size = world_size
        self.rank = rank
        # Bad records met in the batches yielded so far, by reason (engine/data/records.py), and
        # the samples those batches held: what the run reports, and what stops a mostly bad dataset.
        self.bad_records: Counter[str] = Counter()
        self.samples_taken = 0
        self._samples_replaced = 0
        self._batches_warned = 0
        self._data = ", ".join(stream.location for stream in streams)  # for messages

        # A killed run leaves streaming's shared memory behind, and the next run on the same
        # local directory is then refused as "in use". One rank per node removes what no live
        # process maps, and every rank waits for it: streaming picks its prefix by looking at
        # /dev/shm before its own first barrier, and a rank that looked while the leftovers were
        # still there picked another prefix than its node's leader ("prefix=N was not registered
        # by local leader"; with remote data, a wrong "Reused local directory").
        # Two runs sharing a cache would evict each other's shards: refused, before any download.
        caches = {os.path.abspath(s.local) for s in streams if s.remote}
        if dist.local_rank() == 0:
            remove_stale_streaming_memory()
            if caches & live_streaming_locals():
                raise UserError(_cache_in_use(self._data, caches))
        _wait_for_every_rank()
        arguments = streaming_arguments(streams, micro_batch=micro_batch, seed=settings.shuffle_seed,
                                        cache_limit=settings.cache_limit,
                                        in_flight=fetches_in_flight(ranks_on_node, settings.workers),
                                        shuffle_algo=settings.shuffle_algo, shuffle_block=settings.shuffle_block,
                                        canonical_nodes=settings.canonical_nodes)
        try:
            self._dataset = StreamingDatasetWithIds(**arguments)
        except ValueError as error:
            if "Reused local directory" not in str(error):
                raise
            raise UserError(_cache_in_use(self._data, caches)) from error  # streaming's own check caught it
        self.dataset_size = int(self._dataset.epoch_size)
        self.steps_per_epoch = self.dataset_size // self.global_batch
        if self.steps_per_epoch == 0:
            raise UserError(
                f"dataset {self._data} has {self.dataset_size} samples, fewer than one global batch of "
                f"{self.global_batch} ({world_size} ranks x {grad_accum} accumulated x micro-batch "
                f"{micro_batch}); lower the global batch or use more data.")
        self.batches_per_epoch = self.steps_per_epoch * grad_accum  # micro-batches, on every rank
        self._samples_per_batch = micro_batch * world_size  # all ranks' micro-batch b: F[b*this, (b+1)*this)
        self._epoch = 0
        self._batch_in_epoch = 0
        self._device = dist.local_device() if settings.decode_device == "gpu" else torch.device("cpu")
        self._active: weakref.ref | None = None

    @classmethod
    def from_data(cls, data: str, *, spec: DataSpec, tokenizer: ClipTokenizer, rank: int, world_size: int,
                  wordnet: str | Path | None = None, local_cache: Path | None = None, **settings) -> TrainLoader:
        """A loader outside a training run (tests, benchmarks): `data` as --data takes it, checked
        here (with the fix, on any dataset that is not usable MDS); remote shards cached under
        `local_cache` (default under $CLIPZERO_CACHE); LoaderSettings' fields by name."""
        return cls(describe_streams(data, local_cache), LoaderSettings(**settings), spec=spec, tokenizer=tokenizer,
                   rank=rank, world_size=world_size, wordnet=wordnet)

    # ---- position ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Position after the batches yielded so far: the samples of the epoch that all ranks
        together have taken. Between optimizer steps, a whole number of global batches, the same
        on every rank and loadable by any world. It is valid only for the same seed, global batch
        and data: the run's plan holds those, and a resume that changes them is refused before
        the loader exists (engine/plan/resume.py)."""
        return {"epoch": self._epoch, "sample_in_epoch": self._batch_in_epoch * self._samples_per_batch}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`, taken between optimizer steps by a run with any number of ranks or
        nodes and any micro-batch split of the same global batch."""
        if "sample_in_epoch" not in state and "batch_in_epoch" in state:  # saved before 2026-12
            state = {**state, "sample_in_epoch": state["batch_in_epoch"] * state["micro_batch"] * state["world_size"]}
        sample, samples_per_epoch = state["sample_in_epoch"], self.steps_per_epoch * self.global_batch
        if not 0 <= sample < samples_per_epoch:
            raise UserError(f"data position {sample} is outside an epoch of {samples_per_epoch} samples; "
                            f"the checkpoint does not belong to this data.")
        if sample % self.global_batch:
            # Only a step boundary means the same on every layout: inside a step, which samples
            # are taken depends on the micro-batch split and ranks of the run that saved it.
            raise UserError(
                f"data position {sample} is inside an optimizer step of {self.global_batch} samples; resume from "
                f"a checkpoint taken between optimizer steps (as the training loop writes them).")
        self._close_active()
        self._epoch, self._batch_in_epoch = int(state["epoch"]), sample // self._samples_per_batch

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
        audit = _sample_log(self.rank)
        try:
            for images, host in decoded:
                payload: TrainPayload = host.payload
                if audit is not None:
                    audit.write(json.dumps({"epoch": payload.epoch, "sample_in_epoch": payload.batch_in_epoch
                                            * self._samples_per_batch, "ids": payload.sample_id.tolist()}) + "\n")
                self._count_bad_records(host)
                self._epoch, self._batch_in_epoch = payload.epoch, payload.batch_in_epoch + 1
                if self._batch_in_epoch == self.batches_per_epoch:
                    self._epoch, self._batch_in_epoch = self._epoch + 1, 0
                yield assemble_batch(images, payload)
        finally:
            decoded.close()  # stops the DataLoader workers as soon as the caller drops us
            if audit is not None:
                audit.close()

    def _count_bad_records(self, host: HostBatch) -> None:
        """Count this batch's bad records; stop the run on a dataset that is mostly bad."""
        payload: TrainPayload = host.payload
        reasons = [reason for sample in payload.bad_records for reason in sample]
        # A placeholder that is not a "no usable stand-in" went in after DALI itself failed.
        rejected = int(host.replaced.sum()) - reasons.count(NO_SUBSTITUTE)
        reasons += [DECODER_REJECTED] * rejected
        self.samples_taken += len(payload.bad_records)
        self._samples_replaced += sum(1 for sample in payload.bad_records if sample) + rejected
        if not reasons:
            return
        self.bad_records.update(reasons)
        if self._batches_warned < WARNED_BATCHES:  # then only the counts, in metrics.jsonl
            self._batches_warned += 1
            logger.warning("sample id(s) %s: bad records replaced by stand-ins (%s)%s",
                           [i for i, sample in zip(payload.sample_id.tolist(), payload.bad_records) if sample],
                           ", ".join(sorted(set(reasons))), "; further ones are only counted"
                           if self._batches_warned == WARNED_BATCHES else "")
        share = self._samples_replaced / self.samples_taken
        if self.samples_taken >= MIN_SAMPLES_FOR_VERDICT and share > MAX_BAD_SHARE:
            found = ", ".join(f"{count:,} {reason}" for reason, count in self.bad_records.most_common())
            raise UserError(
                f"dataset {self._data}: {self._samples_replaced:,} of the first {self.samples_taken:,} samples this "
                f"rank took were unusable (bad records met, bad stand-ins included: {found}); it was not written "
                f"by clipzero's converter, which decodes every image and leaves bad pairs out. Convert the source "
                f"data with `python launchers/convert.py <source> <mds dir>` and train on that.")

    def _host_batches(self, epoch: int, batch: int) -> Iterator[HostBatch]:
        """Undecoded batches from `batch` of `epoch` on, rolling over epochs forever."""
        while True:
            # Streaming counts epochs itself and ignores a resume point older than its count;
            # setting the count makes the resume point (ours) the only source of truth.
            self._dataset.next_epoch = epoch
            self._dataset.load_state_dict({
                "epoch": epoch, "sample_in_epoch": batch * self._samples_per_batch,
                "shuffle_seed": self.settings.shuffle_seed, "num_canonical_nodes": self.settings.canonical_nodes})
            # Workers restart every epoch (they learn the epoch at start), so fork: it is instant.
            # Its own generator: a DataLoader draws its workers' base seed from torch's global RNG
            # otherwise, at each epoch's start and at a resume's first batch, which moved the draws of
            # the model's random layers (patch dropout) after a resume off those of an unbroken run.
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            loader = DataLoader(self._dataset, batch_size=self.micro_batch, num_workers=self.workers,
                                collate_fn=PrepareBatch(self.tokenizer, self.spec, self.seed, epoch, self.eda),
                                generator=generator,
                                worker_init_fn=functools.partial(worker_dies_with_its_rank, os.getpid()),
                                multiprocessing_context="fork" if self.workers else None,
                                timeout=(self.settings.collective_timeout_s or 0) if self.workers else 0)
            batches = start_workers(loader)
            try:
                for index in range(batch, self.batches_per_epoch):
                    host = self._next_batch(batches)
                    if host is None or len(host.encoded) != self.micro_batch:
                        # A shard failure raises ShardUnavailable (streaming_dataset.py), so what is left is
                        # data that no longer matches the epoch the loader computed at its start.
                        raise RuntimeError(
                            f"streaming ended epoch {epoch} at batch {index} of {self.batches_per_epoch} "
                            f"({'no batch' if host is None else f'{len(host.encoded)} samples'} where "
                            f"{self.micro_batch} were due): its data ran out early. Likely causes: {self._data} "
                            f"changed while the run read it (shards or index.json rewritten or removed: restore "
                            f"them, or start a new run on the new data), or a data worker stopped early on an "
                            f"error streaming only logged (look above for it; a failed shard download or "
                            f"decompression: check the network, the credentials and the cache's free disk).")
                    host.payload.batch_in_epoch = index
                    yield host
            except Exception:
                stop_workers(batches, killed=True)  # the run ends: a stuck worker is not waited for
                raise
            finally:
                stop_workers(batches)  # now, before the next epoch starts its own (and on an error)
                del batches
            epoch, batch = epoch + 1, 0

    def _next_batch(self, batches) -> HostBatch | None:
        try:
            return next(batches, None)
        except ShardUnavailable as error:
            if not self.workers:
                raise  # raised in this process: its message is the whole story
            # From a worker the DataLoader re-raises it inside that worker's traceback; the cause
            # is in the failure every worker shares with this process.
            raise ShardUnavailable(self._dataset.unavailable_message()) from error
        except RuntimeError as error:
            if "timed out" not in str(error):
                raise
            raise RuntimeError(
                f"no batch came from the data workers within {self.settings.collective_timeout_s:g} s (the plan's "
                f"collective_timeout_s): reading {self._data} stalled (a remote store that stopped answering, a "
                f"full or vanished cache directory). The run ends so that it can resume from its last checkpoint; "
                f"if the source is merely slow, raise --collective-timeout.") from error

    def _build_pipeline(self, source):
        # deferred: the graphs import DALI, about a second; engine.training_run imports this
        # module, and a dry run builds no pipeline.
        from engine.data import cpu_pipeline, train_graph

        settings = self.settings
        if settings.decode_device == "cpu":  # DALI's CPU resize is the slow step there: torch resizes
            return cpu_pipeline.cpu_train_pipeline(source, batch_size=self.micro_batch, image_size=settings.image_size,
                                                   num_threads=settings.decode_threads, augment=self.spec.augment,
                                                   views=self.spec.image_views)
        return train_graph.train_pipeline(source, batch_size=self.micro_batch, image_size=settings.image_size,
                                          device=settings.decode_device, device_id=self._device.index,
                                          num_threads=settings.decode_threads, augment=self.spec.augment,
                                          views=self.spec.image_views, hw_decoder_load=settings.hw_decoder_load)

    def _close_active(self) -> None:
        active = self._active() if self._active is not None else None
        if active is not None:
            active.close()
        self._active = None


def _cache_in_use(data: str, caches: set[str]) -> str:
    return (f"another live run on this machine streams part of {data} into the same cache ({', '.join(sorted(caches))}); "
            f"give this run a cache of its own with CLIPZERO_CACHE=<another directory>, or wait for that run to end.")


def _sample_log(rank: int):
    """With CLIPZERO_SAMPLE_LOG=DIR, each rank appends one JSON line per micro-batch it takes to
    DIR/rank<r>.jsonl (epoch, the epoch's position before it, sample ids): an audit of which
    samples a run saw, across restarts (the tests check exactly-once with it)."""
    folder = os.environ.get("CLIPZERO_SAMPLE_LOG")
    if not folder:
        return None
    Path(folder).mkdir(parents=True, exist_ok=True)
    return open(Path(folder) / f"rank{rank}.jsonl", "a", buffering=1)


def _wait_for_every_rank() -> None:
    """A barrier of all ranks, where a process group exists (streaming's own barriers use the
    same group; on a GPU, pretrain set each rank's device before the group was made)."""
    if dist.world_size() > 1:
        torch.distributed.barrier()


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

