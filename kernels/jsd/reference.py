"""CLIP-Lite's Jensen-Shannon MI lower bound (Deep InfoMax form) in plain PyTorch: the truth.

One negative per positive: row i of `a` is contrasted with row (i + shift) mod N of `b`.
"""
import torch
import torch.nn.functional as F


def check_inputs(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, shift: int) -> torch.dtype:
    """Raise ValueError where the loss is undefined; return the dtype every path computes in.

    Shared by all backends so they reject the same inputs and promote the same way.
    """
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"a and b must be [N, D] of the same shape; "
                         f"got {tuple(a.shape)}, {tuple(b.shape)}")
    n = a.shape[0]
    if n < 2:
        raise ValueError(f"jsd_loss needs N >= 2 rows so a negative exists; got N={n}")
    if shift % n == 0:
        raise ValueError(f"shift={shift} is a multiple of N={n}: negatives would be positives")
    if scale.dim() != 0:
        raise ValueError(f"scale must be a 0-dim tensor; got shape {tuple(scale.shape)}")
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), scale.dtype)
    return torch.promote_types(dtype, torch.float32)


def jsd_loss(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, shift: int = 1) -> torch.Tensor:
    """mean_i softplus(-scale <a_i, b_i>) + mean_i softplus(scale <a_i, b_{(i+shift) mod N}>).

    a, b:  [N, D] L2-normalised embeddings (row i of a matches row i of b), any float dtype.
    scale: 0-dim critic scale (exp of the learnable temperature).
    Computed in float32, or float64 when an input is float64, so half-precision features
    do not lose the small softplus tails; gradients flow to a, b and scale.
    """
    dtype = check_inputs(a, b, scale, shift)
    a, b, scale = a.to(dtype), b.to(dtype), scale.to(dtype)
    positive = scale * (a * b).sum(dim=-1)
    # roll by -shift puts b_{(i+shift) mod N} in row i.
    negative = scale * (a * torch.roll(b, -shift, dims=0)).sum(dim=-1)
    return F.softplus(-positive).mean() + F.softplus(negative).mean()
