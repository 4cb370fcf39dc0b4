"""SigLIP's pairwise sigmoid loss behind one function; `backend` picks the implementation.

"reference": plain PyTorch (reference.py), the truth; stores the [n, N] logits.
"chunked":   tiled PyTorch autograd.Function, any device (chunked.py); memory
             O((n + N) * D + block * N).
"triton":    Triton kernels (triton.py); CUDA tensors, or CPU ones under TRITON_INTERPRET=1;
             float16/bfloat16/float32.
"auto":      triton for CUDA tensors of those dtypes when Triton imports; otherwise chunked
             once there are at least CHUNKED_MIN_LOGITS logits, else the reference.
The local form (reference.py says why) is this rank's image rows against every rank's text
columns: in one process engine.dist.all_gather_with_grad returns its input, so b_all is the
local texts, offset 0, and the local form is the paper's loss on the global batch.
"""
import torch

from kernels import backend as _backend
from kernels.siglip import chunked, reference

# As kernels/contrastive: 2048 x 2048 logits (16 MiB in fp32). Below it the reference's few
# full-size temporaries (logits, signs, log-sigmoid and autograd's saved copies) cost little
# memory; the tiles recompute the product in backward (4 matmuls to the reference's 3), so
# they buy memory rather than time. Measured on 2 shared CPU cores, D = 512, fp32, forward +
# backward: 2048^2 about 220-240 ms reference vs 255-270 ms tiled; at 4096^2 runs disagreed
# (0.4-1.5 s either way) on the busy machine.
CHUNKED_MIN_LOGITS = 1 << 22


def _implementation(backend, a_local, b_all):
    return _backend.choose(backend, reference=reference, chunked=chunked, triton_name="kernels.siglip.triton",
                           tensor=a_local, logits=a_local.shape[0] * b_all.shape[0],
                           chunked_min_logits=CHUNKED_MIN_LOGITS)


def siglip_loss_local(a_local: torch.Tensor, b_all: torch.Tensor, offset: int,
                      scale: torch.Tensor, bias: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """This rank's image rows against every rank's text columns, positives at (i, offset + i):
    -(1/n) sum_i sum_j log sigmoid(l_ij (scale <a_i, b_j> + bias)). See reference.py for the
    arguments; `backend` as above."""
    return _implementation(backend, a_local, b_all).siglip_loss_local(a_local, b_all, offset, scale, bias)


def siglip_loss(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                backend: str = "auto") -> torch.Tensor:
    """The paper's loss on one global batch: row i of a (images) matches row i of b (texts)."""
    return _implementation(backend, a, b).siglip_loss(a, b, scale, bias)


__all__ = ["siglip_loss", "siglip_loss_local"]
