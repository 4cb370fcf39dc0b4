"""CLIP-Lite's JSD loss in Triton: one kernel forward, one backward (CUDA, or TRITON_INTERPRET=1).

Forward: each program takes BLOCK_N rows, accumulates p_i = <a_i, b_i> and
n_i = <a_i, b_{(i+shift) mod N}> over D in BLOCK_D slices (masked, so any N and D), applies
softplus, and writes per-row p, n (kept for backward) and its block's sums of the loss terms
and of dL/dscale's terms (which need only p and n). Summing those few partials in torch keeps
the result deterministic (no atomics). Backward: the formulas of `kernels/jsd/chunked.py`,
every row of grad_a and grad_b written once, in the input dtype.
Accumulation is float32 (float64 for float64 inputs, as in the reference); inputs may be
float16, bfloat16, float32 or float64, and a and b may differ.
"""

import torch
import triton
import triton.language as tl

from kernels.jsd.reference import check_inputs
from kernels.triton_tiles import on_device

_ACCUMULATOR = {torch.float32: tl.float32, torch.float64: tl.float64}


@triton.jit
def _softplus(x):
    # max(x, 0) + log1p(exp(-|x|)). Triton has no portable log1p, and log(1 + t) returns 0
    # once t is below the float epsilon; Kahan's log(u) * t / (u - 1), u = 1 + t, keeps the tail.
    t = tl.exp(-tl.abs(x))
    u = 1.0 + t
    log1p = tl.where(u == 1.0, t, tl.log(u) * t / (u - 1.0))
    return tl.maximum(x, 0.0) + log1p


@triton.jit
def _cast_for(ptr, value):
    # 16-bit outputs are rounded from float32, as torch rounds float64 to them (and Triton's
    # interpreter cannot cast float64 to bfloat16 directly).
    if ptr.dtype.element_ty.primitive_bitwidth == 16:
        value = value.to(tl.float32)
    return value.to(ptr.dtype.element_ty)


