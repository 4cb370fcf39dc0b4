"""Every JSD path equals the reference: loss and gradients for a, b, scale; same errors; dispatch."""
import pytest
import torch

import kernels.jsd as jsd
from kernels.jsd import chunked, jsd_loss
from tests.unit.kernel_checks import (JSD_CASES, JSD_DTYPES, check_jsd_path, gpu,
                                      run_triton_paths, unit)
from tests.unit.triton_support import compiled_triton


@pytest.mark.parametrize("block_rows", [None, 16])
@pytest.mark.parametrize("dtype", JSD_DTYPES, ids=str)
@pytest.mark.parametrize("n, d, shift, scale", JSD_CASES)
def test_chunked_matches_reference(n, d, shift, scale, dtype, block_rows):
    # block_rows=16 walks many blocks whose shifted partner rows wrap past row N.
    check_jsd_path(lambda a, b, s, shift: chunked.jsd_loss(a, b, s, shift, block_rows=block_rows),
                   n, d, shift, scale, dtype, seed=n * 1000 + d)


def test_chunked_gradcheck():
    a = unit(9, 5, 0, torch.float64).requires_grad_()
    b = unit(9, 5, 1, torch.float64).requires_grad_()
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, s: chunked.jsd_loss(a, b, s, -4, block_rows=4),
                                    (a, b, scale))


def test_chunked_mixed_dtypes_and_strided_input():
    base = unit(37, 600, 2, torch.bfloat16)
    a = base[:, ::2].requires_grad_()  # a strided view, as a slice of a wider feature would be
    b = unit(37, 300, 3, torch.float32).requires_grad_()
    scale = torch.tensor(1 / 0.07, dtype=torch.float64, requires_grad=True)
    loss = chunked.jsd_loss(a, b, scale, 5, block_rows=8)
    expected = jsd_loss(a, b, scale, 5, backend="reference")
    assert loss.dtype == torch.float64 and torch.allclose(loss, expected, rtol=1e-12)
    for grad, expected_grad in zip(torch.autograd.grad(loss, (a, b, scale)),
                                   torch.autograd.grad(expected, (a, b, scale))):
        assert grad.dtype == expected_grad.dtype
        assert torch.allclose(grad.double(), expected_grad.double(), rtol=1e-2, atol=1e-6)


def test_chunked_gradient_only_where_asked():
    a = unit(37, 300, 4).requires_grad_()
    b = unit(37, 300, 5)
    chunked.jsd_loss(a, b, torch.tensor(10.0), 1).backward()
    expected = torch.autograd.grad(jsd_loss(a, b, torch.tensor(10.0), backend="reference"), a)[0]
    assert torch.allclose(a.grad, expected, rtol=1e-5, atol=1e-7) and b.grad is None


@pytest.mark.parametrize("backend", ["chunked", "auto"])
@pytest.mark.parametrize("a_shape, b_shape, shift, scale_shape, message", [
    ((4, 3), (4, 2), 1, (), "same shape"),
    ((4,), (4,), 1, (), "same shape"),
    ((1, 3), (1, 3), 1, (), "N >= 2"),
    ((4, 3), (4, 3), -8, (), "multiple of N"),
    ((4, 3), (4, 3), 1, (1,), "0-dim"),
])
def test_bad_inputs_raise_as_in_the_reference(backend, a_shape, b_shape, shift, scale_shape, message):
    with pytest.raises(ValueError, match=message):
        jsd_loss(torch.zeros(a_shape), torch.zeros(b_shape), torch.ones(scale_shape), shift=shift,
                 backend=backend)


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="backend must be one of"):
        jsd_loss(torch.zeros(4, 3), torch.zeros(4, 3), torch.ones(()), backend="cuda")


def test_triton_on_cpu_tensors_without_the_interpreter_raises():
    compiled_triton("kernels.jsd.triton")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        jsd_loss(torch.zeros(4, 3), torch.zeros(4, 3), torch.ones(()), backend="triton")


@pytest.mark.parametrize("n, d, expected", [(64, 32, "reference"), (256, 256, "chunked")])
def test_auto_on_cpu_picks_by_size(monkeypatch, n, d, expected):
    called = []
    for name in ("reference", "chunked"):
        module = getattr(jsd, name)
        monkeypatch.setattr(module, "jsd_loss",
                            lambda *args, _name=name, _fn=module.jsd_loss: called.append(_name) or _fn(*args))
    jsd_loss(unit(n, d, 0), unit(n, d, 1), torch.tensor(2.0))
    assert called == [expected]


def test_triton_interpreted_matches_reference():
    pytest.importorskip("triton")
    run_triton_paths("test_jsd_", interpret=True)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("n, d", [(16384, 512), (4099, 300)])
def test_triton_matches_reference_on_cuda_at_scale(monkeypatch, n, d, dtype):
    triton_path = pytest.importorskip("kernels.jsd.triton")
    check_jsd_path(triton_path.jsd_loss, n, d, 1, 1 / 0.07, dtype, seed=n + d, device="cuda")
    called = []
    monkeypatch.setattr(triton_path, "jsd_loss",
                        lambda *args, _fn=triton_path.jsd_loss: called.append(1) or _fn(*args))
    check_jsd_path(lambda a, b, s, shift: jsd_loss(a, b, s, shift), n, d, -3, 100.0, dtype,
                   seed=n + d + 1, device="cuda")
    assert called, "backend='auto' should pick Triton for CUDA tensors"


@gpu
def test_triton_grid_on_cuda():
    run_triton_paths("test_jsd_", interpret=False)
