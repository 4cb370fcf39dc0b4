"""Symmetric InfoNCE behind one function; `backend` picks the implementation.

"reference": plain PyTorch (reference.py), the truth; stores the [n, N] logits.
"chunked":   tiled PyTorch autograd.Function, any device (chunked.py); memory O(N*D + block*N).
"triton":    Triton kernels (triton.py); CUDA tensors, or CPU ones under TRITON_INTERPRET=1;
             float16/bfloat16/float32.
"auto":      triton for CUDA tensors of those dtypes when Triton imports; otherwise chunked
             once a direction has at least CHUNKED_MIN_LOGITS logits, else the reference.
In one process engine.dist.all_gather_with_grad returns its input, so a_all is a_local and
b_all is b_local: the local form is then the square global batch, and the fast paths take
their one-pass symmetric form (half the matmuls of two directions computed separately).
"""
import torch

from kernels import backend as _backend
from kernels.contrastive import chunked, reference

# 2048 x 2048 logits (16 MiB in fp32). Measured on 2 CPU cores, D = 512, forward + backward:
# equal time there, the tiles twice as fast at 4096 x 4096; below it the reference's full
# matrix costs little memory and skips the block loop.
CHUNKED_MIN_LOGITS = 1 << 22


def _implementation(backend, a_local, b_local, a_all, b_all):
    return _backend.choose(backend, reference=reference, chunked=chunked, triton_name="kernels.contrastive.triton",
                           tensor=a_local, logits=a_local.shape[0] * a_all.shape[0],
                           chunked_min_logits=CHUNKED_MIN_LOGITS)


def contrastive_loss_local(a_local: torch.Tensor, b_local: torch.Tensor,
                           a_all: torch.Tensor, b_all: torch.Tensor,
                           offset: int, scale: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """This rank's rows against every rank's columns: (CE(a->b) + CE(b->a)) / 2 over the local
    rows, labels offset by `offset`. See reference.py for the arguments; `backend` as above."""
    implementation = _implementation(backend, a_local, b_local, a_all, b_all)
    if a_all is a_local and b_all is b_local and offset == 0:
        return implementation.contrastive_loss(a_local, b_local, scale)
    return implementation.contrastive_loss_local(a_local, b_local, a_all, b_all, offset, scale)


def contrastive_loss(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
                     backend: str = "auto") -> torch.Tensor:
    """(CE(a->b) + CE(b->a)) / 2 with logits scale * a @ b.T; row i of a matches row i of b."""
    return _implementation(backend, a, b, a, b).contrastive_loss(a, b, scale)


__all__ = ["contrastive_loss", "contrastive_loss_local"]