@triton.jit
def _jsd_forward(a_ptr, b_ptr, scale_ptr, positive_ptr, negative_ptr, partial_ptr, N, D, shift,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    block = tl.program_id(0)
    rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    # int64 offsets: N * D may pass 2**31 elements.
    own = rows.to(tl.int64) * D
    partner = ((rows + shift) % N).to(tl.int64) * D
    positive = tl.zeros([BLOCK_N], dtype=ACC)
    negative = tl.zeros([BLOCK_N], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols < D)[None, :]
        x = tl.load(a_ptr + own[:, None] + cols[None, :], mask=mask, other=0.0).to(ACC)
        y = tl.load(b_ptr + own[:, None] + cols[None, :], mask=mask, other=0.0).to(ACC)
        z = tl.load(b_ptr + partner[:, None] + cols[None, :], mask=mask, other=0.0).to(ACC)
        positive += tl.sum(x * y, axis=1)
        negative += tl.sum(x * z, axis=1)
    tl.store(positive_ptr + rows, positive, mask=row_ok)
    tl.store(negative_ptr + rows, negative, mask=row_ok)
    s = tl.load(scale_ptr)
    loss = tl.where(row_ok, _softplus(-s * positive) + _softplus(s * negative), 0.0)
    grad_scale = tl.where(row_ok, -positive * tl.sigmoid(-s * positive)
                          + negative * tl.sigmoid(s * negative), 0.0)
    tl.store(partial_ptr + 2 * block, tl.sum(loss, axis=0))
    tl.store(partial_ptr + 2 * block + 1, tl.sum(grad_scale, axis=0))


@triton.jit
def _jsd_backward(a_ptr, b_ptr, scale_ptr, grad_ptr, positive_ptr, negative_ptr,
                  grad_a_ptr, grad_b_ptr, N, D, shift,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
                  NEED_A: tl.constexpr, NEED_B: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    next_rows = (rows + shift) % N      # b's row that is row i's negative
    prev_rows = (rows + N - shift) % N  # a's row whose negative is b's row i
    s = tl.load(scale_ptr)
    g = tl.load(grad_ptr).to(ACC) * s / N
    positive = tl.load(positive_ptr + rows, mask=row_ok, other=0.0)
    negative = tl.load(negative_ptr + rows, mask=row_ok, other=0.0)
    negative_prev = tl.load(negative_ptr + prev_rows, mask=row_ok, other=0.0)
    grad_positive = -g * tl.sigmoid(-s * positive)
    grad_negative = g * tl.sigmoid(s * negative)
    grad_negative_prev = g * tl.sigmoid(s * negative_prev)
    own = rows.to(tl.int64) * D
    following = next_rows.to(tl.int64) * D
    preceding = prev_rows.to(tl.int64) * D
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols < D)[None, :]
        if NEED_A:
            y = tl.load(b_ptr + own[:, None] + cols[None, :], mask=mask, other=0.0).to(ACC)
            z = tl.load(b_ptr + following[:, None] + cols[None, :], mask=mask, other=0.0).to(ACC)
            grad_a = grad_positive[:, None] * y + grad_negative[:, None] * z
            tl.store(grad_a_ptr + own[:, None] + cols[None, :],
                     _cast_for(grad_a_ptr, grad_a), mask=mask)
        if NEED_B:
            x = tl.load(a_ptr + own[:, None] + cols[None, :], mask=mask, other=0.0).to(ACC)
            w = tl.load(a_ptr + preceding[:, None] + cols[None, :], mask=mask, other=0.0).to(ACC)
            grad_b = grad_positive[:, None] * x + grad_negative_prev[:, None] * w
            tl.store(grad_b_ptr + own[:, None] + cols[None, :],
                     _cast_for(grad_b_ptr, grad_b), mask=mask)


def _blocks(d: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_D): up to 128 columns per slice, about 4096 elements per operand tile."""
    block_d = min(128, triton.next_power_of_2(max(d, 1)))
    return min(128, 4096 // block_d), block_d


class _JSDLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, scale, shift, dtype):
        n, d = a.shape
        a, b = a.contiguous(), b.contiguous()
        s = scale.detach().to(device=a.device, dtype=dtype)
        block_n, block_d = _blocks(d)
        grid = (triton.cdiv(n, block_n),)
        positive = torch.empty(n, dtype=dtype, device=a.device)
        negative = torch.empty(n, dtype=dtype, device=a.device)
        partial = torch.empty(grid[0], 2, dtype=dtype, device=a.device)
        with on_device(a):
            _jsd_forward[grid](a, b, s, positive, negative, partial, n, d, shift,
                               BLOCK_N=block_n, BLOCK_D=block_d, ACC=_ACCUMULATOR[dtype])
        sums = partial.sum(dim=0) / n
        ctx.save_for_backward(a, b, s, positive, negative, sums[1])
        ctx.shift, ctx.dtype, ctx.scale_like = shift, dtype, (scale.dtype, scale.device)
        return sums[0]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        a, b, s, positive, negative, grad_scale_sum = ctx.saved_tensors
        need_a, need_b, need_scale = ctx.needs_input_grad[:3]
        grad = grad.to(device=a.device, dtype=ctx.dtype)
        grad_a = grad_b = None
        if need_a or need_b:
            n, d = a.shape
            block_n, block_d = _blocks(d)
            # A gradient that is not needed gets no buffer; the kernel never touches its pointer.
            grad_a = torch.empty_like(a) if need_a else a
            grad_b = torch.empty_like(b) if need_b else b
            with on_device(a):
                _jsd_backward[(triton.cdiv(n, block_n),)](
                    a, b, s, grad, positive, negative, grad_a, grad_b, n, d, ctx.shift,
                    BLOCK_N=block_n, BLOCK_D=block_d, ACC=_ACCUMULATOR[ctx.dtype],
                    NEED_A=need_a, NEED_B=need_b)
            grad_a, grad_b = (grad_a if need_a else None), (grad_b if need_b else None)
        grad_scale = None
        if need_scale:
            dtype, device = ctx.scale_like
            grad_scale = (grad * grad_scale_sum).to(device=device, dtype=dtype)
        return grad_a, grad_b, grad_scale, None, None


def jsd_loss(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, shift: int = 1) -> torch.Tensor:
    """The reference's loss and gradients from the Triton kernels (see the module docstring)."""
    dtype = check_inputs(a, b, scale, shift)
    if b.device != a.device:
        raise ValueError(f"a and b must be on the same device; got {a.device} and {b.device}")
    return _JSDLoss.apply(a, b, scale, shift % a.shape[0], dtype)


# Triton decides when a kernel is decorated whether it is compiled or interpreted.
INTERPRETED = not isinstance(_jsd_forward, triton.runtime.JITFunction)
