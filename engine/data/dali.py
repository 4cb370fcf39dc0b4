"""The host side of the NVIDIA DALI pipelines that turn encoded image bytes into normalised CHW
float batches: the batches fed in, the placeholder for an image DALI cannot decode, and the
loop that runs a pipeline and recovers from such an image.

The graphs themselves are train_graph.py (training: each view's crop window decoded, resized,
augmented, normalised; on the CPU or the GPU) and cpu_pipeline.py (the CPU's training graph
cut around a torch resize, and the evaluation transform). They import DALI; this module does
not, so what needs only CLIP's mean and std or the formats DALI reads loads without it.

Exact resume needs every crop and augmentation to be a function of (seed, epoch, sample id,
view) alone, so they are drawn in Python (augment.py) and fed to DALI as per-sample inputs;
DALI's own random operators (whose draws depend on how many batches a pipeline has run) are
never used.
"""
from __future__ import annotations

import io
import logging
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from PIL import Image

from engine.data.augment import ViewBatch

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Formats DALI's image decoders read (PIL's names for them); anything else is replaced.
DALI_FORMATS = frozenset({"JPEG", "PNG", "TIFF", "BMP", "PPM", "JPEG2000", "WEBP"})


def _placeholder_png() -> bytes:
    """A small image of the CLIP mean colour: after normalisation it is all (near) zero.

    Why a placeholder rather than dropping or duplicating a sample: the batch must keep its
    size (ranks all-gather equal shapes for the contrastive loss), and a duplicate of another
    pair would add a false negative. A flat mean-colour image paired with its own caption is one
    uninformative pair among thousands. Any crop of a flat image resizes to the same flat
    image, so the batch is identical whether the image was caught early or after DALI failed.
    """
    colour = tuple(round(255 * m) for m in CLIP_MEAN)
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buffer, format="PNG")
    return buffer.getvalue()


PLACEHOLDER_PNG = np.frombuffer(_placeholder_png(), dtype=np.uint8)


def fully_decodable(encoded: np.ndarray) -> bool:
    """Decode with PIL: the slow check used only after DALI has rejected a batch."""
    try:
        with Image.open(io.BytesIO(encoded.tobytes())) as image:
            if image.format not in DALI_FORMATS:
                return False
            image.convert("RGB").load()
    except Exception:  # PIL raises many types for bad data: any failure means the bytes are unusable
        return False
    return True


@dataclass
class HostBatch:
    """One batch as it enters DALI, plus what travels beside it in order (tokens, ids, ...)."""

    encoded: list[np.ndarray]             # one uint8 array of encoded bytes per image
    payload: Any                          # returned untouched with the decoded images
    views: tuple[ViewBatch, ...] = ()     # training: each image view's crop windows and draws
    replaced: np.ndarray | None = None    # [B] bool: image swapped for the placeholder

    def __post_init__(self):
        if self.replaced is None:
            self.replaced = np.zeros(len(self.encoded), dtype=bool)

    def dali_inputs(self) -> tuple:
        return (self.encoded, *(inputs for view in self.views for inputs in view.dali_inputs()))

    def replace_undecodable(self) -> int:
        """Swap every image PIL cannot decode for the placeholder; return how many."""
        return self.replace([i for i, image in enumerate(self.encoded)
                             if not self.replaced[i] and not fully_decodable(image)])

    def replace(self, indices: list[int]) -> int:
        """Swap these images for the placeholder; return how many."""
        for i in indices:
            self.encoded[i] = PLACEHOLDER_PNG
            self.replaced[i] = True
        return len(indices)


