"""Symmetric InfoNCE in plain PyTorch: the truth every faster path is tested against.

Stores the full [rows, columns] logit matrices; fine up to a few thousand rows per rank.
Half-precision embeddings (bf16 towers) are computed in fp32, as on every other path: in
bf16 the logits (up to |100|) would keep 8 bits, and the loss itself would come back in bf16.
"""
import torch
import torch.nn.functional as F

from kernels.row_blocks import work_dtype


def contrastive_loss_local(a_local: torch.Tensor, b_local: torch.Tensor,
                           a_all: torch.Tensor, b_all: torch.Tensor,
                           offset: int, scale: torch.Tensor) -> torch.Tensor:
    """This rank's rows against every rank's columns.

    a_local, b_local: [n, D] this rank's L2-normalised embeddings (row i of a matches row i of b).
    a_all, b_all:     [N, D] the same embeddings gathered from all ranks, this rank's block
                      starting at row `offset`.
    Returns (CE(a->b) + CE(b->a)) / 2 averaged over the local rows. Averaging this over ranks
    gives the single-process loss on the global batch, so data-parallel gradient averaging
    trains exactly the global-batch objective.
    Computed in fp32 for half inputs (else their dtype), the scale too; gradients come back
    in each input's dtype through the casts.
    """
    work = work_dtype(a_local.dtype)
    # Casts to the dtype a tensor has already are no-ops: fp32 and fp64 run as they always did.
    # One cast per distinct tensor: where the columns are the rows themselves (one process), the
    # two roles' gradients then meet in fp32 and are rounded to the input dtype once.
    inputs = (a_local, b_local, a_all, b_all)
    cast = {id(t): t.to(work) for t in inputs}
    a_local, b_local, a_all, b_all = (cast[id(t)] for t in inputs)
    scale = scale.to(work) if torch.is_tensor(scale) else scale
    labels = torch.arange(a_local.shape[0], device=a_local.device) + offset
    logits_a = scale * a_local @ b_all.T
    logits_b = scale * b_local @ a_all.T
    return (F.cross_entropy(logits_a, labels) + F.cross_entropy(logits_b, labels)) / 2


def contrastive_loss(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(CE(a->b) + CE(b->a)) / 2 with logits scale * a @ b.T; row i of a matches row i of b."""
    return contrastive_loss_local(a, b, a, b, 0, scale)
