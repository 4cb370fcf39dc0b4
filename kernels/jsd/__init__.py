"""CLIP-Lite's JSD loss behind one function; `backend` picks the implementation.

"reference": plain PyTorch (reference.py), the truth, double-differentiable.
"chunked":   fused, memory-lean autograd.Function in PyTorch, any device (chunked.py).
"triton":    fused Triton kernels (triton.py); CUDA tensors, or CPU ones under TRITON_INTERPRET=1.
"auto":      triton for CUDA tensors when Triton imports; otherwise chunked once a is at
             least CHUNKED_MIN_ELEMENTS (below that both paths hold a few hundred KB and
             the reference is the simpler one), else reference.
Every path validates and promotes dtypes as the reference does. The loss works on whatever
rows it is given: local rows, or gathered global rows for CLIP-Lite's `--negatives global`.
"""
import torch

from kernels import backend as _backend
from kernels.jsd import chunked, reference

CHUNKED_MIN_ELEMENTS = 1 << 16
_TRITON_MODULE = "kernels.jsd.triton"


def jsd_loss(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, shift: int = 1,
             backend: str = "auto") -> torch.Tensor:
    """mean_i softplus(-scale <a_i, b_i>) + mean_i softplus(scale <a_i, b_{(i+shift) mod N}>).

    See kernels/jsd/reference.py for the arguments; `backend` as in the module docstring.
    """
    _backend.check_backend(backend)
    if backend == "reference":
        return reference.jsd_loss(a, b, scale, shift)
    if backend == "chunked":
        return chunked.jsd_loss(a, b, scale, shift)
    if backend == "triton":
        return _backend.triton_module(_TRITON_MODULE, a).jsd_loss(a, b, scale, shift)
    fast = _backend.auto_triton_module(_TRITON_MODULE, a)
    if fast is not None:
        return fast.jsd_loss(a, b, scale, shift)
    if a.numel() >= CHUNKED_MIN_ELEMENTS:
        return chunked.jsd_loss(a, b, scale, shift)
    return reference.jsd_loss(a, b, scale, shift)


__all__ = ["jsd_loss"]
