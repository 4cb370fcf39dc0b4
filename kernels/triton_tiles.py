"""What the tiled Triton losses share (kernels/contrastive/triton.py, kernels/siglip/triton.py):
the tile product of a[rows] and b[cols], its precision options, and the tile shapes.

Imported only by those Triton modules, so a machine without Triton never imports it.
"""
import contextlib
from typing import NamedTuple

import torch
import triton
import triton.language as tl

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def mma(x, y, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + x @ y. UPCAST is for the interpreter, which multiplies bf16 tiles as their raw
    uint16 bits (triton-lang/triton#11584; its docs: no bf16 arithmetic); bf16 -> fp32 is
    exact, so the products and fp32 sums are what the GPU computes."""
    if UPCAST:
        x = x.to(tl.float32)
        y = y.to(tl.float32)
    return tl.dot(x, y, acc, input_precision=PRECISION)


@triton.jit
def tile_dots(A, B, rows, cols, n_rows, n_cols, D, stride_a, stride_b,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_N] tile of a[rows] . b[cols], zero outside the matrices."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        a = tl.load(A + rows[:, None] * stride_a + dims[None, :],
                    mask=(rows[:, None] < n_rows) & (dims[None, :] < D), other=0.0)
        b = tl.load(B + cols[:, None] * stride_b + dims[None, :],
                    mask=(cols[:, None] < n_cols) & (dims[None, :] < D), other=0.0)
        acc = mma(a, tl.trans(b), acc, PRECISION, UPCAST)
    return acc


class Blocks(NamedTuple):
    m: int      # rows per tile
    n: int      # columns per tile
    d: int      # embedding dimensions per step of the tile's product
    out: int    # gradient dimensions per program: D / out programs recompute the same tiles
    warps: int
    stages: int


def blocks(D: int, backward: bool, interpreted: bool) -> Blocks:
    if interpreted:
        # Small tiles so small test shapes still cross tile edges and split the gradient.
        return Blocks(16, 16, 64, 128, 1, 1)
    # Measured for InfoNCE on an H100 (bf16, B = 16384, D = 512) among a few shapes: the
    # forward's best reached 288 TFLOP/s; in backward one program accumulates a [64, 256] slice
    # of the gradient (a [64, 512] one, 8 warps, ran 12% slower than splitting D = 512 over 2
    # programs that each recompute the tiles). SigLIP's tiles are the same products, not re-measured.
    if not backward:
        return Blocks(64, 128, 64, 0, 4, 3)
    return Blocks(64, 64, 64, min(256, max(16, triton.next_power_of_2(D))), 4, 3)


def dot_options(dtype: torch.dtype, interpreted: bool) -> dict:
    # fp32 operands: TF32 where torch's matmul would use it, else three TF32 products
    # (Triton's "tf32x3", about fp32's accuracy): plain fp32 ("ieee") ran at 6-21 TFLOP/s on
    # an H100, a tenth of its TF32 rate. Half types ignore the option.
    tf32 = torch.backends.cuda.matmul.allow_tf32
    return dict(PRECISION="tf32" if tf32 else "tf32x3", UPCAST=interpreted and dtype == torch.bfloat16)


def on_device(tensor: torch.Tensor):
    """Triton launches on the current CUDA device; a rank's tensors may live on another one."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()
