"""Every nearest-neighbour path equals the reference: values, indices, tie order; same errors; dispatch."""
import pytest
import torch

import kernels.knn as knn
from kernels.knn import chunked, nearest_neighbors
from tests.unit.kernel_checks import (KNN_CASES, gpu, check_knn_path, check_neighbors,
                                      run_triton_paths, unit)
from tests.unit.triton_support import compiled_triton


def _chunked(block_columns, block_elements):
    return lambda q, bank, k: chunked.nearest_neighbors(q, bank, k, block_columns=block_columns,
                                                        block_elements=block_elements)


# Blocks narrower than k and of one query row; of 64 columns and 7 rows; the defaults (one
# block at these sizes).
BLOCKINGS = {"tiny": _chunked(5, 5), "small": _chunked(64, 64 * 7), "default": chunked.nearest_neighbors}


@pytest.mark.parametrize("blocking", ["small", "default"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n, q, d, k", KNN_CASES)
def test_chunked_matches_reference(n, q, d, k, dtype, blocking):
    check_knn_path(BLOCKINGS[blocking], n, q, d, k, dtype, seed=q * 100 + k)


@pytest.mark.parametrize("blocking", BLOCKINGS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("k", [1, 3, 16])
def test_chunked_ties_go_to_the_lower_index(k, dtype, blocking):
    check_knn_path(BLOCKINGS[blocking], 9, 301, 300, k, dtype, seed=k, ties=True)


@pytest.mark.parametrize("k", [1, 3, 16])
def test_chunked_one_row_blocks_narrower_than_k(k):
    check_knn_path(BLOCKINGS["tiny"], 5, 67, 40, k, torch.float32, seed=k)


def test_chunked_k_equal_to_the_bank_size():
    q, bank = unit(7, 16, 0), unit(40, 16, 1)
    values, indices = chunked.nearest_neighbors(q, bank, 40, block_columns=8)
    expected_values, expected_indices = nearest_neighbors(q, bank, 40, backend="reference")
    check_neighbors(values, indices, expected_values, expected_indices, "k = Q")


def test_chunked_no_gradient():
    q, bank = unit(4, 8, 3).requires_grad_(), unit(10, 8, 4).requires_grad_()
    values, indices = nearest_neighbors(q, bank, 2, backend="chunked")
    assert not values.requires_grad and not indices.requires_grad


@pytest.mark.parametrize("backend", ["chunked", "auto"])
@pytest.mark.parametrize("q_shape, bank_shape, k, message", [
    ((2, 4), (5, 4), 0, "k must be"),
    ((2, 4), (5, 4), 6, "k must be"),
    ((2, 4), (5, 4), 1.0, "k must be"),
    ((2, 4), (5, 3), 1, "same D"),
    ((4,), (5, 4), 1, "same D"),
])
def test_bad_inputs_raise_as_in_the_reference(backend, q_shape, bank_shape, k, message):
    with pytest.raises(ValueError, match=message):
        nearest_neighbors(torch.zeros(q_shape), torch.zeros(bank_shape), k, backend=backend)


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="backend must be one of"):
        nearest_neighbors(torch.zeros(2, 4), torch.zeros(5, 4), backend="fast")


def test_triton_on_cpu_tensors_without_the_interpreter_raises():
    compiled_triton("kernels.knn.triton")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        nearest_neighbors(torch.zeros(2, 4), torch.zeros(5, 4), backend="triton")


@pytest.mark.parametrize("n, q, expected", [(64, 1000, "reference"), (64, 20000, "chunked")])
def test_auto_on_cpu_picks_by_size(monkeypatch, n, q, expected):
    called = []
    for name in ("reference", "chunked"):
        module = getattr(knn, name)
        monkeypatch.setattr(module, "nearest_neighbors",
                            lambda *args, _name=name, _fn=module.nearest_neighbors:
                            called.append(_name) or _fn(*args))
    nearest_neighbors(unit(n, 8, 0), unit(q, 8, 1))
    assert called == [expected]


def test_triton_interpreted_matches_reference():
    pytest.importorskip("triton")
    run_triton_paths("test_knn_", interpret=True)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("k", [1, 16])
def test_triton_matches_reference_on_cuda_at_scale(monkeypatch, k, dtype):
    # DeCLIP's sizes: a 65,536-row queue, a batch of queries. Summation order differs from
    # cuBLAS, so indices may differ only at float32 near-ties (checked, and rare).
    triton_path = pytest.importorskip("kernels.knn.triton")
    q, bank = unit(4096, 512, k, dtype, "cuda"), unit(65536, 512, k + 1, dtype, "cuda")
    called = []
    monkeypatch.setattr(triton_path, "nearest_neighbors",
                        lambda *args, _fn=triton_path.nearest_neighbors: called.append(1) or _fn(*args))
    values, indices = nearest_neighbors(q, bank, k)
    assert called, "backend='auto' should pick Triton for CUDA tensors"
    expected_values, expected_indices = nearest_neighbors(q, bank, k, backend="reference")
    check_neighbors(values, indices, expected_values, expected_indices,
                    f"N=4096 Q=65536 k={k} {dtype}", near_ties_from=(q, bank))


@gpu
@pytest.mark.parametrize("k", [1, 16])
def test_triton_ties_on_cuda_at_scale(k):
    check_knn_path(lambda q, bank, k: nearest_neighbors(q, bank, k, backend="triton"),
                   1000, 65536, 512, k, torch.bfloat16, seed=k, ties=True, device="cuda")


@gpu
def test_auto_above_triton_max_k_uses_chunked_on_cuda():
    q, bank = unit(100, 64, 0, torch.float32, "cuda"), unit(5000, 64, 1, torch.float32, "cuda")
    values, indices = nearest_neighbors(q, bank, knn.TRITON_MAX_K + 1)
    expected_values, expected_indices = nearest_neighbors(q, bank, knn.TRITON_MAX_K + 1,
                                                          backend="reference")
    check_neighbors(values, indices, expected_values, expected_indices, "k = 17 on CUDA")


@gpu
def test_triton_grid_on_cuda():
    run_triton_paths("test_knn_", interpret=False)
