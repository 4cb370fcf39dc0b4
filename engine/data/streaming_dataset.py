"""StreamingDataset with two of streaming's own failures mended (mosaicml-streaming 0.13).

A shard it cannot fetch or decompress (a remote giving up, a corrupt shard, a full cache disk)
fails in a background thread of one data worker: streaming logs it and quietly ends that
worker's iteration, the DataLoader then goes on with the other workers' batches in the wrong
places, and any worker waiting for that shard waits forever. Here the failure is shared by the
rank and every worker it forks, and each of them raises ShardUnavailable, naming the shard and
what to check. And streaming opens its resume segment anew at every epoch start, never closing
the old handles (2 file descriptors an epoch, EMFILE after ~500 epochs): here one handle is
kept and rewritten.
"""
from __future__ import annotations

import ctypes
import json
import multiprocessing
import time

from streaming import StreamingDataset
from streaming.base.constant import TICK
from streaming.base.dataset import _ShardState

FAILURE_BYTES = 2048  # room for the first shard failure's description, shared with the data workers


class ShardUnavailable(RuntimeError):
    """A shard streaming could not fetch or decompress: the epoch cannot go on in order."""


class MendedStreamingDataset(StreamingDataset):
    """streaming's dataset whose shard failures stop every process of the rank with
    ShardUnavailable, and which keeps one resume segment (see the module's docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # streaming stops an iteration through `_event`, but its own is a thread event of one
        # process: a worker whose shard failed stopped alone. Made here, before the DataLoader
        # forks its workers, these are shared by the rank and all of them. A failure stays for the
        # dataset's life, since streaming leaves that shard marked as being prepared for good.
        fork = multiprocessing.get_context("fork")
        self._event = fork.Event()
        self._failure = fork.Array(ctypes.c_char, FAILURE_BYTES)

    # ---- a shard that cannot be prepared -------------------------------------------------------
    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        """streaming's, except that waiting for a shard another process prepares gives up once a
        shard failed: streaming leaves a failed shard marked as being prepared, and its blocking
        wait (a sample read before its shard was whole: a zstd shard counts as present) never
        looks at `_event`, so a worker waited there forever."""
        try:
            super().prepare_shard(shard_id, False)  # prepares it, or returns while another process does
            while blocking and self._shard_states[shard_id] == _ShardState.PREPARING:
                if self._event.is_set():
                    raise ShardUnavailable(self.unavailable_message())
                time.sleep(TICK)
                super().prepare_shard(shard_id, False)  # evicted meanwhile: this process fetches it again
        except ShardUnavailable:
            raise
        except Exception as error:  # each storage client and codec raises its own types
            self._note_failure(shard_id, error)
            raise

    def _note_failure(self, shard_id: int, error: Exception) -> None:
        stream = self.streams[self.stream_per_shard[shard_id]]
        raw, zipped = self.shards[shard_id].file_pairs[0]
        name = (zipped or raw).basename
        where = f"from {stream.remote}, cached in {stream.local}" if stream.remote else f"in {stream.local}"
        text = f"shard {name} {where}: {_error_name(error)}: {error}"
        with self._failure.get_lock():
            if not self._failure.value:  # the first failure is the cause; later ones follow from it
                self._failure.value = text.encode("utf-8", "replace")[:FAILURE_BYTES - 1]
        self._event.set()  # every worker of the rank stops, rather than wait for that shard

    def unavailable_message(self, detail: str | None = None) -> str:
        """What a shard failure means and what to check (`detail`: an error with no shard noted)."""
        cause = self._failure.value.decode("utf-8", "replace") or detail or "its error is logged above"
        return (f"streaming could not prepare a shard, so the data stops here rather than go on out of order: "
                f"{cause}. Check, for remote data, the network and the storage credentials (and that the shard "
                f"still exists there); that the cache's disk has free space (df -h); and, for a corrupt shard (a "
                f"decompression or checksum error), convert the source again with `python launchers/convert.py "
                f"<source> <mds dir>` or copy that shard again. Then resume the run from its last checkpoint.")

    def __iter__(self):
        if self._event.is_set():  # a shard failed in an earlier epoch: it is still unavailable
            raise ShardUnavailable(self.unavailable_message())
        iterator = None
        try:
            for sample in super().__iter__():
                if iterator is None:
                    iterator = self._iterator  # this epoch's, set once its first sample is on the way
                yield sample
        except Exception as error:
            if not self._event.is_set():
                raise
            # streaming's "Background thread failed", or the failing prepare itself
            raise ShardUnavailable(self.unavailable_message(f"{_error_name(error)}: {error}")) from error
        # streaming ends an iteration quietly when a shard failed; fewer samples than this worker's
        # share without a newer epoch having replaced this one mean the same.
        if self._event.is_set() or (iterator is not None and iterator is self._iterator
                                    and iterator.yield_index < iterator.total):
            raise ShardUnavailable(self.unavailable_message())

    # ---- one resume segment ---------------------------------------------------------------------
    def load_state_dict(self, obj: dict) -> None:
        """streaming's, rewriting the segment it made the first time: it made a new handle each
        call, each held open by an atexit hook until the process ends."""
        held = getattr(self, "_resume_shm", None)
        if held is None:
            super().load_state_dict(obj)
            return
        data = json.dumps(obj, sort_keys=True).encode("utf-8") + b"\0"  # streaming reads up to the NUL
        held.buf[:len(data)] = data

    def _resume(self, world, epoch: int) -> tuple[int, int]:
        """streaming's, reading the segment load_state_dict holds (inherited by forked workers)
        where streaming's opens it again, leaking the handle, at each epoch it iterates."""
        held = getattr(self, "_resume_shm", None)
        if held is None or not self.num_canonical_nodes:  # nothing loaded, or streaming's defaults to pick
            return super()._resume(world, epoch)
        raw = bytes(held.buf)
        state = json.loads(raw[:raw.index(b"\0")])
        sample_in_epoch = 0
        if state["epoch"] >= epoch:  # else stale: the epoch starts from its beginning, as in streaming's
            epoch, sample_in_epoch = state["epoch"], state["sample_in_epoch"]
            self.num_canonical_nodes, self.shuffle_seed = state["num_canonical_nodes"], state["shuffle_seed"]
            self.initial_physical_nodes = state.get("initial_physical_nodes")
        self._set_shuffle_block_size(world)
        return epoch, sample_in_epoch


def _error_name(error: Exception) -> str:
    """`zstd.Error`, not a bare `Error`; builtins by their name alone."""
    kind = type(error)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"
