"""The contrastive loss's fast paths against the reference: the tiled PyTorch path, the Triton
kernels (interpreted on the CPU in a subprocess; compiled on CUDA under the gpu marker), the
dispatcher, and 2 gloo ranks on the chunked path == one process on the global batch."""
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

import kernels.contrastive as dispatch
from engine import dist
from engine.dist import free_port
from kernels import contrastive_loss, contrastive_loss_local, row_blocks
from kernels.contrastive import chunked, reference
from tests.unit.contrastive_checks import (check_aliased, check_local, check_square, local_inputs,
                                           run_triton_cases, unit)
from tests.unit.triton_support import compiled_triton

TRITON_CASES = Path(__file__).with_name("contrastive_triton_paths.py")
SCALES = [1.0, 14.3, 100.0]
# (n, N, D, offset): one row; odd sizes; D = 300; the local block at the start, middle and end.
LOCAL_CASES = [(1, 1, 3, 0), (7, 7, 5, 0), (5, 23, 300, 11), (37, 37, 33, 0), (40, 129, 64, 89)]
SQUARE_CASES = [(1, 3), (7, 5), (37, 300), (129, 64)]


def _small_blocks(monkeypatch):
    """Blocks of 5 rows, so these small problems cross block edges, the last block partial."""
    monkeypatch.setattr(row_blocks, "TILE_ELEMENTS", 0)
    monkeypatch.setattr(row_blocks, "MIN_ROWS", 5)
    assert chunked._block_rows(12, 1 << 20) == 5


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("n, N, d, offset", LOCAL_CASES)
def test_chunked_local_matches_reference(monkeypatch, n, N, d, offset, dtype, scale):
    _small_blocks(monkeypatch)
    check_local(chunked, n, N, d, offset, scale, dtype, seed=N * 100 + d)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("N, d", SQUARE_CASES)
def test_chunked_square_matches_reference(monkeypatch, N, d, dtype, scale):
    _small_blocks(monkeypatch)
    check_square(chunked, N, d, scale, dtype, seed=N * 100 + d)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_chunked_aliased_columns_sum_both_roles(monkeypatch, dtype):
    _small_blocks(monkeypatch)
    check_aliased(chunked, 23, 300, 14.3, dtype, seed=3)


def test_chunked_half_inputs_accumulate_in_fp32(monkeypatch):
    _small_blocks(monkeypatch)
    check_square(chunked, 37, 300, 100.0, torch.bfloat16, seed=4)
    check_local(chunked, 5, 23, 64, 18, 14.3, torch.float16, seed=5)


def test_chunked_default_blocks_on_a_larger_batch():
    # 4100 columns: 4092-row blocks, the second one partial.
    check_square(chunked, 4100, 16, 14.3, torch.float64, seed=6)
    check_local(chunked, 4096, 4100, 16, 4, 100.0, torch.float64, seed=7)


def test_chunked_never_holds_the_logits(monkeypatch):
    """Every tile the path makes is one block of rows: no [n, N] tensor in forward or backward."""
    _small_blocks(monkeypatch)
    a, b, a_all, b_all = (t.requires_grad_() for t in local_inputs(20, 60, 16, 40, 8, torch.float64))
    biggest = []
    real_mm = torch.mm

    def recording_mm(x, y, **kwargs):
        biggest.append(x.shape[0] * y.shape[1])
        return real_mm(x, y, **kwargs)

    monkeypatch.setattr(chunked.torch, "mm", recording_mm)
    chunked.contrastive_loss_local(a, b, a_all, b_all, 40, torch.tensor(2.0, dtype=torch.float64)).backward()
    assert biggest and max(biggest) <= 5 * 60


