"""Shared by the JSD and nearest-neighbour path tests: inputs, case grids, and "same as the reference".

Kept out of pytest's test_*.py pattern: the chunked tests import it in-process, and
jsd_knn_triton_paths.py (run in a subprocess under TRITON_INTERPRET=1, or on CUDA) imports it too.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kernels.jsd import reference as jsd_reference
from kernels.knn import reference as knn_reference

ROOT = Path(__file__).resolve().parents[2]
TRITON_PATHS = Path(__file__).with_name("jsd_knn_triton_paths.py")


def gpu(test):
    """Marks a test as needing CUDA: `pytest -m gpu` selects it; without CUDA it is skipped."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(test))


# (N, D, shift, scale): N = 2 and odd N that are not multiples of any block (Triton's 32, 64
# or 128 rows, chunked's default or 16 rows); D = 300 and D below one Triton slice; shifts
# negative and beyond N.
JSD_CASES = [
    (2, 8, 1, 1 / 0.07),
    (3, 300, -1, 100.0),
    (37, 300, 2, 1 / 0.07),
    (37, 5, 40, 1.0),
    (101, 64, -150, 1 / 0.07),
    (67, 300, 1, 100.0),
]
JSD_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

# (N, Q, D, k): Q odd and not a multiple of Triton's 64 or 128 bank rows, N past one block
# of 64 queries, k up to 16 (and Q barely above it), D = 300.
KNN_CASES = [
    (37, 301, 300, 1),
    (37, 301, 300, 3),
    (37, 301, 300, 16),
    (70, 129, 16, 3),
    (1, 1, 4, 1),
    (5, 17, 7, 16),
]
KNN_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# The interpreter runs each program op by op in NumPy: it gets the cases crossed with the
# dtypes only where the dtype changes the kernel's arithmetic (the tile product).
KNN_INTERPRETED_CASES = ([(37, 301, 300, 1, dtype) for dtype in KNN_DTYPES]
                         + [(37, 301, 40, 16, dtype) for dtype in KNN_DTYPES]
                         + [(70, 129, 16, 3, torch.float16), (1, 1, 4, 1, torch.float32),
                            (5, 17, 7, 16, torch.bfloat16), (37, 301, 300, 3, torch.float32)])


def unit(n, d, seed, dtype=torch.float32, device="cpu"):
    """Fresh random L2-normalised rows, drawn in float64 then rounded to `dtype`."""
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1).to(device, dtype)


def exact_rows(n, d, seed, dtype=torch.float32, device="cpu"):
    """Unit rows of +-1/16 on 256 of the d >= 256 dims: every dot product is exact in any
    summation order and precision, so equal similarities are bit-identical on every path."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.zeros(n, d, dtype=torch.float64)
    rows[:, :256] = (torch.randint(0, 2, (n, 256), generator=g) * 2 - 1) / 16
    return rows.to(device, dtype)


def tied_inputs(n, q, d, seed, dtype=torch.float32, device="cpu"):
    """Queries and a bank full of exact ties: duplicated bank rows, some of them at the end of
    the bank, and a query equal to a duplicated row (its top similarities all equal 1)."""
    queries, bank = exact_rows(n, d, seed, dtype, device), exact_rows(q, d, seed + 1, dtype, device)
    bank[10:20] = bank[3]
    bank[q - 5:] = bank[3]
    bank[40:60:2] = bank[41]
    queries[0] = bank[3]
    queries[1] = bank[41]
    return queries, bank


def _assert_close(actual, expected, what, atol=0.0):
    """Within rounding of `expected`'s dtype: one unit in the last place for half precision
    (Triton's interpreter truncates to bfloat16 where torch rounds to nearest), else float
    summation-order noise; atol covers entries that cancel to near zero."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    info = torch.finfo(expected.dtype)
    rtol = {torch.float64: 1e-10, torch.float32: 1e-5}.get(expected.dtype, info.eps)
    scale = expected.double().abs().max().item()
    atol = atol + (1e-10 if expected.dtype == torch.float64 else 1e-6) * scale + info.tiny * info.eps
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: {m}")


def check_jsd_path(jsd_loss, n, d, shift, scale, dtype, seed, device="cpu"):
    """The path's loss and its gradients for a, b and scale equal the reference's. Half inputs
    run twice: with a fp32 scale (what the objective passes) and with one of their own dtype
    (a bf16 temperature parameter's), which every path must use in fp32, as the reference."""
    a = unit(n, d, seed, dtype, device).requires_grad_()
    b = unit(n, d, seed + 1, dtype, device).requires_grad_()
    half = dtype in (torch.float16, torch.bfloat16)
    for scale_dtype in (torch.float32, dtype) if half else (torch.float32,):
        s = torch.tensor(scale, dtype=scale_dtype, device=device, requires_grad=True)
        results = []
        for fn in (jsd_reference.jsd_loss, jsd_loss):
            loss = fn(a, b, s, shift)
            results.append((loss, *torch.autograd.grad(loss, (a, b, s))))
        for name, actual, expected in zip(("loss", "grad a", "grad b", "grad scale"), results[1], results[0]):
            _assert_close(actual, expected, f"{name} (N={n} D={d} shift={shift} scale={scale} {dtype}, "
                                            f"scale {scale_dtype})")


def check_neighbors(values, indices, expected_values, expected_indices, what, near_ties_from=None):
    """Indices equal and values close. With near_ties_from=(q, bank), an index may differ only
    where the reference's own similarities at that rank are within float32 rounding of each
    other (large random problems summed in a different order), and only rarely."""
    assert indices.dtype == torch.int64 and values.shape == indices.shape == expected_indices.shape, what
    assert not values.requires_grad and not indices.requires_grad, what
    _assert_close(values, expected_values, f"{what} values")
    differ = indices != expected_indices
    if near_ties_from is None or not differ.any():
        assert not differ.any(), f"{what}: {int(differ.sum())} indices differ from the reference"
        return
    q, bank = near_ties_from
    rows, ranks = differ.nonzero(as_tuple=True)
    mine = (q[rows].double() * bank[indices[rows, ranks]].double()).sum(dim=1)
    theirs = (q[rows].double() * bank[expected_indices[rows, ranks]].double()).sum(dim=1)
    gap = (mine - theirs).abs().max().item()
    assert gap < 1e-5, f"{what}: an index differs where similarities differ by {gap:.2e}"
    assert differ.float().mean().item() < 1e-3, f"{what}: {int(differ.sum())} indices differ"


def check_knn_path(nearest_neighbors, n, q, d, k, dtype, seed, ties=False, device="cpu"):
    """The path's values and indices equal the reference's on the same inputs."""
    if ties:
        queries, bank = tied_inputs(n, max(q, 61), max(d, 256), seed, dtype, device)
    else:
        queries, bank = unit(n, d, seed, dtype, device), unit(q, d, seed + 1, dtype, device)
    values, indices = nearest_neighbors(queries, bank, k)
    expected_values, expected_indices = knn_reference.nearest_neighbors(queries, bank, k)
    check_neighbors(values, indices, expected_values, expected_indices,
                    f"N={n} Q={bank.shape[0]} D={bank.shape[1]} k={k} {dtype} ties={ties}")


def run_triton_paths(selection, interpret):
    """Run jsd_knn_triton_paths.py tests matching `selection` in a fresh interpreter, where
    TRITON_INTERPRET is set (or cleared) before Triton is first imported."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "-k", selection,
         str(TRITON_PATHS)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    report = result.stdout[-6000:] + result.stderr[-3000:]
    assert result.returncode == 0, report
    assert " passed" in report and "skipped" not in report, report
    return report