class DecodedBatches:
    """Runs host batches through a DALI pipeline in order; yields (pipeline outputs, host batch).

    The pipeline pulls host batches itself and runs ahead (prefetch), so the batches it holds
    are kept in order here. An undecodable image makes DALI fail the whole pipeline; then the
    held batches get the slow PIL check, bad images are swapped for the placeholder, and a new
    pipeline replays them in the same order, so the result is as if the image had been
    replaced up front.
    """

    def __init__(self, host_batches: Iterator[HostBatch], build: Callable[[Callable[[], tuple]], Any],
                 device: torch.device):
        self._host_batches = host_batches
        self._build = build
        self._device = device
        self._held: deque[HostBatch] = deque()    # pulled by DALI, output not yet taken
        self._replay: deque[HostBatch] = deque()  # to feed again after a rebuild
        self._source_error: BaseException | None = None
        self._pipe = None

    def _pull(self) -> tuple:
        if self._replay:
            host = self._replay.popleft()
        else:
            try:
                host = next(self._host_batches)
            except StopIteration:  # the end of a finite source (eval) is not an error
                raise
            except Exception as error:  # re-raised by __next__: not a decoding failure
                self._source_error = error
                raise
        self._held.append(host)
        return host.dali_inputs()

    def __iter__(self) -> "DecodedBatches":
        return self

    def __next__(self) -> tuple[tuple[torch.Tensor, ...], HostBatch]:
        while True:
            if self._pipe is None:
                self._pipe = self._build(self._pull)
                self._pipe.build()
            try:
                outputs = self._pipe.run()
                break
            except StopIteration:
                self.close()
                raise
            except Exception as error:
                if self._source_error is not None:
                    raise self._source_error from error
                self._recover(error)
        return tuple(_to_torch(output, self._device) for output in outputs), self._held.popleft()

    def close(self) -> None:
        """Stop the source and free the pipeline now, not whenever the garbage collector runs.

        The pipeline and this object refer to each other (through the source callback), and
        a collector finalising the source's worker processes in arbitrary order can stall.
        """
        self._pipe = None
        close_source = getattr(self._host_batches, "close", None)
        if close_source is not None:
            close_source()

    def _recover(self, error: Exception) -> None:
        self._pipe = None  # failed for good: free it (on a GPU, its memory) before any trial pipeline
        replaced = sum(host.replace_undecodable() for host in self._held)
        if not replaced:
            # PIL read every image, yet the pipeline failed: its decoder (nvJPEG on the GPU) may
            # refuse a file PIL reads. Ask the pipeline itself which.
            replaced = sum(self._replace_what_the_pipeline_rejects(host) for host in self._held)
        if not replaced:
            raise error  # not an image DALI could not read: a real failure
        logger.warning("DALI failed on %d undecodable image(s); replaced them and rebuilt the pipeline", replaced)
        self._replay = deque([*self._held, *self._replay])
        self._held.clear()

    def _fails(self, host: HostBatch, keep: list[int] | set[int]) -> bool:
        """Whether a fresh pipeline fails on `host` with every image outside `keep` (and every
        one already replaced) swapped for the placeholder."""
        keep = set(keep)
        trial = [image if i in keep and not host.replaced[i] else PLACEHOLDER_PNG
                 for i, image in enumerate(host.encoded)]
        inputs = HostBatch(trial, None, host.views).dali_inputs()
        pipe = self._build(lambda: inputs)
        try:
            pipe.build()
            pipe.run()
        except Exception:  # DALI raises RuntimeError for a decode failure; any failure counts here
            return True
        finally:
            del pipe
        return False

    def _replace_what_the_pipeline_rejects(self, host: HostBatch) -> int:
        """Find, by halving, the images of `host` on which the pipeline fails, and replace them:
        about 2 log2(batch) pipeline runs per such image. A batch that fails with no image of
        its own (all placeholders) is not an image problem: nothing is replaced."""
        candidates = [i for i in range(len(host.encoded)) if not host.replaced[i]]
        if not candidates or self._fails(host, []) or not self._fails(host, candidates):
            return 0

        def rejected(indices: list[int]) -> list[int]:
            if len(indices) == 1:
                return indices
            half = len(indices) // 2
            return [bad for part in (indices[:half], indices[half:]) if self._fails(host, part)
                    for bad in rejected(part)]

        return host.replace(rejected(candidates))


def _to_torch(tensor_list, device: torch.device) -> torch.Tensor:
    # deferred: DALI takes about a second to import and this module is loaded without it (see
    # the module doc); a pipeline that produced `tensor_list` has loaded DALI already.
    from nvidia.dali.plugin.pytorch import feed_ndarray

    dense = tensor_list.as_tensor()
    out = torch.empty(dense.shape(), dtype=torch.float32, device=device)
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    feed_ndarray(dense, out, cuda_stream=stream)
    return out
