"""Evaluation split over the ranks: each rank decodes and encodes one contiguous block of a
set's items, and the embeddings are all-gathered, so that every rank ends with the whole
matrices, in the set's order, and computes the same metrics as one process would.

Blocks: with N items over W ranks, every block is b = ceil(N / W) items long and rank r takes
items [r*b, min(N, (r+1)*b)); the last blocks are shorter, or empty when N is small.

Forwards in step. ZeRO-3 gathers parameters inside every forward, so every rank must run the
same number of forwards (encode_image / encode_text), in the same order, whatever its block
holds: a shorter block, or records left out as unfit (a rank's whole block can be bad). So
each rank encodes its rows padded to the common block length b, in forwards of the same
lengths on every rank, and the padding's rows are dropped. The stop agreement asked before
each forward (`interrupted`, a collective) is then asked the same number of times too.

Gathers carry each row's index in the set (-1 for padding) with the embeddings: what a rank
left out is left out of the gathered result, and the rest keeps the set's order.

One rank, or torch.distributed not initialised (launchers/evaluate.py, unit tests): no
padding and no collective; the forwards are those one process always ran.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as torch_dist

from engine import dist
from engine.errors import EvaluationInterrupted

BATCH = 256   # the most rows one evaluation forward takes


@dataclass(frozen=True)
class Ranks:
    """The ranks an evaluation is split over, and this process's place among them."""
    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> Ranks:
        """The process group torch.distributed (DeepSpeed) initialised; one rank without one."""
        return cls(dist.rank(), dist.world_size())

    @property
    def alone(self) -> bool:
        return self.world == 1

    def block_length(self, count: int) -> int:
        """b = ceil(count / world): every rank's block padded to this many rows."""
        return -(-count // self.world)

    def block(self, count: int) -> range:
        """This rank's items of a set of `count`: [rank*b, min(count, (rank+1)*b))."""
        length = self.block_length(count)
        return range(min(count, self.rank * length), min(count, (self.rank + 1) * length))

    def padded_rows(self, count: int) -> int | None:
        """The rows each rank encodes for a set of `count` items: b with peers to keep in step,
        None alone (the rows the rank has, no padding)."""
        return None if self.alone else self.block_length(count)


ALONE = Ranks()


def _windows(chunks: Iterable[torch.Tensor], window: int) -> Iterator[torch.Tensor]:
    """The rows of `chunks` re-cut into pieces of `window` rows, the last one shorter. Views
    where a piece lies in one chunk: an in-memory set is not copied."""
    held: list[torch.Tensor] = []
    count = 0
    for chunk in chunks:
        while len(chunk):
            take = min(window - count, len(chunk))
            held.append(chunk[:take])
            count += take
            chunk = chunk[take:]
            if count == window:
                yield held[0] if len(held) == 1 else torch.cat(held)
                held, count = [], 0
    if count:
        yield held[0] if len(held) == 1 else torch.cat(held)


@torch.no_grad()
def encode_in_step(encode: Callable[[torch.Tensor], torch.Tensor], chunks: Iterable[torch.Tensor], *,
                   rows: int | None, window: int, filler: Callable[[], torch.Tensor], device,
                   interrupted: Callable[[], bool] | None) -> torch.Tensor:
    """`encode` of the rows `chunks` streams (at most `rows`), as float on `device`.

    rows None (one rank): forwards of `window` rows over the stream, the last one shorter.
    Else exactly ceil(rows / window) forwards, the j-th of min(window, rows - j*window) rows on
    every rank: the stream's rows first, then copies of `filler()` (one row), whose outputs are
    dropped. `interrupted` is asked before each forward; a yes raises EvaluationInterrupted."""
    def forward(batch: torch.Tensor) -> torch.Tensor:
        if interrupted is not None and interrupted():
            raise EvaluationInterrupted
        return encode(batch.to(device)).float()

    pieces = _windows(chunks, window)
    outputs: list[torch.Tensor] = []
    if rows is None:
        outputs = [forward(piece) for piece in pieces]
    else:
        pad_row = None
        for start in range(0, rows, window):
            size = min(window, rows - start)
            piece = next(pieces, None)
            real = 0 if piece is None else len(piece)
            if real > size:
                raise ValueError(f"more rows to encode than the {rows} of a block")
            if real < size:
                pad_row = filler() if pad_row is None else pad_row
                padding = pad_row.expand(size - real, *pad_row.shape[1:])
                piece = padding if piece is None else torch.cat([piece, padding.to(piece.dtype)])
            outputs.append(forward(piece)[:real])
        if next(pieces, None) is not None:
            raise ValueError(f"more rows to encode than the {rows} of a block")
    return torch.cat(outputs) if outputs else torch.empty(0, device=device)


def _all_gather(tensor: torch.Tensor, world: int) -> torch.Tensor:
    parts = [torch.empty_like(tensor) for _ in range(world)]
    torch_dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def gather_kept(parts: list[torch.Tensor], ids: torch.Tensor, rows: int | None, ranks: Ranks,
                device) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every rank's rows of `parts` (each [n, ...], row i being item `ids[i]` of the set, n <=
    `rows`), concatenated in rank order: the set's order, without what any rank left out.
    Returns the gathered parts and ids, on the CPU.

    A collective on the process group: padded to `rows` on `device` (NCCL gathers CUDA
    tensors only). Alone (rows None): `parts` as they are."""
    if rows is None:
        return [part.cpu() for part in parts], ids.cpu()
    if rows == 0:  # an empty set: nothing on any rank
        return [part.cpu() for part in parts], ids.cpu()

    def padded(tensor: torch.Tensor, fill) -> torch.Tensor:
        out = torch.full((rows, *tensor.shape[1:]), fill, dtype=tensor.dtype, device=device)
        out[:len(tensor)] = tensor.to(device)
        return out

    gathered_ids = _all_gather(padded(ids.long(), -1), ranks.world)
    kept = gathered_ids >= 0
    gathered = [_all_gather(padded(part, 0), ranks.world)[kept].cpu() for part in parts]
    return gathered, gathered_ids[kept].cpu()


@torch.no_grad()
def encode_texts(encode: Callable[[torch.Tensor], torch.Tensor], texts: list[str],
                 tokens: Callable[[list[str]], torch.Tensor], ranks: Ranks, device,
                 interrupted: Callable[[], bool] | None) -> torch.Tensor:
    """The embeddings of `texts` (listed alike on every rank: zero-shot prompts, a Karpathy
    file's captions), in order, on the CPU: each rank tokenizes and encodes its block."""
    block = ranks.block(len(texts))
    rows = ranks.padded_rows(len(texts))
    mine = [tokens(texts[block.start:block.stop])] if len(block) else []
    encoded = encode_in_step(encode, mine, rows=rows, window=BATCH, filler=lambda: tokens([""]),
                             device=device, interrupted=interrupted)
    [gathered], _ = gather_kept([encoded], torch.arange(block.start, block.stop), rows, ranks, device)
    return gathered


def gather_objects(value, ranks: Ranks) -> list:
    """Every rank's `value` (small, picklable), in rank order; [value] alone."""
    if ranks.alone:
        return [value]
    values = [None] * ranks.world
    torch_dist.all_gather_object(values, value)
    return values


def first_rows(rows: torch.Tensor, texts: list[str], count: int, ranks: Ranks,
               device) -> tuple[torch.Tensor, list[str]]:
    """The first `count` rows of a split set with their texts (a fixed probe batch), the same on
    every rank, on the CPU. Rank 0's block holds them unless it has fewer (a small set over many
    ranks, or records left out): then the next blocks' holders broadcast theirs in turn.
    `rows` and `texts`: this rank's, in the set's order."""
    if ranks.alone:
        return rows[:count], texts[:count]
    held = _all_gather(torch.tensor([len(rows)], device=device), ranks.world).tolist()
    images, captions = [], []
    for source, available in enumerate(held):
        take = min(count - len(captions), available)
        if take <= 0:
            continue
        mine = ranks.rank == source
        part = (rows[:take].to(device) if mine
                else torch.empty((take, *rows.shape[1:]), dtype=rows.dtype, device=device))
        torch_dist.broadcast(part, src=source)
        box = [texts[:take] if mine else None]
        torch_dist.broadcast_object_list(box, src=source)
        images.append(part.cpu())
        captions.extend(box[0])
    return (torch.cat(images) if images else rows[:0]), captions
