"""Top-k cosine neighbours over a bank (DeCLIP's queue) behind one function; `backend` picks the path.

"reference": plain PyTorch (reference.py), the truth; stores the [N, Q] similarities and sorts them.
"chunked":   streams the bank in blocks with a running top-k, any device and k (chunked.py).
"triton":    one pass of fused tiles with a running top-k (triton.py); CUDA tensors, or CPU
             ones under TRITON_INTERPRET=1; float16/bfloat16/float32 and k <= TRITON_MAX_K (16):
             other dtypes or a larger k raise a ValueError that names the chunked path.
"auto":      triton for CUDA tensors when Triton imports and the dtypes and k fit it;
             otherwise chunked, or the reference when N x Q is below REFERENCE_MAX_SIMILARITIES
             (small enough that its full matrix costs nothing and it skips the block loop).
Every path validates and promotes dtypes as the reference does, returns float32 values
(float64 for float64 inputs on the reference and chunked paths) and orders equal
similarities by lower bank index.
"""
import torch

from kernels import backend as _backend
from kernels.knn import chunked, reference

# Already at 256 x 4096 the chunked path took a quarter of the reference's time on 2 CPU
# cores (its full sort is the cost; benchmarks/results/knn_cpu.json).
REFERENCE_MAX_SIMILARITIES = 1 << 16
# The Triton kernel keeps each query's running top-k in registers (next power of two of k
# slots) and drains a tile one entry per loop turn: sized for DeCLIP's k = 1 and small k.
TRITON_MAX_K = 16
_TRITON_MODULE = "kernels.knn.triton"


def nearest_neighbors(q: torch.Tensor, bank: torch.Tensor, k: int = 1,
                      backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(values [N, k], indices [N, k] int64) of the k bank rows nearest each query row.

    See kernels/knn/reference.py for the arguments; `backend` as in the module docstring.
    """
    _backend.check_backend(backend)
    if backend == "reference":
        return reference.nearest_neighbors(q, bank, k)
    if backend == "chunked":
        return chunked.nearest_neighbors(q, bank, k)
    if backend == "triton":
        return _backend.triton_module(_TRITON_MODULE, q).nearest_neighbors(q, bank, k)
    fits_triton = (isinstance(k, int) and k <= TRITON_MAX_K
                   and q.dtype in _backend.TRITON_DTYPES and bank.dtype in _backend.TRITON_DTYPES)
    fast = _backend.auto_triton_module(_TRITON_MODULE, q) if fits_triton else None
    if fast is not None:
        return fast.nearest_neighbors(q, bank, k)
    if q.dim() == bank.dim() == 2 and q.shape[0] * bank.shape[0] > REFERENCE_MAX_SIMILARITIES:
        return chunked.nearest_neighbors(q, bank, k)
    return reference.nearest_neighbors(q, bank, k)


__all__ = ["nearest_neighbors"]
