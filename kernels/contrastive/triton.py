"""Symmetric InfoNCE as Triton kernels: the CUDA fast path.

Same functions and results as `reference.py`, without ever storing the [rows, columns]
logits. Forward: one program per block of rows walks the column tiles keeping an online
log-sum-exp (FlashAttention's running max and rescaled sum, Dao et al. 2022), once per
direction. Backward recomputes each tile from the embeddings in two kernels, one that owns
a block of rows (their gradient) and one that owns a block of columns, so every gradient is
written by exactly one program: no atomics, deterministic results. The label is subtracted
inside the tile, so "softmax minus one-hot" cancels in fp32 before the product with the
embeddings. Products accumulate in fp32; inputs may be fp16, bf16 or fp32, gradients come
back in the inputs' dtype and the loss in fp32.

fp32 inputs multiply in TF32 only when torch.backends.cuda.matmul.allow_tf32 is set, as
torch's own matmul; otherwise in three TF32 products per product (about fp32's accuracy).
Under TRITON_INTERPRET=1 (set before triton is imported) the kernels run on CPU tensors
through NumPy: slow, for tests only. The tile product and shapes: kernels/triton_tiles.py.
"""
import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from kernels.contrastive.chunked import check_inputs
from kernels.triton_tiles import DTYPES, blocks as tile_blocks, dot_options, mma, on_device, tile_dots