def test_chunked_refuses_what_is_undefined():
    a, b, a_all, b_all = local_inputs(4, 12, 8, 0, 1, torch.float64)
    scale = torch.tensor(2.0, dtype=torch.float64)
    with pytest.raises(ValueError, match="offset 9"):
        chunked.contrastive_loss_local(a, b, a_all, b_all, 9, scale)
    with pytest.raises(ValueError, match="shapes do not pair up"):
        chunked.contrastive_loss_local(a, b[:, :4], a_all, b_all, 0, scale)
    with pytest.raises(ValueError, match="share a dtype"):
        chunked.contrastive_loss_local(a, b.float(), a_all, b_all, 0, scale)
    with pytest.raises(ValueError, match="0-dim"):
        chunked.contrastive_loss(a, b, scale.reshape(1))


def test_unknown_backend_is_refused():
    a = unit(4, 8, 1)
    with pytest.raises(ValueError, match="backend must be one of"):
        contrastive_loss(a, a, torch.tensor(1.0, dtype=torch.float64), backend="cuda")


def test_triton_on_cpu_tensors_is_refused_unless_interpreted():
    compiled_triton("kernels.contrastive.triton")
    a = unit(4, 8, 1, torch.float32)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        contrastive_loss(a, a, torch.tensor(1.0), backend="triton")


def test_auto_takes_the_reference_for_small_batches_and_the_tiles_for_large():
    scale = torch.tensor(14.3, requires_grad=True)
    small = unit(64, 8, 1, torch.float32).requires_grad_()
    assert type(contrastive_loss(small, small, scale).grad_fn).__name__ != "_TiledLossBackward"
    side = int(dispatch.CHUNKED_MIN_LOGITS ** 0.5)
    a, b = unit(side, 4, 2, torch.float32).requires_grad_(), unit(side, 4, 3, torch.float32)
    assert type(contrastive_loss(a, b, scale).grad_fn).__name__ == "_TiledLossBackward"


def test_one_process_local_form_takes_the_symmetric_pass(monkeypatch):
    """all_gather_with_grad returns its input in one process: the dispatcher sees a_all is
    a_local and runs the one-pass square form, with the reference's loss and gradients."""
    calls = []
    square = chunked.contrastive_loss
    monkeypatch.setattr(chunked, "contrastive_loss", lambda *args: calls.append(args) or square(*args))
    a, b = unit(37, 16, 9).requires_grad_(), unit(37, 16, 10).requires_grad_()
    scale = torch.tensor(14.3, dtype=torch.float64, requires_grad=True)
    loss = contrastive_loss_local(a, b, a, b, 0, scale, backend="chunked")
    assert len(calls) == 1
    expected = reference.contrastive_loss(a, b, scale)
    assert torch.allclose(loss, expected, rtol=1e-12)
    for got, want in zip(torch.autograd.grad(loss, (a, b, scale)), torch.autograd.grad(expected, (a, b, scale))):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-15)


