"""The Triton SigLIP kernels against the fp64 reference at small shapes.

Whether Triton compiles or interprets is fixed when it is first imported, so these run only
where the kernels can: on CUDA, or on the CPU in a process started with TRITON_INTERPRET=1
(test_siglip_kernel.py starts one for this file); in a plain CPU process they skip. By hand:
    TRITON_INTERPRET=1 python -m pytest tests/unit/test_siglip_kernel_triton.py   (CPU, slow)
    python -m pytest tests/unit/test_siglip_kernel_triton.py                      (on CUDA)
"""
import pytest
import torch

from kernels.siglip import siglip_loss, siglip_loss_local
from tests.unit.contrastive_checks import unit
from tests.unit.test_siglip_kernel import check_local
from tests.unit.triton_support import triton_device

triton_path = pytest.importorskip("kernels.siglip.triton")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# The interpreter's tiles are 16 x 16, multiplied 64 dimensions at a time, gradients 128
# dimensions per program: N = 1, 17, 21, 33 leave partial tiles; D = 3 is under one step,
# 70 takes two, 130 and 300 take several and split the gradient over 2 and 3 programs.
# (n, N, D, offset, scale, bias), the local block at the start, middle and end.
LOCAL_CASES = [(1, 1, 3, 0, 10.0, -10.0), (9, 33, 130, 20, 100.0, -10.0), (5, 21, 300, 16, 14.3, -5.0),
               (21, 21, 70, 0, 10.0, -10.0), (17, 17, 300, 0, 1.0, 2.0)]


@pytest.fixture(scope="module")
def device():
    return triton_device(triton_path)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n, N, d, offset, scale, bias", LOCAL_CASES)
def test_local_matches_reference(device, n, N, d, offset, scale, bias, dtype):
    check_local(triton_path.siglip_loss_local, n, N, d, offset, scale, bias, dtype,
                seed=N * 100 + d, device=device)


def test_dispatcher_runs_triton_when_asked(device):
    a, b = unit(9, 16, 1, torch.float32, device), unit(18, 16, 2, torch.float32, device)
    scale = torch.tensor(10.0, device=device, requires_grad=True)
    bias = torch.tensor(-10.0, device=device, requires_grad=True)
    loss = siglip_loss_local(a, b, 9, scale, bias, backend="triton")
    assert type(loss.grad_fn).__name__ == "_TritonLossBackward"
    expected = siglip_loss_local(a, b, 9, scale, bias, backend="reference")
    assert torch.allclose(loss, expected, rtol=1e-5)


def test_square_form_and_numbers_for_the_scalars(device):
    a, b = unit(20, 24, 3, torch.float32, device), unit(20, 24, 4, torch.float32, device)
    expected = siglip_loss(a, b, 10.0, -10.0, backend="reference")
    assert torch.allclose(triton_path.siglip_loss(a, b, 10.0, -10.0), expected, rtol=1e-5)


def test_rejects_float64(device):
    a = unit(4, 8, 1, torch.float64, device)
    with pytest.raises(ValueError, match="backend='chunked'"):
        triton_path.siglip_loss(a, a, 10.0, -10.0)
