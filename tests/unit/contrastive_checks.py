"""Shared by the contrastive-loss path tests: inputs, "same as the fp64 reference", and the
subprocess that runs the Triton cases under TRITON_INTERPRET=1.

Kept out of pytest's test_*.py pattern: test_contrastive_paths.py imports it in-process and
contrastive_triton_paths.py (run in a subprocess) imports it too.
"""
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels.contrastive import reference

ROOT = Path(__file__).resolve().parents[2]

# Largest |path - reference| allowed, relative to the reference's largest entry, per input
# dtype: summation-order noise for fp64 and fp32; for half inputs, the gradients' own rounding
# (bf16 keeps 8 bits, fp16 11) and the softmax tile rounded to it before its product.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def unit(n, d, seed, dtype=torch.float64, device="cpu"):
    """Fresh random L2-normalised rows, drawn in fp64 then rounded to `dtype`."""
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1).to(device, dtype)


def local_inputs(n, N, d, offset, seed, dtype, device="cpu"):
    """(a_local, b_local, a_all, b_all) as gathering gives them: the local rows sit at
    `offset` in the gathered ones; four distinct tensors."""
    a_all, b_all = unit(N, d, seed, dtype, device), unit(N, d, seed + 1, dtype, device)
    return (a_all[offset:offset + n].clone(), b_all[offset:offset + n].clone(), a_all, b_all)


def loss_and_grads(fn, tensors, scale_value, scale_dtype):
    """fn(*leaves, scale) and the gradients of every leaf and of the scale."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    scale = torch.tensor(scale_value, dtype=scale_dtype, device=tensors[0].device, requires_grad=True)
    loss = fn(*leaves, scale)
    return (loss, *torch.autograd.grad(loss, (*leaves, scale)))


def assert_matches_reference(path_fn, reference_fn, tensors, scale_value, what):
    """The path on `tensors` (their dtype) against the reference on the same values in fp64:
    the loss and every gradient, each in the dtype the path promises. Half inputs run twice:
    with a fp32 scale (what the objectives pass) and with one of their own dtype (a bf16
    temperature parameter's), which every path must use in fp32 (the reference gets its
    rounded value)."""
    dtype = tensors[0].dtype
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    for scale_dtype in dict.fromkeys((wide, dtype)):
        scale = torch.tensor(scale_value, dtype=scale_dtype).item()
        got = loss_and_grads(path_fn, tensors, scale, scale_dtype)
        expected = loss_and_grads(reference_fn, [t.double() for t in tensors], scale, torch.float64)
        names = ["loss"] + [f"grad {i}" for i in range(len(tensors))] + ["grad scale"]
        dtypes = [wide] + [dtype] * len(tensors) + [scale_dtype]
        for name, actual, truth, want in zip(names, got, expected, dtypes):
            assert actual.dtype == want, f"{what} {name}: dtype {actual.dtype}, expected {want}"
            # The loss and the scale's gradient are fp32 sums whatever the inputs: fp32 tolerance
            # (a half scale's gradient is then rounded to its dtype: that dtype's tolerance).
            # Each is measured against its natural unit where the truth is smaller (at N = 1 the
            # loss and every gradient are exactly 0): 1 for the loss, scale / (n sqrt(D)) for the
            # gradients (dloss/da_i is scale / n times a mean of unit rows, entries ~ 1 / sqrt(D)).
            scalar = actual.dim() == 0
            tol = TOLERANCE[want]
            n, d = tensors[0].shape
            unit = max(truth.abs().max().item(), 1.0 if scalar else scale / (n * d ** 0.5))
            torch.testing.assert_close(actual.double().cpu(), truth.cpu(), rtol=tol, atol=tol * unit,
                                       msg=lambda m: f"{what} scale {scale_dtype} {name}: {m}")


def check_local(module, n, N, d, offset, scale_value, dtype, seed, device="cpu"):
    """module.contrastive_loss_local == reference on gathered-like inputs with an offset."""
    tensors = local_inputs(n, N, d, offset, seed, dtype, device)
    assert_matches_reference(
        lambda a, b, a_all, b_all, s: module.contrastive_loss_local(a, b, a_all, b_all, offset, s),
        lambda a, b, a_all, b_all, s: reference.contrastive_loss_local(a, b, a_all, b_all, offset, s),
        tensors, scale_value, f"local n={n} N={N} D={d} offset={offset} scale={scale_value} {dtype}")


def check_square(module, N, d, scale_value, dtype, seed, device="cpu"):
    """module.contrastive_loss (the one-pass symmetric form) == reference."""
    tensors = (unit(N, d, seed, dtype, device), unit(N, d, seed + 1, dtype, device))
    assert_matches_reference(module.contrastive_loss, reference.contrastive_loss, tensors,
                             scale_value, f"square N={N} D={d} scale={scale_value} {dtype}")


def check_aliased(module, N, d, scale_value, dtype, seed, device="cpu"):
    """module.contrastive_loss_local(a, b, a, b, 0, s) == reference.contrastive_loss(a, b, s): the
    columns are the rows themselves (one process), so autograd sums both roles' gradients."""
    tensors = (unit(N, d, seed, dtype, device), unit(N, d, seed + 1, dtype, device))
    assert_matches_reference(lambda a, b, s: module.contrastive_loss_local(a, b, a, b, 0, s),
                             reference.contrastive_loss, tensors, scale_value,
                             f"aliased N={N} D={d} scale={scale_value} {dtype}")


def run_triton_cases(path: Path, interpret: bool):
    """Run a test file in a fresh interpreter with TRITON_INTERPRET set (or cleared) before
    Triton is first imported: Triton decides compile-or-interpret when a kernel is decorated."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                             str(path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    report = result.stdout[-6000:] + result.stderr[-3000:]
    assert result.returncode == 0, report
    assert " passed" in report and "skipped" not in report, report
