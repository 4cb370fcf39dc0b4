"""SigLIP's pairwise sigmoid loss in plain PyTorch: the truth every faster path is tested against.

Zhai, Mustafa, Kolesnikov, Beyer, "Sigmoid Loss for Language Image Pre-Training", ICCV 2023,
arXiv:2303.15343 (Sec. 3, Algorithm 1). For L2-normalised image embeddings x_i and text
embeddings y_j of a batch of N pairs:

    z_ij = t * <x_i, y_j> + b,    l_ij = +1 if i == j else -1,
    loss = -(1/N) * sum_i sum_j log sigmoid(l_ij * z_ij)

every image-text pair is an independent binary classification: no softmax, so no row or
column normalisation couples the pairs. The temperature is learnt as t = exp(t') beside a
learnt bias b, initialised to t' = log 10 and b = -10 (paper, Sec. 3.2 and Algorithm 1):
almost all of the N^2 pairs are negatives, and a bias that starts every logit near -10 keeps
the first steps from spending themselves on correcting that imbalance. Also in code:
google-research/big_vision, trainers/proj/image_text/siglip.py (log-sigmoid of the signed
logits, summed over each image's row, averaged over the rows, as here) and
models/proj/image_text/two_towers.py (t = exp of a parameter initialised to
log(temperature_init)); open_clip's SigLipLoss (the same sum over a rank's rows divided by
its row count). These functions take t itself (`scale`, 0-dim) and b (`bias`, 0-dim): the
objective owns t' and passes t'.exp().

Local form, for data-parallel training: rank r holds n of the N pairs and gathers every
rank's text embeddings (engine.dist.all_gather_with_grad). It scores its own n image rows
against all N text columns, so each of the N^2 pairs is scored on exactly one rank (the one
holding its image), and returns the mean over its n rows of each row's sum over the N
columns. With equal n on every rank the mean of the per-rank losses is the paper's loss
((1/W) sum_r (1/n) sum_{i in r} = (1/N) sum_i), and DeepSpeed's averaging of the ranks'
gradients trains exactly that: the gather's backward sums every rank's share of a text row's
gradient onto the rank that owns the row. The images need no gather: no rank scores another
rank's images (unlike the symmetric InfoNCE of kernels/contrastive, the sigmoid loss has one
term per pair, not one per direction). The paper's Sec. 3.3 computes the same per-device
sum by passing the text blocks from device to device instead of gathering them; a gather
holds all N text rows at once ([N, D], small next to the [n, N] logits the tiles avoid).
Stores the full [n, N] logits; fine up to a few thousand rows per rank. Half-precision
embeddings (bf16 towers) are computed in fp32, as on every other path: the sum over N columns
of bf16 terms, and a bf16 loss, would lose the many small negatives.
"""
import torch
import torch.nn.functional as F

from kernels.row_blocks import work_dtype


def check_inputs(a_local, b_all, offset, scale, bias) -> tuple[torch.Tensor, torch.Tensor]:
    """Raise ValueError where the loss is undefined; return (scale, bias) as tensors (a number
    becomes a 0-dim tensor in the embeddings' compute dtype). Shared by every path, so they
    reject the same inputs."""
    if a_local.dim() != 2 or b_all.dim() != 2 or a_local.shape[1] != b_all.shape[1]:
        raise ValueError(f"shapes do not pair up: a_local {tuple(a_local.shape)}, "
                         f"b_all {tuple(b_all.shape)} (want [n, D] and [N, D])")
    n, N = a_local.shape[0], b_all.shape[0]
    if not 0 <= offset <= N - n:
        raise ValueError(f"offset {offset} puts the {n} local rows' positives outside the {N} columns")
    if a_local.dtype != b_all.dtype or a_local.device != b_all.device:
        raise ValueError(f"a_local and b_all must share a dtype and a device; got "
                         f"{a_local.dtype} on {a_local.device.type}, {b_all.dtype} on {b_all.device.type}")
    out = []
    for name, value in (("scale", scale), ("bias", bias)):
        if not torch.is_tensor(value):
            value = torch.tensor(float(value), dtype=torch.promote_types(a_local.dtype, torch.float32),
                                 device=a_local.device)
        elif value.dim() != 0:
            raise ValueError(f"{name} must be a 0-dim tensor or a number, got shape {tuple(value.shape)}")
        out.append(value)
    return out[0], out[1]


def siglip_loss_local(a_local: torch.Tensor, b_all: torch.Tensor, offset: int,
                      scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """This rank's image rows against every rank's text columns.

    a_local: [n, D] this rank's L2-normalised image embeddings.
    b_all:   [N, D] every rank's L2-normalised text embeddings, gathered; this rank's
             block (the texts paired with a_local) starts at row `offset`, so the
             positives are (i, offset + i).
    scale:   t = exp(t'), a 0-dim tensor (or a number); bias: b, the same.
    Returns -(1/n) sum_i sum_j log sigmoid(l_ij * (scale * <a_i, b_j> + bias)), computed in
    fp32 for half inputs (else their dtype), the scale and bias too. Gradients flow to
    a_local, b_all, scale and bias, each in its own dtype.
    """
    scale, bias = check_inputs(a_local, b_all, offset, scale, bias)
    work = work_dtype(a_local.dtype)
    # Casts to the dtype a tensor has already are no-ops: fp32 and fp64 run as they always did.
    a_local, b_all, scale, bias = (t.to(work) for t in (a_local, b_all, scale, bias))
    logits = scale * a_local @ b_all.T + bias
    # l_ij: -1 everywhere, +1 on the positives (i, offset + i).
    signs = torch.full_like(logits, -1.0)
    signs.diagonal(offset).fill_(1.0)
    return -F.logsigmoid(signs * logits).sum(dim=1).mean()


def siglip_loss(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor) -> torch.Tensor:
    """The paper's loss on one global batch: row i of a (images) matches row i of b (texts)."""
    return siglip_loss_local(a, b, 0, scale, bias)
