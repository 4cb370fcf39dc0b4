"""Top-k cosine neighbours in Triton (CUDA, or TRITON_INTERPRET=1): the [N, Q] matrix is never stored.

Each program owns BLOCK_M queries and one contiguous segment of the bank. It walks its
segment in tiles of BLOCK_N bank rows, computes the [BLOCK_M, BLOCK_N] similarities with
tl.dot over D in BLOCK_D slices (masked: any N, Q, D) and folds them into a running result:
- k = 1 (DeCLIP's case): running max and its index.
- 1 < k <= MAX_K: a running top-k set per query, held unsorted in [BLOCK_M, KP] registers.
  Each tile is drained best-first (max, then its lowest index, then masked out) while any
  query's best remaining value beats its set's worst entry, which it then replaces. A query
  gains at most k entries per tile, and after the first tiles usually none, so the loop
  mostly ends after one check.
The bank is split into segments so that even a few hundred queries fill the GPU; the
segments' results ([S, N, k], a few KB) are merged with torch, which also sorts each row.

Ties go to the lower bank index, as in the reference: within a tile the lowest index among
equal values is taken first, a candidate must be strictly better than the worst entry
(which always has a lower index when the values are equal), and the merge orders equal
values by index. Similarities accumulate in float32. Half inputs multiply exactly in their
tensor-core form. float32 inputs (and mixed ones, which meet in float32 as the reference
promotes them) use Triton's 3xTF32: tensor-core speed with products within a few float32
ulps, where IEEE products ran at half cuBLAS's speed on an H100 and plain TF32 (10-bit
mantissas) would rank differently from the reference. float64 is left to the other backends.
"""

import torch
import triton
import triton.language as tl

from kernels.knn import TRITON_MAX_K as MAX_K
from kernels.knn.reference import check_inputs
from kernels.triton_tiles import on_device

_DOT_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _similarity_tile(q_ptr, bank_ptr, rows, cols, N, Q, D,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     DOT: tl.constexpr, PRECISION: tl.constexpr):
    """[BLOCK_M, BLOCK_N] float32 dot products; columns past Q are -inf so they never win."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    q_rows = rows.to(tl.int64) * D
    bank_rows = cols.to(tl.int64) * D
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(q_ptr + q_rows[:, None] + dims[None, :],
                    mask=(rows < N)[:, None] & (dims < D)[None, :], other=0.0).to(DOT)
        # Loaded transposed ([BLOCK_D, BLOCK_N]) so tl.dot reads it as the right-hand operand.
        y = tl.load(bank_ptr + bank_rows[None, :] + dims[:, None],
                    mask=(cols < Q)[None, :] & (dims < D)[:, None], other=0.0).to(DOT)
        acc = tl.dot(x, y, acc, input_precision=PRECISION)
    return tl.where((cols < Q)[None, :], acc, float("-inf"))


@triton.jit
def _best_in_tile(sims, cols):
    """Each row's maximum and the lowest column holding it."""
    best = tl.max(sims, axis=1)
    where = tl.min(tl.where(sims == best[:, None], cols[None, :], 2**31 - 1), axis=1)
    return best, where


