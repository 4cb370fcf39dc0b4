"""Symmetric InfoNCE in tiled PyTorch: the CPU fast path, and the fallback wherever Triton is not.

Same functions and results as `reference.py`, but the [rows, columns] logits are only ever
held one block of rows at a time: memory is O(N * D + block * N) instead of O(n * N).
Forward keeps each row's log-sum-exp (and, for the square global batch, each column's);
backward recomputes the tiles from the embeddings (the recompute trick of
FlashAttention, Dao et al. 2022) and folds the one-hot labels into them, so the large
"softmax minus label" terms cancel inside one accumulation instead of after it.
"""
import torch

from kernels.row_blocks import block_rows as _block_rows, work_dtype as _work_dtype


def _forward_pass(q, k, scale, offset, with_columns):
    """Log-sum-exp of each row of logits scale * q @ k.T, the positive logits at
    (i, offset + i), and (with_columns, square case) each column's log-sum-exp."""
    n, N = q.shape[0], k.shape[0]
    block = _block_rows(n, N)
    # Two tile buffers serve every block: a fresh tile per block pays its page faults again
    # (measured at B = 16384: a third of the time spent outside the matmuls).
    logits_buffer, exp_buffer = q.new_empty(block, N), q.new_empty(block, N)
    row_lse, positive = q.new_empty(n), q.new_empty(n)
    if with_columns:
        col_max = q.new_full((N,), float("-inf"))
        col_sum = q.new_zeros(N)
    for r0 in range(0, n, block):
        r1 = min(r0 + block, n)
        # As the reference: the scale multiplies the rows, then the product.
        logits = torch.mm(q[r0:r1] * scale, k.T, out=logits_buffer[:r1 - r0])
        positive[r0:r1] = logits.diagonal(offset + r0)
        row_max = logits.amax(1, keepdim=True)
        row_sum = torch.sub(logits, row_max, out=exp_buffer[:r1 - r0]).exp_().sum(1)
        row_lse[r0:r1] = row_max.squeeze(1) + row_sum.log_()
        if with_columns:
            # Online log-sum-exp down the columns: rescale the running sum to the new maximum.
            new_max = torch.maximum(col_max, logits.amax(0))
            col_sum.mul_(torch.exp(col_max - new_max))
            col_sum.add_(logits.sub_(new_max).exp_().sum(0))
            col_max = new_max
    col_lse = col_max + torch.log(col_sum) if with_columns else None
    return row_lse, col_lse, positive


def _backward_pass(q, k, scale, offset, row_lse, col_lse):
    """Gradients of sum_i (row_lse_i - logit_(i, offset+i)) [+ the same down the columns
    when col_lse is given] w.r.t. q, k and the scale, before the 1/(2n) weight.

    Returns (dq, dk, dscale) in q's dtype, dq and dk still missing the factor `scale`.
    """
    n, N = q.shape[0], k.shape[0]
    block = _block_rows(n, N)
    logits_buffer, grad_buffer = q.new_empty(block, N), q.new_empty(block, N)
    dq, dk = torch.empty_like(q), torch.zeros_like(k)
    labels_per_entry = 1 if col_lse is None else 2
    for r0 in range(0, n, block):
        r1 = min(r0 + block, n)
        logits = torch.mm(q[r0:r1] * scale, k.T, out=logits_buffer[:r1 - r0])
        # d/dlogits of the row log-sum-exps is the row softmax; of the columns', the column
        # softmax; of the positive logits, minus one on the label diagonal.
        grad = torch.sub(logits, row_lse[r0:r1, None], out=grad_buffer[:r1 - r0]).exp_()
        if col_lse is not None:
            grad.add_(logits.sub_(col_lse).exp_())
        grad.diagonal(offset + r0).sub_(labels_per_entry)
        torch.mm(grad, k, out=dq[r0:r1])
        dk.addmm_(grad.T, q[r0:r1])
    # d/dscale of logit_ij = q_i . k_j is sum_ij grad_ij q_i . k_j = sum_i q_i . (grad @ k)_i:
    # an O(n * D) product instead of another pass over the tiles.
    return dq, dk, torch.vdot(q.reshape(-1), dq.reshape(-1))