@triton.jit
def _lse_kernel(Q, K, SCALE, LSE, n_rows, n_cols, D, stride_q, stride_k,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """LSE[i] = log sum_j exp(scale * q_i . k_j) for this program's block of rows."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    scale = tl.load(SCALE)
    run_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    for c0 in range(0, n_cols, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        logits = scale * tile_dots(Q, K, rows, cols, n_rows, n_cols, D, stride_q, stride_k,
                               BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, UPCAST)
        logits = tl.where(cols[None, :] < n_cols, logits, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(logits, 1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), 1)
        run_max = new_max
    tl.store(LSE + rows, run_max + tl.log(run_sum), mask=rows < n_rows)


@triton.jit
def _softmax_minus_labels(dots, scale, rows, cols, lse_row, lse_col, n_rows, n_cols, offset,
                          SYMMETRIC: tl.constexpr):
    """d(loss terms)/d(logits) of one tile, before the 1/(2n) weight: the row softmax minus
    the label (i, offset + i); in the symmetric case plus the column softmax minus its label."""
    logits = scale * dots
    grad = tl.exp(logits - lse_row[:, None])
    labels = 1.0
    if SYMMETRIC:
        grad += tl.exp(logits - lse_col[None, :])
        labels = 2.0
    grad = tl.where(cols[None, :] == rows[:, None] + offset, grad - labels, grad)
    return tl.where((rows[:, None] < n_rows) & (cols[None, :] < n_cols), grad, 0.0)


@triton.jit
def _grad_rows_kernel(Q, K, SCALE, COEF, LSE_ROW, LSE_COL, DQ, DSCALE,
                      n_rows, n_cols, D, offset, stride_q, stride_k, stride_dq,
                      SYMMETRIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_OUT: tl.constexpr, PRECISION: tl.constexpr,
                      UPCAST: tl.constexpr):
    """DQ[rows, out_dims] = COEF * sum_j grad_ij k_j[out_dims]; DSCALE[i] = sum_j grad_ij q_i . k_j."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    out_dims = tl.program_id(1) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    scale = tl.load(SCALE)
    lse_row = tl.load(LSE_ROW + rows, mask=rows < n_rows, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_OUT], dtype=tl.float32)
    dscale = tl.zeros([BLOCK_M], dtype=tl.float32)
    for c0 in range(0, n_cols, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        lse_col = tl.zeros([BLOCK_N], dtype=tl.float32)
        if SYMMETRIC:
            lse_col = tl.load(LSE_COL + cols, mask=cols < n_cols, other=0.0)
        dots = tile_dots(Q, K, rows, cols, n_rows, n_cols, D, stride_q, stride_k,
                     BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, UPCAST)
        grad = _softmax_minus_labels(dots, scale, rows, cols, lse_row, lse_col,
                                     n_rows, n_cols, offset, SYMMETRIC)
        # From the fp32 tile: q . (grad @ k) would carry grad's rounding to half precision,
        # and the scale's gradient is a sum that cancels.
        dscale += tl.sum(grad * dots, 1)
        k = tl.load(K + cols[:, None] * stride_k + out_dims[None, :],
                    mask=(cols[:, None] < n_cols) & (out_dims[None, :] < D), other=0.0)
        # grad lies in [-2, 1]: safe to round to fp16/bf16 for the tensor cores.
        acc = mma(grad.to(k.dtype), k, acc, PRECISION, UPCAST)
    acc *= tl.load(COEF)
    tl.store(DQ + rows[:, None] * stride_dq + out_dims[None, :], acc.to(DQ.dtype.element_ty),
             mask=(rows[:, None] < n_rows) & (out_dims[None, :] < D))
    # Every output slice recomputes the same tiles; the first alone reports the scale's share.
    tl.store(DSCALE + rows, dscale, mask=(rows < n_rows) & (tl.program_id(1) == 0))


@triton.jit
def _grad_cols_kernel(Q, K, SCALE, COEF, LSE_ROW, LSE_COL, DK,
                      n_rows, n_cols, D, offset, stride_q, stride_k, stride_dk,
                      SYMMETRIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_OUT: tl.constexpr, PRECISION: tl.constexpr,
                      UPCAST: tl.constexpr):
    """DK[cols, out_dims] = COEF * sum_i grad_ij q_i."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    out_dims = tl.program_id(1) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    scale = tl.load(SCALE)
    lse_col = tl.zeros([BLOCK_N], dtype=tl.float32)
    if SYMMETRIC:
        lse_col = tl.load(LSE_COL + cols, mask=cols < n_cols, other=0.0)
    acc = tl.zeros([BLOCK_N, BLOCK_OUT], dtype=tl.float32)
    for r0 in range(0, n_rows, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        lse_row = tl.load(LSE_ROW + rows, mask=rows < n_rows, other=0.0)
        dots = tile_dots(Q, K, rows, cols, n_rows, n_cols, D, stride_q, stride_k,
                     BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, UPCAST)
        grad = _softmax_minus_labels(dots, scale, rows, cols, lse_row, lse_col,
                                     n_rows, n_cols, offset, SYMMETRIC)
        q = tl.load(Q + rows[:, None] * stride_q + out_dims[None, :],
                    mask=(rows[:, None] < n_rows) & (out_dims[None, :] < D), other=0.0)
        acc = mma(tl.trans(grad.to(q.dtype)), q, acc, PRECISION, UPCAST)
    acc *= tl.load(COEF)
    tl.store(DK + cols[:, None] * stride_dk + out_dims[None, :], acc.to(DK.dtype.element_ty),
             mask=(cols[:, None] < n_cols) & (out_dims[None, :] < D))


# How Triton built the kernels (it decides at decoration time, from TRITON_INTERPRET).
INTERPRETED = isinstance(_lse_kernel, InterpretedFunction)


def _lse(q, k, scale):
    n, D = q.shape
    lse = torch.empty(n, device=q.device, dtype=torch.float32)
    blocks = tile_blocks(D, False, INTERPRETED)
    with on_device(q):
        _lse_kernel[(triton.cdiv(n, blocks.m),)](
            q, k, scale, lse, n, k.shape[0], D, q.stride(0), k.stride(0),
            BLOCK_M=blocks.m, BLOCK_N=blocks.n, BLOCK_D=blocks.d, **dot_options(q.dtype, INTERPRETED),
            num_warps=blocks.warps, num_stages=blocks.stages)
    return lse


def _grads(q, k, scale, coef, lse_row, lse_col, offset):
    """(dq, dk, dscale / weight) of the loss terms of logits scale * q @ k.T: the row
    log-sum-exps minus the labels (i, offset + i), plus the columns' when lse_col is given."""
    (n, D), N = q.shape, k.shape[0]
    blocks = tile_blocks(D, True, INTERPRETED)
    symmetric = lse_col is not None
    lse_col = lse_row if lse_col is None else lse_col
    splits = triton.cdiv(D, blocks.out)
    dq, dk = torch.empty_like(q), torch.empty_like(k)
    dscale = torch.empty(n, device=q.device, dtype=torch.float32)
    common = dict(SYMMETRIC=symmetric, BLOCK_M=blocks.m, BLOCK_N=blocks.n, BLOCK_D=blocks.d,
                  BLOCK_OUT=blocks.out, **dot_options(q.dtype, INTERPRETED),
                  num_warps=blocks.warps, num_stages=blocks.stages)
    with on_device(q):
        _grad_rows_kernel[(triton.cdiv(n, blocks.m), splits)](
            q, k, scale, coef, lse_row, lse_col, dq, dscale, n, N, D, offset,
            q.stride(0), k.stride(0), dq.stride(0), **common)
        _grad_cols_kernel[(triton.cdiv(N, blocks.n), splits)](
            q, k, scale, coef, lse_row, lse_col, dk, n, N, D, offset,
            q.stride(0), k.stride(0), dk.stride(0), **common)
    return dq, dk, dscale.sum()


def matmul_flops(rows: int, columns: int, D: int, symmetric: bool) -> int:
    """Multiply-add FLOPs of one forward + backward as these kernels run it (for benchmarks):
    forward, one tile product per direction; backward, per pass, each kernel recomputes the
    tiles once per output split and multiplies them into the embeddings once."""
    tile = 2 * rows * columns * D
    splits = triton.cdiv(D, tile_blocks(D, True, INTERPRETED).out)
    per_pass = 2 * (splits * tile + tile)
    return 2 * tile + (1 if symmetric else 2) * per_pass


class _TritonLoss(torch.autograd.Function):
    """As chunked._TiledLoss; symmetric=True is the square global batch, whose backward is one
    pass with both directions' softmaxes in each tile instead of two passes."""

    @staticmethod
    def forward(ctx, a_local, b_local, a_all, b_all, scale, offset, symmetric):
        a, b = a_local.contiguous(), b_local.contiguous()
        a_cols, b_cols = a_all.contiguous(), b_all.contiguous()
        s = scale.detach().to(device=a.device, dtype=torch.float32)
        n = a.shape[0]
        lse_ab, lse_ba = _lse(a, b_cols, s), _lse(b, a_cols, s)
        # The positive logits are O(n * D): plain PyTorch, in fp32.
        pos_ab = s * (a.float() * b_cols[offset:offset + n].float()).sum(-1)
        pos_ba = s * (b.float() * a_cols[offset:offset + n].float()).sum(-1)
        ctx.save_for_backward(a, b, a_cols, b_cols, scale, lse_ab, lse_ba)
        ctx.offset, ctx.symmetric = offset, symmetric
        return ((lse_ab - pos_ab).sum() + (lse_ba - pos_ba).sum()) / (2 * n)

    @staticmethod
    def backward(ctx, grad_loss):
        a, b, a_cols, b_cols, scale, lse_ab, lse_ba = ctx.saved_tensors
        s = scale.detach().to(device=a.device, dtype=torch.float32)
        weight = grad_loss.float() / (2 * a.shape[0])
        coef = (weight * s).contiguous()
        if ctx.symmetric:
            da, db, dscale = _grads(a, b, s, coef, lse_ab, lse_ba, 0)
            grads = (da, db, None, None)
        else:
            da, db_all, ds_ab = _grads(a, b_cols, s, coef, lse_ab, None, ctx.offset)
            db, da_all, ds_ba = _grads(b, a_cols, s, coef, lse_ba, None, ctx.offset)
            dscale = ds_ab + ds_ba
            grads = (da, db, da_all, db_all)
        dscale = (dscale * weight).to(device=scale.device, dtype=scale.dtype)
        return (*grads, dscale, None, None)


def _check(a_local, b_local, a_all, b_all, offset, scale) -> torch.Tensor:
    scale = check_inputs(a_local, b_local, a_all, b_all, offset, scale)
    if a_local.dtype not in DTYPES:
        raise ValueError(f"the Triton path takes {DTYPES}, got {a_local.dtype}; "
                         f"use backend='chunked' for it")
    return scale


def contrastive_loss_local(a_local: torch.Tensor, b_local: torch.Tensor,
                           a_all: torch.Tensor, b_all: torch.Tensor,
                           offset: int, scale) -> torch.Tensor:
    """`reference.contrastive_loss_local` as Triton kernels; a fp32 0-dim loss."""
    scale = _check(a_local, b_local, a_all, b_all, offset, scale)
    return _TritonLoss.apply(a_local, b_local, a_all, b_all, scale, int(offset), False)


def contrastive_loss(a: torch.Tensor, b: torch.Tensor, scale) -> torch.Tensor:
    """`reference.contrastive_loss` as Triton kernels, one backward pass for both directions."""
    scale = _check(a, b, a, b, 0, scale)
    return _TritonLoss.apply(a, b, a, b, scale, 0, True)
