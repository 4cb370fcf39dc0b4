"""The Triton paths against the references, on the small-shape grids of kernel_checks.py.

Not collected by a plain `pytest` run (no test_ prefix): whether Triton compiles or interprets
is fixed when it is first imported, so test_jsd_paths.py / test_knn_paths.py run this file
in a subprocess, with TRITON_INTERPRET=1 on the CPU and without it on CUDA. Run by hand:
    TRITON_INTERPRET=1 python -m pytest tests/unit/jsd_knn_triton_paths.py    (CPU, slow: small shapes)
    python -m pytest tests/unit/jsd_knn_triton_paths.py                       (on a CUDA machine)
"""
import pytest
import torch

from kernels.jsd import jsd_loss
from kernels.knn import nearest_neighbors
from tests.unit.kernel_checks import (JSD_CASES, JSD_DTYPES, KNN_CASES, KNN_DTYPES,
                                      KNN_INTERPRETED_CASES, check_jsd_path, check_knn_path, unit)
from tests.unit.triton_support import triton_device

triton_jsd = pytest.importorskip("kernels.jsd.triton")
triton_knn = pytest.importorskip("kernels.knn.triton")


@pytest.fixture(scope="module")
def device():
    return triton_device(triton_jsd)


def _jsd(a, b, scale, shift):
    return jsd_loss(a, b, scale, shift, backend="triton")


def _knn(q, bank, k):
    return nearest_neighbors(q, bank, k, backend="triton")


@pytest.mark.parametrize("dtype", JSD_DTYPES, ids=str)
@pytest.mark.parametrize("n, d, shift, scale", JSD_CASES)
def test_jsd_matches_reference(device, n, d, shift, scale, dtype):
    check_jsd_path(_jsd, n, d, shift, scale, dtype, seed=n * 1000 + d, device=device)


def test_jsd_mixed_dtypes_promote_like_the_reference(device):
    a = unit(37, 300, 1, torch.bfloat16, device).requires_grad_()
    b = unit(37, 300, 2, torch.float32, device).requires_grad_()
    scale = torch.tensor(1 / 0.07, dtype=torch.float64, device=device, requires_grad=True)
    loss = _jsd(a, b, scale, 3)
    expected = jsd_loss(a, b, scale, 3, backend="reference")
    assert loss.dtype == torch.float64
    assert torch.allclose(loss, expected, rtol=1e-12)
    grads = torch.autograd.grad(loss, (a, b, scale))
    expected_grads = torch.autograd.grad(expected, (a, b, scale))
    for grad, expected_grad in zip(grads, expected_grads):
        assert grad.dtype == expected_grad.dtype
        assert torch.allclose(grad.double(), expected_grad.double(), rtol=1e-2, atol=1e-6)


def test_jsd_gradient_only_where_asked(device):
    a = unit(37, 300, 3, torch.float32, device).requires_grad_()
    b = unit(37, 300, 4, torch.float32, device)
    scale = torch.tensor(10.0, device=device)
    _jsd(a, b, scale, 1).backward()
    a_grad = a.grad.clone()
    a.grad = None
    jsd_loss(a, b, scale, 1, backend="reference").backward()
    assert torch.allclose(a_grad, a.grad, rtol=1e-5, atol=1e-7)


def test_jsd_gradcheck(device):
    a = unit(6, 5, 5, torch.float64, device).requires_grad_()
    b = unit(6, 5, 6, torch.float64, device).requires_grad_()
    scale = torch.tensor(3.0, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, s: _jsd(a, b, s, -2), (a, b, scale), fast_mode=True)


def test_jsd_rejects_what_the_reference_rejects(device):
    with pytest.raises(ValueError, match="multiple of N"):
        _jsd(torch.zeros(4, 3, device=device), torch.zeros(4, 3, device=device),
             torch.ones((), device=device), 8)


def _knn_cases():
    if triton_jsd.INTERPRETED:
        return KNN_INTERPRETED_CASES
    return [(*case, dtype) for case in KNN_CASES for dtype in KNN_DTYPES]


@pytest.mark.parametrize("n, q, d, k, dtype", _knn_cases(), ids=str)
def test_knn_matches_reference(device, n, q, d, k, dtype):
    check_knn_path(_knn, n, q, d, k, dtype, seed=q * 100 + k, device=device)


@pytest.mark.parametrize("k, dtype", [(1, torch.float32), (3, torch.bfloat16), (16, torch.float16)],
                         ids=str)
def test_knn_ties_go_to_the_lower_index(device, k, dtype):
    check_knn_path(_knn, 37, 301, 300, k, dtype, seed=k, ties=True, device=device)


@pytest.mark.parametrize("k, ties", [(1, False), (16, True)])
def test_knn_bank_segments_merge_in_index_order(device, k, ties):
    # Several programs per query block (as on a large GPU) each search one bank segment.
    check_knn_path(lambda q, bank, k: triton_knn.nearest_neighbors(q, bank, k, segments=3),
                   37, 301, 300, k, torch.bfloat16, seed=7 + k, ties=ties, device=device)


def test_knn_mixed_dtypes_meet_in_float32(device):
    q, bank = unit(37, 300, 9, torch.bfloat16, device), unit(301, 300, 10, torch.float32, device)
    values, indices = _knn(q, bank, 3)
    expected_values, expected_indices = nearest_neighbors(q, bank, 3, backend="reference")
    assert torch.equal(indices, expected_indices)
    assert torch.allclose(values, expected_values, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("q_dtype, k, message", [
    (torch.float32, 17, "at most k=16"),
    (torch.float64, 1, "float16, bfloat16 or float32"),
    (torch.float32, 0, "k must be"),
])
def test_knn_limits_raise(device, q_dtype, k, message):
    q, bank = unit(3, 8, 0, q_dtype, device), unit(20, 8, 1, q_dtype, device)
    with pytest.raises(ValueError, match=message):
        _knn(q, bank, k)
