"""SigLIP's sigmoid loss in tiled PyTorch: the CPU fast path, and the fallback wherever Triton is not.

Same function and results as `reference.py`, but the [n, N] logits are only ever held one
block of rows at a time: memory O((n + N) * D + block * N) instead of O(n * N). The loss is
a plain sum of independent per-pair terms, so forward keeps nothing but that sum; backward
recomputes each tile from the embeddings (the recompute trick of FlashAttention, Dao et al.
2022). d/dz of -log sigmoid(l z) is -l sigmoid(-l z): sigmoid(z) on a negative, -sigmoid(-z)
on a positive, each computed directly (no "sigmoid(z) - 1", which would cancel).
"""
import torch
import torch.nn.functional as F

from kernels.row_blocks import block_rows as _block_rows, work_dtype as _work_dtype
from kernels.siglip.reference import check_inputs


def _logits(a_block, b, scale, bias, out):
    """scale * a_block @ b.T + bias into `out`; as the reference, the scale multiplies the rows first."""
    return torch.mm(a_block * scale, b.T, out=out).add_(bias)


def _forward_pass(a, b, scale, bias, offset):
    """sum_ij -log sigmoid(l_ij z_ij), one block of rows at a time."""
    n, N = a.shape[0], b.shape[0]
    block = _block_rows(n, N)
    # One tile buffer serves every block: a fresh tile per block pays its page faults again.
    logits_buffer = a.new_empty(block, N)
    total = a.new_zeros(())
    for r0 in range(0, n, block):
        r1 = min(r0 + block, n)
        z = _logits(a[r0:r1], b, scale, bias, logits_buffer[:r1 - r0])
        # l z: the negatives negated, the positives kept; -log sigmoid(l z) = -logsigmoid.
        z.neg_().diagonal(offset + r0).neg_()
        total += F.logsigmoid(z).sum()
    return -total


def _backward_pass(a, b, scale, bias, offset):
    """Gradients of sum_ij -log sigmoid(l_ij z_ij) w.r.t. a, b, the scale and the bias, before
    the 1/n weight; da and db still miss the factor `scale`."""
    n, N = a.shape[0], b.shape[0]
    block = _block_rows(n, N)
    logits_buffer = a.new_empty(block, N)
    da, db = torch.empty_like(a), torch.zeros_like(b)
    dbias = a.new_zeros(())
    for r0 in range(0, n, block):
        r1 = min(r0 + block, n)
        z = _logits(a[r0:r1], b, scale, bias, logits_buffer[:r1 - r0])
        positive = z.diagonal(offset + r0)
        # -sigmoid(-z) on the positives, from z before the tile becomes sigmoid(z) in place.
        grad_positive = torch.sigmoid(-positive).neg_()
        grad = torch.sigmoid_(z)
        grad.diagonal(offset + r0).copy_(grad_positive)
        dbias += grad.sum()
        torch.mm(grad, b, out=da[r0:r1])
        db.addmm_(grad.T, a[r0:r1])
    # d/dscale of z_ij = scale * a_i . b_j + bias is sum_ij grad_ij a_i . b_j
    # = sum_i a_i . (grad @ b)_i: an O(n * D) product instead of another pass over the tiles.
    return da, db, torch.vdot(a.reshape(-1), da.reshape(-1)), dbias


class _TiledLoss(torch.autograd.Function):
    """The loss as one autograd node whose backward recomputes the tiles."""

    @staticmethod
    def forward(ctx, a_local, b_all, scale, bias, offset):
        work = _work_dtype(a_local.dtype)
        a, b = a_local.to(work), b_all.to(work)
        s, c = (x.detach().to(device=a.device, dtype=work) for x in (scale, bias))
        loss = _forward_pass(a, b, s, c, offset) / a.shape[0]
        ctx.save_for_backward(a_local, b_all, scale, bias)
        ctx.offset = offset
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        a_local, b_all, scale, bias = ctx.saved_tensors
        work = _work_dtype(a_local.dtype)
        a, b = a_local.to(work), b_all.to(work)
        s, c = (x.detach().to(device=a.device, dtype=work) for x in (scale, bias))
        weight = grad_loss.to(work) / a.shape[0]
        da, db, dscale, dbias = _backward_pass(a, b, s, c, ctx.offset)
        return ((da * (weight * s)).to(a_local.dtype), (db * (weight * s)).to(b_all.dtype),
                (dscale * weight).to(device=scale.device, dtype=scale.dtype),
                (dbias * weight).to(device=bias.device, dtype=bias.dtype), None)


def siglip_loss_local(a_local: torch.Tensor, b_all: torch.Tensor, offset: int,
                      scale, bias) -> torch.Tensor:
    """`reference.siglip_loss_local`, tiled. Loss in fp32 for half inputs (else the inputs'
    dtype); gradients in the dtypes of the inputs, the scale and the bias."""
    scale, bias = check_inputs(a_local, b_all, offset, scale, bias)
    return _TiledLoss.apply(a_local, b_all, scale, bias, int(offset))


def siglip_loss(a: torch.Tensor, b: torch.Tensor, scale, bias) -> torch.Tensor:
    """`reference.siglip_loss`, tiled."""
    return siglip_loss_local(a, b, 0, scale, bias)