def _rank_worker(rank, world, port, a_full, b_full, scale_value, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch_dist.init_process_group("gloo", rank=rank, world_size=world)
    row_blocks.TILE_ELEMENTS, row_blocks.MIN_ROWS = 0, 5  # cross block edges, as _small_blocks
    n = a_full.shape[0] // world
    a = a_full[rank * n:(rank + 1) * n].clone().requires_grad_()
    b = b_full[rank * n:(rank + 1) * n].clone().requires_grad_()
    scale = torch.tensor(scale_value, dtype=a.dtype, requires_grad=True)
    loss = contrastive_loss_local(a, b, dist.all_gather_with_grad(a), dist.all_gather_with_grad(b),
                                  rank * n, scale, backend="chunked")
    loss.backward()
    # DeepSpeed averages gradients over ranks; do the same for the scale and the loss.
    scale_grad, loss_mean = scale.grad.clone(), loss.detach().clone()
    torch_dist.all_reduce(scale_grad)
    torch_dist.all_reduce(loss_mean)
    out[rank] = (loss_mean / world, a.grad, b.grad, scale_grad / world)
    torch_dist.destroy_process_group()


def test_two_gloo_ranks_on_the_chunked_path_equal_one_process(monkeypatch):
    _small_blocks(monkeypatch)
    world, n, scale_value = 2, 23, 14.3
    a_full, b_full = unit(world * n, 300, 10), unit(world * n, 300, 11)
    out = mp.Manager().dict()
    mp.spawn(_rank_worker, args=(world, free_port(), a_full, b_full, scale_value, out), nprocs=world)

    a, b = a_full.clone().requires_grad_(), b_full.clone().requires_grad_()
    scale = torch.tensor(scale_value, dtype=a.dtype, requires_grad=True)
    loss = contrastive_loss(a, b, scale, backend="chunked")
    loss.backward()
    for rank in range(world):
        rank_loss, grad_a, grad_b, grad_scale = out[rank]
        rows = slice(rank * n, (rank + 1) * n)
        assert torch.allclose(rank_loss, loss.detach(), rtol=1e-12)
        # The gather's backward sums every rank's loss into each rank's rows: `world` times the
        # global mean's gradient, which DeepSpeed's averaging divides back.
        assert torch.allclose(grad_a / world, a.grad[rows], rtol=1e-10, atol=1e-15)
        assert torch.allclose(grad_b / world, b.grad[rows], rtol=1e-10, atol=1e-15)
        assert torch.allclose(grad_scale, scale.grad, rtol=1e-10)


def test_gpu_benchmark_logic_runs_on_the_cpu():
    """benchmarks/loss_gpu.py's case runner, memory skip and comparisons, on the host clock."""
    from benchmarks import loss_gpu as bench

    clock = bench._Clock("cpu")
    runs = []
    for method, backend in (("ours", "chunked"), ("reference", "reference")):
        def fn(a, b, s, backend=backend):
            return contrastive_loss(a, b, s, backend=backend)
        runs.append(bench.run_case(method, fn, 64, 16, torch.float32, "cpu", clock, 0.01, None))
    assert all(row["status"] == "ok" and row["ms"] > 0 for row in runs)
    skipped = bench.run_case("reference", None, 65536, 512, torch.float32, "cpu", clock, 0.01, 2**30)
    assert skipped["status"] == "skipped" and "64 GiB" in skipped["why"]
    (comparison,) = bench._comparisons(runs)
    assert comparison["speedup_vs_reference"] > 0 and comparison["loss_rel_diff_vs_reference"] < 1e-6


def test_triton_interpreted_on_the_cpu_matches_reference():
    pytest.importorskip("triton")
    run_triton_cases(TRITON_CASES, interpret=True)


gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
GPU_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("N, d, scale", [(8192, 512, 100.0), (4097, 300, 14.3), (1, 512, 1.0)])
def test_triton_on_cuda_square_matches_reference(N, d, scale, dtype):
    check_square(compiled_triton("kernels.contrastive.triton"), N, d, scale, dtype, seed=N + d, device="cuda")


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("n, N, d, offset, scale", [(2048, 8192, 512, 6144, 14.3),
                                                    (1000, 3001, 300, 1000, 100.0)])
def test_triton_on_cuda_local_matches_reference(n, N, d, offset, scale, dtype):
    check_local(compiled_triton("kernels.contrastive.triton"), n, N, d, offset, scale, dtype, seed=N + d, device="cuda")


@gpu
@needs_cuda
def test_auto_takes_triton_on_cuda():
    compiled_triton("kernels.contrastive.triton")
    a, b = unit(8, 16, 1, torch.float32, "cuda").requires_grad_(), unit(8, 16, 2, torch.float32, "cuda")
    loss = contrastive_loss(a, b, torch.tensor(2.0, device="cuda"))
    assert type(loss.grad_fn).__name__ == "_TritonLossBackward"


@gpu
@needs_cuda
def test_triton_compiled_on_cuda_passes_the_small_shape_grid():
    run_triton_cases(TRITON_CASES, interpret=False)
