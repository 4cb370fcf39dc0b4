"""Backend choice shared by the ops' dispatchers (`kernels/<op>/__init__.py`).

Every op offers the same four names: "reference" (plain PyTorch, the truth), "chunked"
(tiled PyTorch, any device), "triton" (CUDA, or the CPU under TRITON_INTERPRET=1) and
"auto". The Triton modules are imported lazily so that a machine without Triton, or a CPU
run, never pays for (or fails on) the import.
"""
import functools
import importlib
from types import ModuleType

import torch

BACKENDS = ("reference", "chunked", "triton", "auto")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")


@functools.lru_cache(maxsize=None)
def _import_triton_module(name: str) -> tuple[ModuleType | None, str]:
    """(module, "") or (None, why it failed); cached so `auto` does not retry a failed import."""
    try:
        return importlib.import_module(name), ""
    except ImportError as error:
        return None, str(error)


def triton_module(name: str, tensor: torch.Tensor) -> ModuleType:
    """The Triton module `name` for an explicit backend="triton", or a ValueError saying why not.

    Each Triton module sets INTERPRETED from its own kernels: Triton decides at decoration
    time whether a kernel is compiled or interpreted, so the environment variable as it is
    now could disagree with the kernels already built.
    """
    module, why = _import_triton_module(name)
    if module is None:
        raise ValueError(f"backend='triton' needs the triton package ({why}); "
                         f"use backend='chunked' or 'auto'")
    if tensor.device.type != "cuda" and not module.INTERPRETED:
        raise ValueError(f"backend='triton' needs CUDA tensors, got {tensor.device.type} ones; "
                         f"set TRITON_INTERPRET=1 before the first import of {name} to run the "
                         f"kernels on the CPU (slow: tests only), or use backend='chunked'")
    return module


def auto_triton_module(name: str, tensor: torch.Tensor) -> ModuleType | None:
    """The Triton module when `tensor` is on CUDA and Triton imports; None otherwise."""
    if tensor.device.type != "cuda":
        return None
    return _import_triton_module(name)[0]


def choose(backend: str, *, reference: ModuleType, chunked: ModuleType, triton_name: str, tensor: torch.Tensor,
           logits: int, chunked_min_logits: int) -> ModuleType:
    """The module that runs a tiled loss: the one `backend` names, or for "auto" the Triton
    module (CUDA `tensor` of a Triton dtype, Triton importable), else the chunked one from
    `chunked_min_logits` logits on, else the reference."""
    check_backend(backend)
    if backend == "reference":
        return reference
    if backend == "chunked":
        return chunked
    if backend == "triton":
        return triton_module(triton_name, tensor)
    fast = auto_triton_module(triton_name, tensor) if tensor.dtype in TRITON_DTYPES else None
    if fast is not None:
        return fast
    return chunked if logits >= chunked_min_logits else reference
