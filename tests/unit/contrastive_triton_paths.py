"""The Triton contrastive-loss kernels against the fp64 reference at small shapes.

Not collected by a plain `pytest` run (no test_ prefix): whether Triton compiles or interprets
is fixed when it is first imported, so test_contrastive_paths.py runs this file in a
subprocess with TRITON_INTERPRET=1. By hand:
    TRITON_INTERPRET=1 python -m pytest tests/unit/contrastive_triton_paths.py   (CPU, slow)
    python -m pytest tests/unit/contrastive_triton_paths.py                      (on CUDA)
"""
import pytest
import torch

from kernels import contrastive_loss_local
from tests.unit.contrastive_checks import check_aliased, check_local, check_square, unit
from tests.unit.triton_support import triton_device

triton_path = pytest.importorskip("kernels.contrastive.triton")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# The interpreter's tiles are 16 x 16, multiplied 64 dimensions at a time, gradients 128
# dimensions per program: N = 1, 17, 21, 33 leave partial tiles; D = 3 is under one step,
# 70 takes two, 130 and 300 take several and split the gradient over 2 and 3 programs.
LOCAL_CASES = [(1, 1, 3, 0, 1.0), (9, 33, 130, 20, 100.0), (5, 21, 300, 16, 14.3)]
SQUARE_CASES = [(1, 3, 14.3), (21, 70, 100.0), (17, 300, 1.0)]


@pytest.fixture(scope="module")
def device():
    return triton_device(triton_path)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n, N, d, offset, scale", LOCAL_CASES)
def test_local_matches_reference(device, n, N, d, offset, scale, dtype):
    check_local(triton_path, n, N, d, offset, scale, dtype, seed=N * 100 + d, device=device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N, d, scale", SQUARE_CASES)
def test_square_matches_reference(device, N, d, scale, dtype):
    check_square(triton_path, N, d, scale, dtype, seed=N * 100 + d, device=device)


def test_aliased_columns_sum_both_roles(device):
    check_aliased(triton_path, 21, 40, 14.3, torch.float32, seed=5, device=device)


def test_dispatcher_runs_triton_when_asked(device):
    a, b = unit(9, 16, 1, torch.float32, device), unit(9, 16, 2, torch.float32, device)
    a_all = torch.cat([unit(9, 16, 3, torch.float32, device), a])
    b_all = torch.cat([unit(9, 16, 4, torch.float32, device), b])
    scale = torch.tensor(14.3, device=device, requires_grad=True)
    loss = contrastive_loss_local(a, b, a_all, b_all, 9, scale, backend="triton")
    assert type(loss.grad_fn).__name__ == "_TritonLossBackward"
    expected = contrastive_loss_local(a, b, a_all, b_all, 9, scale, backend="reference")
    assert torch.allclose(loss, expected, rtol=1e-5)


def test_rejects_float64(device):
    a = unit(4, 8, 1, torch.float64, device)
    with pytest.raises(ValueError, match="backend='chunked'"):
        triton_path.contrastive_loss(a, a, torch.tensor(1.0, device=device))
