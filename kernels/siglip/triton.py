"""SigLIP's sigmoid loss as Triton kernels: the CUDA fast path.

Same function and results as `reference.py`, without ever storing the [n, N] logits.
Forward: one program per block of rows walks the column tiles and sums each row's
-log sigmoid(l z) terms (a stable softplus); the per-row sums come back and torch adds
them, so the loss is deterministic. Backward recomputes each tile from the embeddings in two
kernels, one that owns a block of rows (the image gradient, and each row's share of the
scale's and the bias's gradients) and one that owns a block of columns (the text gradient), so
every gradient is written by exactly one program: no atomics. d/dz of -log sigmoid(l z) is
sigmoid(z) on a negative and -sigmoid(-z) on a positive, each computed directly in fp32.
Products accumulate in fp32; inputs may be fp16, bf16 or fp32, gradients come back in the
inputs' dtypes and the loss in fp32.

fp32 inputs multiply in TF32 only when torch.backends.cuda.matmul.allow_tf32 is set, as
torch's own matmul; otherwise in three TF32 products per product (about fp32's accuracy).
Under TRITON_INTERPRET=1 (set before triton is imported) the kernels run on CPU tensors
through NumPy: slow, for tests only. The tile product and shapes are shared with InfoNCE's
kernels (kernels/triton_tiles.py), measured there on an H100; not re-measured for this loss.
"""
import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from kernels.siglip.reference import check_inputs
from kernels.triton_tiles import DTYPES, blocks as tile_blocks, dot_options, mma, on_device, tile_dots


@triton.jit
def _softplus(x):
    """log(1 + e^x) = max(x, 0) + log1p(e^-|x|). Triton has no portable log1p, and log(1 + t)
    is off by up to a float epsilon absolute when t is small (every negative pair at the
    start, t ~ e^-10); Kahan's log(u) * t / (u - 1), u = 1 + t, keeps the tail's relative
    accuracy (as kernels/jsd/triton.py)."""
    t = tl.exp(-tl.abs(x))
    u = 1.0 + t
    # The denominator kept off zero where the other branch is taken (no 0/0 computed at all).
    log1p = tl.where(u == 1.0, t, tl.log(u) * (t / tl.where(u == 1.0, 1.0, u - 1.0)))
    return tl.maximum(x, 0.0) + log1p


