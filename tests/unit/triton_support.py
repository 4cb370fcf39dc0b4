"""Where the Triton kernels can run in this process, for the kernel tests.

Triton decides to compile or interpret when a kernel is first decorated (TRITON_INTERPRET=1
read at import), so each test asks the kernel module which it got.
"""
import pytest
import torch


def compiled_triton(module_name: str):
    """The kernel module `module_name`, compiled; skips where Triton is absent or interpreted."""
    module = pytest.importorskip(module_name)
    if module.INTERPRETED:
        pytest.skip("this process interprets Triton (TRITON_INTERPRET=1)")
    return module


def triton_device(module) -> str:
    """The device `module`'s kernels run on here: the CPU when interpreted, else CUDA (or skip)."""
    if module.INTERPRETED:
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip("compiled Triton needs CUDA: set TRITON_INTERPRET=1 to interpret on the CPU")
