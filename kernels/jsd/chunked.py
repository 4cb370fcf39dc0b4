"""CLIP-Lite's JSD loss as a fused, memory-lean autograd.Function in plain PyTorch (any device).

The reference keeps, for backward, float32 copies of a and b, a rolled copy of b and the
products of both row dots: several [N, D] tensors. This path walks the rows in blocks,
casts one block at a time to the compute dtype, reads the rolled partner rows as slices
(no rolled copy), and keeps only the two [N] row-dot vectors besides the inputs themselves.
Backward uses d softplus(x)/dx = sigmoid(x):

    p_i = <a_i, b_i>,  n_i = <a_i, b_{i+s}>,  L = mean softplus(-scale p) + mean softplus(scale n)
    dL/dp_i = -scale sigmoid(-scale p_i) / N,  dL/dn_i = scale sigmoid(scale n_i) / N
    dL/da_i = dL/dp_i b_i + dL/dn_i b_{i+s},   dL/db_j = dL/dp_j a_j + dL/dn_{j-s} a_{j-s}
    dL/dscale = mean(-p sigmoid(-scale p)) + mean(n sigmoid(scale n))
"""
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from kernels.jsd.reference import check_inputs

# Rows per block are chosen so one block of one operand holds about this many elements
# (256 KB in float32): small enough for the CPU caches, large enough to amortise the loop.
BLOCK_ELEMENTS = 1 << 16


def _wrapped_rows(x: torch.Tensor, first: int, count: int) -> torch.Tensor:
    """Rows (first + i) mod N of x for i < count <= N: a view unless the range wraps past row N."""
    n = x.shape[0]
    first %= n
    stop = first + count
    if stop <= n:
        return x[first:stop]
    return torch.cat((x[first:], x[:stop - n]))


def _row_dot(x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (x.to(dtype) * y.to(dtype)).sum(dim=-1)


class _JSDLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, scale, shift, dtype, block_rows):
        n = a.shape[0]
        positive = torch.empty(n, dtype=dtype, device=a.device)
        negative = torch.empty(n, dtype=dtype, device=a.device)
        for start in range(0, n, block_rows):
            stop = min(start + block_rows, n)
            a_block = a[start:stop].to(dtype)
            positive[start:stop] = _row_dot(a_block, b[start:stop], dtype)
            negative[start:stop] = _row_dot(a_block, _wrapped_rows(b, start + shift, stop - start), dtype)
        s = scale.detach().to(dtype)
        ctx.save_for_backward(a, b, scale, positive, negative)
        ctx.shift, ctx.dtype, ctx.block_rows = shift, dtype, block_rows
        return F.softplus(-s * positive).mean() + F.softplus(s * negative).mean()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        a, b, scale, positive, negative = ctx.saved_tensors
        shift, dtype, block_rows = ctx.shift, ctx.dtype, ctx.block_rows
        need_a, need_b, need_scale = ctx.needs_input_grad[:3]
        n = a.shape[0]
        s = scale.to(dtype)
        sig_positive = torch.sigmoid(-s * positive)
        sig_negative = torch.sigmoid(s * negative)
        grad_positive = -grad * s / n * sig_positive
        grad_negative = grad * s / n * sig_negative
        grad_a = torch.empty_like(a) if need_a else None
        grad_b = torch.empty_like(b) if need_b else None
        for start in range(0, n, block_rows):
            stop = min(start + block_rows, n)
            count = stop - start
            if need_a:
                grad_a[start:stop] = (grad_positive[start:stop, None] * b[start:stop].to(dtype)
                                      + grad_negative[start:stop, None]
                                      * _wrapped_rows(b, start + shift, count).to(dtype))
            if need_b:
                # b_j was the negative of row j - shift.
                grad_b[start:stop] = (grad_positive[start:stop, None] * a[start:stop].to(dtype)
                                      + _wrapped_rows(grad_negative, start - shift, count)[:, None]
                                      * _wrapped_rows(a, start - shift, count).to(dtype))
        grad_scale = None
        if need_scale:
            grad_scale = grad * ((-positive * sig_positive).mean() + (negative * sig_negative).mean())
            grad_scale = grad_scale.to(scale.dtype)
        return grad_a, grad_b, grad_scale, None, None, None


def jsd_loss(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, shift: int = 1,
             block_rows: int | None = None) -> torch.Tensor:
    """The reference's loss and gradients, computed block by block (see the module docstring).

    block_rows: rows per block; by default about BLOCK_ELEMENTS elements of a per block.
    """
    dtype = check_inputs(a, b, scale, shift)
    if block_rows is None:
        block_rows = max(1, BLOCK_ELEMENTS // max(1, a.shape[1]))
    return _JSDLoss.apply(a, b, scale, shift % a.shape[0], dtype, block_rows)