@triton.jit
def _top1_kernel(q_ptr, bank_ptr, values_ptr, indices_ptr, N, Q, D, tiles_per_segment,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 DOT: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    segment = tl.program_id(1)
    best = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    best_index = tl.full([BLOCK_M], 2**31 - 1, dtype=tl.int32)
    first = segment * tiles_per_segment
    for tile in range(first, tl.minimum(first + tiles_per_segment, tl.cdiv(Q, BLOCK_N))):
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        sims = _similarity_tile(q_ptr, bank_ptr, rows, cols, N, Q, D,
                                BLOCK_M, BLOCK_N, BLOCK_D, DOT, PRECISION)
        value, index = _best_in_tile(sims, cols)
        # Strictly better only: an equal value from this later tile has a higher index.
        better = value > best
        best = tl.where(better, value, best)
        best_index = tl.where(better, index, best_index)
    out = segment.to(tl.int64) * N + rows
    tl.store(values_ptr + out, best, mask=rows < N)
    tl.store(indices_ptr + out, best_index, mask=rows < N)


@triton.jit
def _worst_entry(kept, kept_index):
    """Mask of each row's worst kept entry: lowest value, and of those the highest index."""
    worst = tl.min(kept, axis=1)
    at_worst = kept == worst[:, None]
    worst_index = tl.max(tl.where(at_worst, kept_index, -1), axis=1)
    return worst, at_worst & (kept_index == worst_index[:, None])


@triton.jit
def _topk_kernel(q_ptr, bank_ptr, values_ptr, indices_ptr, N, Q, D, tiles_per_segment,
                 K: tl.constexpr, KP: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 DOT: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    segment = tl.program_id(1)
    slots = tl.arange(0, KP)
    # Empty slots hold -inf and distinct indices from 2**31 - 1 down, which sort after every
    # real index; slots past K (padding to a power of two) hold +inf: never worst, never replaced.
    kept = tl.where(slots[None, :] < K, float("-inf"), float("inf")) + tl.zeros([BLOCK_M, KP], tl.float32)
    kept_index = (2**31 - 1 - slots[None, :]) + tl.zeros([BLOCK_M, KP], tl.int32)
    first = segment * tiles_per_segment
    for tile in range(first, tl.minimum(first + tiles_per_segment, tl.cdiv(Q, BLOCK_N))):
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        sims = _similarity_tile(q_ptr, bank_ptr, rows, cols, N, Q, D,
                                BLOCK_M, BLOCK_N, BLOCK_D, DOT, PRECISION)
        worst, replace = _worst_entry(kept, kept_index)
        value, index = _best_in_tile(sims, cols)
        gains = value > worst
        while tl.max(gains.to(tl.int32), axis=0) > 0:
            replace = replace & gains[:, None]
            kept = tl.where(replace, value[:, None], kept)
            kept_index = tl.where(replace, index[:, None], kept_index)
            sims = tl.where(cols[None, :] == index[:, None], float("-inf"), sims)
            worst, replace = _worst_entry(kept, kept_index)
            value, index = _best_in_tile(sims, cols)
            gains = value > worst
    out = (segment.to(tl.int64) * N + rows[:, None]) * K + slots[None, :]
    store = (rows < N)[:, None] & (slots < K)[None, :]
    tl.store(values_ptr + out, kept, mask=store)
    tl.store(indices_ptr + out, kept_index, mask=store)


def _segments(row_blocks: int, tiles: int, device: torch.device) -> int:
    """Bank segments per query block: about four programs per streaming multiprocessor."""
    if device.type != "cuda":
        return 1
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(tiles, triton.cdiv(target, row_blocks)))


def _merge(values: torch.Tensor, indices: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[S, N, k] per-segment results -> [N, k], descending, equal values by lower index."""
    n = values.shape[1]
    values = values.permute(1, 0, 2).reshape(n, -1)
    indices = indices.permute(1, 0, 2).reshape(n, -1).long()
    # Sorting by index first makes the stable value sort break ties by index.
    indices, order = indices.sort(dim=1)
    values, order = values.gather(1, order).sort(dim=1, descending=True, stable=True)
    return values[:, :k], indices.gather(1, order)[:, :k]


@torch.no_grad()
def nearest_neighbors(q: torch.Tensor, bank: torch.Tensor, k: int = 1,
                      segments: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's (values [N, k] float32, indices [N, k] int64) from the kernels above.

    segments: bank segments per query block; by default enough to fill the GPU (1 off it).
    """
    check_inputs(q, bank, k)
    if k > MAX_K:
        raise ValueError(f"the Triton nearest-neighbour kernel keeps at most k={MAX_K} per query; "
                         f"got k={k}: use backend='chunked'")
    if q.dtype not in _DOT_DTYPE or bank.dtype not in _DOT_DTYPE:
        raise ValueError(f"the Triton nearest-neighbour kernel takes float16, bfloat16 or float32; "
                         f"got {q.dtype} and {bank.dtype}: use backend='chunked'")
    if q.device != bank.device:
        raise ValueError(f"q and bank must be on the same device; got {q.device} and {bank.device}")
    if bank.shape[0] > 2**31 - 1 - MAX_K:
        # Indices are int32 in the kernels, and the top values mark empty top-k slots.
        raise ValueError(f"the Triton kernel indexes banks of fewer than 2**31 - {MAX_K} rows; "
                         f"got {bank.shape[0]}: use backend='chunked'")
    q, bank = q.contiguous(), bank.contiguous()
    n, d = q.shape
    size = bank.shape[0]
    # Mixed precisions meet in float32, as the reference promotes them. The interpreter
    # multiplies bfloat16 tiles as raw 16-bit integers, so there they meet in float32 too
    # (bfloat16 products are exact in float32: the same similarities).
    same = q.dtype == bank.dtype and not (INTERPRETED and q.dtype == torch.bfloat16)
    dot = _DOT_DTYPE[q.dtype] if same else tl.float32
    options = dict(DOT=dot, PRECISION="tf32x3" if dot == tl.float32 else "ieee")
    block_m, block_n = (64, 128) if k == 1 else (64, 64)
    block_d = max(16, min(64, triton.next_power_of_2(d)))
    row_blocks, tiles = triton.cdiv(n, block_m), triton.cdiv(size, block_n)
    segments = min(tiles, segments or _segments(row_blocks, tiles, q.device))
    tiles_per_segment = triton.cdiv(tiles, segments)
    segments = triton.cdiv(tiles, tiles_per_segment)  # none left empty
    values = torch.empty(segments, n, k, dtype=torch.float32, device=q.device)
    indices = torch.empty(segments, n, k, dtype=torch.int32, device=q.device)
    grid = (row_blocks, segments)
    context = on_device(q)
    with context:
        if k == 1:
            _top1_kernel[grid](q, bank, values, indices, n, size, d, tiles_per_segment,
                               BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, **options)
        else:
            _topk_kernel[grid](q, bank, values, indices, n, size, d, tiles_per_segment,
                               K=k, KP=triton.next_power_of_2(k),
                               BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, **options)
    return _merge(values, indices, k)


# Triton decides when a kernel is decorated whether it is compiled or interpreted.
INTERPRETED = not isinstance(_top1_kernel, triton.runtime.JITFunction)