class _TiledLoss(torch.autograd.Function):
    """The loss as one autograd node whose backward recomputes the tiles.

    symmetric=True is the square global batch (a_all is a_local, b_all is b_local): the
    b->a logits are the transpose of the a->b ones, so one pass over the tiles gives both
    directions' log-sum-exps and gradients, half the matmuls of two separate passes.
    """

    @staticmethod
    def forward(ctx, a_local, b_local, a_all, b_all, scale, offset, symmetric):
        work = _work_dtype(a_local.dtype)
        a, b = a_local.to(work), b_local.to(work)
        a_cols, b_cols = a_all.to(work), b_all.to(work)
        s = scale.detach().to(work)
        n = a.shape[0]
        if symmetric:
            lse_ab, lse_ba, pos = _forward_pass(a, b_cols, s, offset, with_columns=True)
            loss = (lse_ab.sum() + lse_ba.sum() - 2 * pos.sum()) / (2 * n)
        else:
            lse_ab, _, pos_ab = _forward_pass(a, b_cols, s, offset, with_columns=False)
            lse_ba, _, pos_ba = _forward_pass(b, a_cols, s, offset, with_columns=False)
            loss = ((lse_ab - pos_ab).sum() + (lse_ba - pos_ba).sum()) / (2 * n)
        ctx.save_for_backward(a_local, b_local, a_all, b_all, scale, lse_ab, lse_ba)
        ctx.offset, ctx.symmetric = offset, symmetric
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        a_local, b_local, a_all, b_all, scale, lse_ab, lse_ba = ctx.saved_tensors
        work = lse_ab.dtype
        a, b = a_local.to(work), b_local.to(work)
        s = scale.detach().to(work)
        weight = grad_loss.to(work) / (2 * a.shape[0])
        if ctx.symmetric:
            da, db, dscale = _backward_pass(a, b, s, 0, lse_ab, lse_ba)
            grads = (da, db, None, None)
        else:
            da, db_all, ds_ab = _backward_pass(a, b_all.to(work), s, ctx.offset, lse_ab, None)
            db, da_all, ds_ba = _backward_pass(b, a_all.to(work), s, ctx.offset, lse_ba, None)
            dscale = ds_ab + ds_ba
            grads = (da, db, da_all, db_all)
        inputs = (a_local, b_local, a_all, b_all)
        grads = tuple(None if g is None else (g * (weight * s)).to(x.dtype)
                      for g, x in zip(grads, inputs))
        return (*grads, (dscale * weight).to(scale.dtype), None, None)


def check_inputs(a_local, b_local, a_all, b_all, offset, scale) -> torch.Tensor:
    """Raise ValueError where the loss is undefined; return the scale as a tensor (a number
    becomes one in the embeddings' compute dtype). Shared by the chunked and Triton paths."""
    tensors = (a_local, b_local, a_all, b_all)
    n, N = a_local.shape[0], a_all.shape[0]
    if any(t.dim() != 2 for t in tensors) or b_local.shape != a_local.shape \
            or b_all.shape != a_all.shape or a_local.shape[1] != a_all.shape[1]:
        raise ValueError(f"shapes do not pair up: a_local {tuple(a_local.shape)}, b_local "
                         f"{tuple(b_local.shape)}, a_all {tuple(a_all.shape)}, b_all {tuple(b_all.shape)}")
    if not 0 <= offset <= N - n:
        raise ValueError(f"offset {offset} puts the {n} local rows outside the {N} gathered ones")
    if len({t.dtype for t in tensors}) != 1 or len({t.device for t in tensors}) != 1:
        raise ValueError(f"the four embedding tensors must share a dtype and a device; got "
                         f"{[(t.dtype, t.device.type) for t in tensors]}")
    if not torch.is_tensor(scale):
        return torch.tensor(float(scale), dtype=_work_dtype(a_local.dtype), device=a_local.device)
    if scale.dim() != 0:
        raise ValueError(f"scale must be a 0-dim tensor or a number, got shape {tuple(scale.shape)}")
    return scale


def contrastive_loss_local(a_local: torch.Tensor, b_local: torch.Tensor,
                           a_all: torch.Tensor, b_all: torch.Tensor,
                           offset: int, scale) -> torch.Tensor:
    """`reference.contrastive_loss_local`, tiled: two passes, a_local vs b_all and b_local
    vs a_all. Loss in fp32 for half inputs (else the inputs' dtype); gradients in the inputs'."""
    scale = check_inputs(a_local, b_local, a_all, b_all, offset, scale)
    return _TiledLoss.apply(a_local, b_local, a_all, b_all, scale, int(offset), False)


def contrastive_loss(a: torch.Tensor, b: torch.Tensor, scale) -> torch.Tensor:
    """`reference.contrastive_loss`, tiled, one pass for both directions."""
    scale = check_inputs(a, b, a, b, 0, scale)
    return _TiledLoss.apply(a, b, a, b, scale, 0, True)