@triton.jit
def _loss_kernel(A, B, SCALE, BIAS, ROW_LOSS, n_rows, n_cols, D, offset, stride_a, stride_b,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """ROW_LOSS[i] = sum_j -log sigmoid(l_ij z_ij) = sum_j softplus(-l_ij z_ij) for this
    program's block of rows."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    scale = tl.load(SCALE)
    bias = tl.load(BIAS)
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    for c0 in range(0, n_cols, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        z = scale * tile_dots(A, B, rows, cols, n_rows, n_cols, D, stride_a, stride_b,
                          BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, UPCAST) + bias
        minus_lz = tl.where(cols[None, :] == rows[:, None] + offset, -z, z)
        total += tl.sum(tl.where(cols[None, :] < n_cols, _softplus(minus_lz), 0.0), 1)
    tl.store(ROW_LOSS + rows, total, mask=rows < n_rows)


@triton.jit
def _grad_tile(dots, scale, bias, rows, cols, n_rows, n_cols, offset):
    """d(loss terms)/dz of one tile, before the 1/n weight: sigmoid(z) on the negatives,
    -sigmoid(-z) on the positives (i, offset + i), zero outside the matrices."""
    z = scale * dots + bias
    grad = tl.where(cols[None, :] == rows[:, None] + offset, -tl.sigmoid(-z), tl.sigmoid(z))
    return tl.where((rows[:, None] < n_rows) & (cols[None, :] < n_cols), grad, 0.0)


@triton.jit
def _grad_rows_kernel(A, B, SCALE, BIAS, COEF, DA, DSCALE, DBIAS,
                      n_rows, n_cols, D, offset, stride_a, stride_b, stride_da,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_OUT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """DA[rows, out_dims] = COEF * sum_j grad_ij b_j[out_dims]; DSCALE[i] = sum_j grad_ij a_i . b_j;
    DBIAS[i] = sum_j grad_ij."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    out_dims = tl.program_id(1) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    scale = tl.load(SCALE)
    bias = tl.load(BIAS)
    acc = tl.zeros([BLOCK_M, BLOCK_OUT], dtype=tl.float32)
    dscale = tl.zeros([BLOCK_M], dtype=tl.float32)
    dbias = tl.zeros([BLOCK_M], dtype=tl.float32)
    for c0 in range(0, n_cols, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        dots = tile_dots(A, B, rows, cols, n_rows, n_cols, D, stride_a, stride_b,
                     BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, UPCAST)
        grad = _grad_tile(dots, scale, bias, rows, cols, n_rows, n_cols, offset)
        # From the fp32 tile: the scale's and the bias's gradients are sums in which the
        # positives (about -1 each at the start) and the many small negatives cancel.
        dscale += tl.sum(grad * dots, 1)
        dbias += tl.sum(grad, 1)
        b = tl.load(B + cols[:, None] * stride_b + out_dims[None, :],
                    mask=(cols[:, None] < n_cols) & (out_dims[None, :] < D), other=0.0)
        # grad lies in [-1, 1]: safe to round to fp16/bf16 for the tensor cores.
        acc = mma(grad.to(b.dtype), b, acc, PRECISION, UPCAST)
    acc *= tl.load(COEF)
    tl.store(DA + rows[:, None] * stride_da + out_dims[None, :], acc.to(DA.dtype.element_ty),
             mask=(rows[:, None] < n_rows) & (out_dims[None, :] < D))
    # Every output slice recomputes the same tiles; the first alone reports the scalars' shares.
    first = (rows < n_rows) & (tl.program_id(1) == 0)
    tl.store(DSCALE + rows, dscale, mask=first)
    tl.store(DBIAS + rows, dbias, mask=first)


@triton.jit
def _grad_cols_kernel(A, B, SCALE, BIAS, COEF, DB,
                      n_rows, n_cols, D, offset, stride_a, stride_b, stride_db,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_OUT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """DB[cols, out_dims] = COEF * sum_i grad_ij a_i[out_dims]."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    out_dims = tl.program_id(1) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    scale = tl.load(SCALE)
    bias = tl.load(BIAS)
    acc = tl.zeros([BLOCK_N, BLOCK_OUT], dtype=tl.float32)
    for r0 in range(0, n_rows, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        dots = tile_dots(A, B, rows, cols, n_rows, n_cols, D, stride_a, stride_b,
                     BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, UPCAST)
        grad = _grad_tile(dots, scale, bias, rows, cols, n_rows, n_cols, offset)
        a = tl.load(A + rows[:, None] * stride_a + out_dims[None, :],
                    mask=(rows[:, None] < n_rows) & (out_dims[None, :] < D), other=0.0)
        acc = mma(tl.trans(grad.to(a.dtype)), a, acc, PRECISION, UPCAST)
    acc *= tl.load(COEF)
    tl.store(DB + cols[:, None] * stride_db + out_dims[None, :], acc.to(DB.dtype.element_ty),
             mask=(cols[:, None] < n_cols) & (out_dims[None, :] < D))


# How Triton built the kernels (it decides at decoration time, from TRITON_INTERPRET).
INTERPRETED = isinstance(_loss_kernel, InterpretedFunction)


class _TritonLoss(torch.autograd.Function):
    """As chunked._TiledLoss: forward keeps only the inputs, backward recomputes the tiles."""

    @staticmethod
    def forward(ctx, a_local, b_all, scale, bias, offset):
        a, b = a_local.contiguous(), b_all.contiguous()
        s, c = (x.detach().to(device=a.device, dtype=torch.float32).contiguous() for x in (scale, bias))
        (n, D), N = a.shape, b.shape[0]
        blocks = tile_blocks(D, False, INTERPRETED)
        row_loss = torch.empty(n, device=a.device, dtype=torch.float32)
        with on_device(a):
            _loss_kernel[(triton.cdiv(n, blocks.m),)](
                a, b, s, c, row_loss, n, N, D, offset, a.stride(0), b.stride(0),
                BLOCK_M=blocks.m, BLOCK_N=blocks.n, BLOCK_D=blocks.d, **dot_options(a.dtype, INTERPRETED),
                num_warps=blocks.warps, num_stages=blocks.stages)
        ctx.save_for_backward(a, b, scale, bias)
        ctx.offset = offset
        return row_loss.sum() / n

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        a, b, scale, bias = ctx.saved_tensors
        s, c = (x.detach().to(device=a.device, dtype=torch.float32).contiguous() for x in (scale, bias))
        (n, D), N = a.shape, b.shape[0]
        weight = grad_loss.to(device=a.device, dtype=torch.float32) / n
        coef = (weight * s).contiguous()
        blocks = tile_blocks(D, True, INTERPRETED)
        splits = triton.cdiv(D, blocks.out)
        da, db = torch.empty_like(a), torch.empty_like(b)
        dscale = torch.empty(n, device=a.device, dtype=torch.float32)
        dbias = torch.empty(n, device=a.device, dtype=torch.float32)
        common = dict(BLOCK_M=blocks.m, BLOCK_N=blocks.n, BLOCK_D=blocks.d, BLOCK_OUT=blocks.out,
                      **dot_options(a.dtype, INTERPRETED), num_warps=blocks.warps, num_stages=blocks.stages)
        with on_device(a):
            _grad_rows_kernel[(triton.cdiv(n, blocks.m), splits)](
                a, b, s, c, coef, da, dscale, dbias, n, N, D, ctx.offset,
                a.stride(0), b.stride(0), da.stride(0), **common)
            _grad_cols_kernel[(triton.cdiv(N, blocks.n), splits)](
                a, b, s, c, coef, db, n, N, D, ctx.offset,
                a.stride(0), b.stride(0), db.stride(0), **common)
        dscale = (dscale.sum() * weight).to(device=scale.device, dtype=scale.dtype)
        dbias = (dbias.sum() * weight).to(device=bias.device, dtype=bias.dtype)
        return da, db, dscale, dbias, None


def siglip_loss_local(a_local: torch.Tensor, b_all: torch.Tensor, offset: int,
                      scale, bias) -> torch.Tensor:
    """`reference.siglip_loss_local` as Triton kernels; a fp32 0-dim loss."""
    scale, bias = check_inputs(a_local, b_all, offset, scale, bias)
    if a_local.dtype not in DTYPES:
        raise ValueError(f"the Triton path takes {DTYPES}, got {a_local.dtype}; "
                         f"use backend='chunked' for it")
    return _TritonLoss.apply(a_local, b_all, scale, bias, int(offset))


def siglip_loss(a: torch.Tensor, b: torch.Tensor, scale, bias) -> torch.Tensor:
    """`reference.siglip_loss` as Triton kernels."""
    return siglip_loss_local(a, b, 0, scale, bias)
