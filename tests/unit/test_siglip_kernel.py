"""SigLIP's sigmoid loss: the reference against the paper's formula and open_clip, the starting
value at the paper's initialisation, the tiled PyTorch path and the dispatcher against the
reference, 2 gloo ranks == one process on the global batch, and the Triton kernels
(test_siglip_kernel_triton.py: interpreted on the CPU in a subprocess here; compiled on CUDA
under the gpu marker)."""
import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import kernels.siglip as dispatch
from engine import dist
from engine.dist import free_port
from kernels import row_blocks
from kernels.siglip import chunked, reference, siglip_loss, siglip_loss_local
from tests.unit.contrastive_checks import run_triton_cases, unit
from tests.unit.triton_support import compiled_triton

TRITON_CASES = Path(__file__).with_name("test_siglip_kernel_triton.py")

# Largest |path - reference| allowed, relative to the reference's largest entry, per input
# dtype. fp64 and fp32: summation-order noise (fp32 leaves room for CUDA's three-TF32
# products). Half inputs: the reference runs in fp64 on the same rounded inputs, so what
# differs is the gradients' own rounding to the dtype (half an ulp: 2^-9 = 2e-3 for bf16's 8
# bits, 2^-12 = 2.4e-4 for fp16's 11) and, on the Triton path, the sigmoid tile (entries in
# [-1, 1]) rounded to the dtype before its product with the embeddings: a few more half-ulps
# of the largest entry. Measured on these cases: up to 4.4e-3 (bf16) and 2.6e-4 (fp16) on
# Triton, less on the chunked path, which multiplies in fp32. The loss and the scale's
# and bias's gradients are fp32 sums on every path: fp32's tolerance (a half scale's or bias's
# gradient is then rounded to its dtype: that dtype's).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

# (n, N, D, offset, scale, bias): one pair; odd sizes; D = 300; the local block at the start,
# middle and end of the columns; the paper's start (10, -10), a large scale that saturates
# the sigmoids, a positive bias.
LOCAL_CASES = [(1, 1, 3, 0, 10.0, -10.0), (7, 7, 5, 0, 10.0, -10.0), (5, 23, 300, 11, 14.3, -5.0),
               (37, 37, 33, 0, 1.0, 0.0), (40, 129, 64, 89, 100.0, -10.0), (9, 33, 17, 20, 3.0, 2.0)]


def local_inputs(n, N, d, offset, seed, dtype, device="cpu"):
    """(a_local, b_all) as gathering gives them: the local texts sit at `offset` in b_all."""
    return unit(N, d, seed, dtype, device)[offset:offset + n].clone(), unit(N, d, seed + 1, dtype, device)


def loss_and_grads(fn, a, b, scale_value, bias_value, param_dtype):
    """fn(a, b, scale, bias) and its gradients w.r.t. all four."""
    a, b = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    scale, bias = (torch.tensor(v, dtype=param_dtype, device=a.device, requires_grad=True)
                   for v in (scale_value, bias_value))
    loss = fn(a, b, scale, bias)
    return (loss, *torch.autograd.grad(loss, (a, b, scale, bias)))


def check_local(fn, n, N, d, offset, scale, bias, dtype, seed, device="cpu"):
    """fn(a_local, b_all, offset, scale, bias) == reference.siglip_loss_local, the reference
    run in fp64 on the same (rounded) values: the loss and the gradients of a, b, the scale
    and the bias, each in the dtype the path promises. Half inputs run twice: with a fp32 scale
    and bias (what the objective passes) and with ones of their own dtype, which every path
    must use in fp32 (the reference gets their rounded values)."""
    a, b = local_inputs(n, N, d, offset, seed, dtype, device)
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    for param_dtype in dict.fromkeys((wide, dtype)):
        scale, bias = (torch.tensor(v, dtype=param_dtype).item() for v in (scale, bias))
        got = loss_and_grads(lambda *args: fn(args[0], args[1], offset, *args[2:]),
                             a, b, scale, bias, param_dtype)
        expected = loss_and_grads(lambda *args: reference.siglip_loss_local(args[0], args[1], offset, *args[2:]),
                                  a.double(), b.double(), scale, bias, torch.float64)
        what = f"n={n} N={N} D={d} offset={offset} scale={scale} bias={bias} {dtype} params {param_dtype}"
        names = ("loss", "grad a", "grad b", "grad scale", "grad bias")
        dtypes = (wide, dtype, dtype, param_dtype, param_dtype)
        for name, actual, truth, want in zip(names, got, expected, dtypes):
            assert actual.dtype == want, f"{what} {name}: dtype {actual.dtype}, expected {want}"
            scalar = actual.dim() == 0
            tol = TOLERANCE[want]
            # Measured against the natural unit where the truth is smaller: 1 for the scalars,
            # scale / (n sqrt(D)) for the embeddings' gradients (dloss/da_i is scale / n times a
            # sum of unit rows weighted by sigmoids in [-1, 1], entries ~ 1 / sqrt(D)).
            natural = 1.0 if scalar else scale / (n * d ** 0.5)
            atol = tol * max(truth.abs().max().item(), natural)
            torch.testing.assert_close(actual.double().cpu(), truth.cpu(), rtol=tol, atol=atol,
                                       msg=lambda m: f"{what} {name}: {m}")


def _small_blocks(monkeypatch):
    """Blocks of 5 rows, so these small problems cross block edges, the last block partial."""
    monkeypatch.setattr(row_blocks, "TILE_ELEMENTS", 0)
    monkeypatch.setattr(row_blocks, "MIN_ROWS", 5)
    assert chunked._block_rows(12, 1 << 20) == 5


# --- the reference -------------------------------------------------------------------------

def test_reference_matches_the_papers_formula_term_by_term():
    a, b = unit(5, 7, 0), unit(5, 7, 1)
    t, bias = 3.0, -2.0
    total = 0.0
    for i in range(5):
        for j in range(5):
            z = t * float(a[i] @ b[j]) + bias
            label = 1.0 if i == j else -1.0
            total -= math.log(1.0 / (1.0 + math.exp(-label * z)))
    expected = total / 5
    got = siglip_loss(a, b, torch.tensor(t, dtype=torch.float64), torch.tensor(bias, dtype=torch.float64))
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_reference_matches_binary_cross_entropy_and_open_clip():
    """-log sigmoid(l z) is the binary cross-entropy of z against the 0/1 labels; open_clip's
    SigLipLoss (one process) sums -log sigmoid over the pairs and divides by the rows."""
    a, b = unit(33, 16, 2), unit(33, 16, 3)
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    loss = siglip_loss(a, b, scale, bias, backend="reference")
    logits = scale * a @ b.T + bias
    bce = F.binary_cross_entropy_with_logits(logits, torch.eye(33, dtype=torch.float64), reduction="sum") / 33
    assert torch.allclose(loss, bce, rtol=1e-12)
    open_clip_loss = pytest.importorskip("open_clip.loss")
    assert torch.allclose(loss, open_clip_loss.SigLipLoss()(a, b, scale, bias), rtol=1e-12)


def test_starting_loss_is_where_the_papers_initialisation_puts_it():
    """t = exp(log 10) = 10, b = -10, unrelated random unit embeddings: every logit is
    10 c - 10 with c = <x, y> of mean 0 and variance 1/D. A row's positive costs
    softplus(10 - 10 c) ~ 10 - 10 c, each of its N - 1 negatives softplus(10 c - 10)
    ~ e^-10 e^(10 c), whose mean is e^-10 E[e^(10 c)] ~ e^-10 e^(50 / D) (c about Gaussian).
    So the loss is about 10 + (N - 1) e^-10 e^(50 / D): the positives' cost, the negatives'
    almost nothing, as the paper intends for a start that is mostly negatives."""
    N, D = 128, 256
    a, b = unit(N, D, 20), unit(N, D, 21)
    t = torch.tensor(math.log(10.0), dtype=torch.float64).exp()
    bias = torch.tensor(-10.0, dtype=torch.float64)
    loss = siglip_loss(a, b, t, bias).item()
    negatives = (N - 1) * math.exp(-10) * math.exp(50 / D)
    # The positives' cost averages -10 c_ii over N rows: standard deviation 10 / sqrt(N D).
    assert loss == pytest.approx(10 + negatives, abs=5 * 10 / math.sqrt(N * D))
    # Their exact share taken out, what remains is the negatives', within a few per cent of
    # the estimate (e^(10 c) over N (N - 1) pairs averages to well under 1% noise).
    positives = F.softplus(-(t * (a * b).sum(1) + bias)).mean().item()
    assert loss - positives == pytest.approx(negatives, rel=0.05)


def test_perfectly_separated_pairs_cost_what_the_formula_says():
    """Orthonormal embeddings, a_i = b_i: every positive logit is t + b, every negative b."""
    a = torch.eye(6, 8, dtype=torch.float64)
    t, bias = 20.0, -5.0
    loss = siglip_loss(a, a.clone(), torch.tensor(t, dtype=torch.float64), torch.tensor(bias, dtype=torch.float64))
    expected = math.log1p(math.exp(-(t + bias))) + 5 * math.log1p(math.exp(bias))
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_one_process_local_form_is_the_global_batch():
    """all_gather_with_grad returns its input in one process: offset 0, b_all is the texts."""
    a, b = unit(9, 16, 4), unit(9, 16, 5)
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    assert dist.all_gather_with_grad(b) is b
    assert torch.equal(siglip_loss_local(a, dist.all_gather_with_grad(b), 0, scale, bias),
                       siglip_loss(a, b, scale, bias))


def test_scale_and_bias_may_be_numbers():
    a, b = unit(9, 16, 6), unit(9, 16, 7)
    expected = siglip_loss(a, b, torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64))
    for backend in ("reference", "chunked"):
        assert torch.allclose(siglip_loss(a, b, 10.0, -10.0, backend=backend), expected, rtol=1e-12)


# --- the tiled PyTorch path ----------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("n, N, d, offset, scale, bias", LOCAL_CASES)
def test_chunked_matches_reference(monkeypatch, n, N, d, offset, scale, bias, dtype):
    _small_blocks(monkeypatch)
    check_local(chunked.siglip_loss_local, n, N, d, offset, scale, bias, dtype, seed=N * 100 + d)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_chunked_half_inputs_accumulate_in_fp32(monkeypatch, dtype):
    _small_blocks(monkeypatch)
    check_local(chunked.siglip_loss_local, 37, 37, 300, 0, 10.0, -10.0, dtype, seed=4)
    check_local(chunked.siglip_loss_local, 5, 23, 64, 18, 100.0, -3.0, dtype, seed=5)


def test_chunked_default_blocks_on_a_larger_batch():
    # 4100 columns: 4092-row blocks, the second one partial.
    check_local(chunked.siglip_loss_local, 4096, 4100, 8, 4, 10.0, -10.0, torch.float32, seed=6)


def test_chunked_gradcheck(monkeypatch):
    monkeypatch.setattr(row_blocks, "TILE_ELEMENTS", 0)
    monkeypatch.setattr(row_blocks, "MIN_ROWS", 2)
    a, b = local_inputs(5, 11, 4, 3, 8, torch.float64)
    inputs = (a.requires_grad_(), b.requires_grad_(), torch.tensor(2.5, dtype=torch.float64, requires_grad=True),
              torch.tensor(-1.5, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(lambda a, b, s, c: chunked.siglip_loss_local(a, b, 3, s, c), inputs)


def test_chunked_aliased_inputs_sum_both_roles(monkeypatch):
    """The same tensor as images and texts (a degenerate batch): autograd sums both gradients."""
    _small_blocks(monkeypatch)
    x = unit(23, 16, 9)
    results = []
    for fn in (reference.siglip_loss_local, chunked.siglip_loss_local):
        leaf = x.clone().requires_grad_()
        results.append(torch.autograd.grad(fn(leaf, leaf, 0, 10.0, -10.0), leaf)[0])
    assert torch.allclose(results[1], results[0], rtol=1e-10, atol=1e-14)


def test_chunked_never_holds_the_logits(monkeypatch):
    """Every tile the path makes is one block of rows: no [n, N] tensor in forward or backward."""
    _small_blocks(monkeypatch)
    a, b = (t.requires_grad_() for t in local_inputs(20, 60, 16, 40, 8, torch.float64))
    biggest = []
    real_mm = torch.mm

    def recording_mm(x, y, **kwargs):
        biggest.append(x.shape[0] * y.shape[1])
        return real_mm(x, y, **kwargs)

    monkeypatch.setattr(chunked.torch, "mm", recording_mm)
    chunked.siglip_loss_local(a, b, 40, torch.tensor(10.0, dtype=torch.float64),
                              torch.tensor(-10.0, dtype=torch.float64)).backward()
    assert biggest and max(biggest) <= 5 * 60


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_undefined_inputs_are_refused(backend):
    a, b = local_inputs(4, 12, 8, 0, 1, torch.float64)
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    with pytest.raises(ValueError, match="offset 9"):
        siglip_loss_local(a, b, 9, scale, bias, backend=backend)
    with pytest.raises(ValueError, match="shapes do not pair up"):
        siglip_loss_local(a, b[:, :4], 0, scale, bias, backend=backend)
    with pytest.raises(ValueError, match="share a dtype"):
        siglip_loss_local(a, b.float(), 0, scale, bias, backend=backend)
    with pytest.raises(ValueError, match="scale must be a 0-dim"):
        siglip_loss_local(a, b, 0, scale.reshape(1), bias, backend=backend)
    with pytest.raises(ValueError, match="bias must be a 0-dim"):
        siglip_loss_local(a, b, 0, scale, bias.reshape(1), backend=backend)


# --- the dispatcher ------------------------------------------------------------------------

def test_unknown_backend_is_refused():
    a = unit(4, 8, 1)
    with pytest.raises(ValueError, match="backend must be one of"):
        siglip_loss(a, a, 10.0, -10.0, backend="cuda")


def test_triton_on_cpu_tensors_is_refused_unless_interpreted():
    compiled_triton("kernels.siglip.triton")
    a = unit(4, 8, 1, torch.float32)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        siglip_loss(a, a, 10.0, -10.0, backend="triton")


def test_auto_takes_the_reference_for_small_batches_and_the_tiles_for_large(monkeypatch):
    called = []
    for name in ("reference", "chunked"):
        module = getattr(dispatch, name)
        monkeypatch.setattr(module, "siglip_loss_local",
                            lambda *args, _name=name: called.append(_name) or torch.zeros(()))
    siglip_loss_local(unit(64, 4, 1, torch.float32), unit(64, 4, 2, torch.float32), 0, 10.0, -10.0)
    side = int(dispatch.CHUNKED_MIN_LOGITS ** 0.5)
    siglip_loss_local(unit(side // 2, 4, 3, torch.float32), unit(2 * side, 4, 4, torch.float32), 0, 10.0, -10.0)
    assert called == ["reference", "chunked"]


# --- 2 gloo ranks == one process -----------------------------------------------------------

def _rank_worker(rank, world, port, a_full, b_full, scale_value, bias_value, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch_dist.init_process_group("gloo", rank=rank, world_size=world)
    row_blocks.TILE_ELEMENTS, row_blocks.MIN_ROWS = 0, 5  # cross block edges, as _small_blocks
    n = a_full.shape[0] // world
    results = {}
    for backend in ("reference", "chunked"):
        # Leaf tensors standing in for the towers' outputs on this rank.
        a = a_full[rank * n:(rank + 1) * n].clone().requires_grad_()
        b = b_full[rank * n:(rank + 1) * n].clone().requires_grad_()
        scale = torch.tensor(scale_value, dtype=a.dtype, requires_grad=True)
        bias = torch.tensor(bias_value, dtype=a.dtype, requires_grad=True)
        loss = siglip_loss_local(a, dist.all_gather_with_grad(b), rank * n, scale, bias, backend=backend)
        loss.backward()
        # DeepSpeed averages gradients over ranks; do the same for the scalars and the loss.
        scalars = torch.stack([loss.detach(), scale.grad, bias.grad])
        torch_dist.all_reduce(scalars)
        results[backend] = (scalars / world, a.grad, b.grad)
    out[rank] = results
    torch_dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process_on_the_global_batch():
    world, n, scale_value, bias_value = 2, 13, 10.0, -10.0
    a_full, b_full = unit(world * n, 40, 10), unit(world * n, 40, 11)
    # Pull some pairs together so that the positives are not all near the prior.
    a_full = F.normalize(a_full + 0.5 * b_full, dim=-1)
    out = mp.Manager().dict()
    mp.spawn(_rank_worker, args=(world, free_port(), a_full, b_full, scale_value, bias_value, out), nprocs=world)

    a, b = a_full.clone().requires_grad_(), b_full.clone().requires_grad_()
    scale = torch.tensor(scale_value, dtype=a.dtype, requires_grad=True)
    bias = torch.tensor(bias_value, dtype=a.dtype, requires_grad=True)
    loss = siglip_loss(a, b, scale, bias, backend="reference")
    loss.backward()
    expected_scalars = torch.stack([loss.detach(), scale.grad, bias.grad])
    for rank in range(world):
        rows = slice(rank * n, (rank + 1) * n)
        for backend, (scalars, grad_a, grad_b) in out[rank].items():
            assert torch.allclose(scalars, expected_scalars, rtol=1e-10, atol=1e-14), backend
            # Rank r's images appear only in its own loss, its texts in every rank's (the
            # gather's backward sums them): `world` times the global mean's gradient, which
            # DeepSpeed's averaging divides back.
            assert torch.allclose(grad_a / world, a.grad[rows], rtol=1e-10, atol=1e-15), backend
            assert torch.allclose(grad_b / world, b.grad[rows], rtol=1e-10, atol=1e-15), backend


# --- the Triton kernels --------------------------------------------------------------------

def test_triton_interpreted_on_the_cpu_matches_reference():
    """test_siglip_kernel_triton.py in a fresh interpreter with TRITON_INTERPRET=1."""
    compiled_triton("kernels.siglip.triton")
    run_triton_cases(TRITON_CASES, interpret=True)


gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("n, N, d, offset, scale, bias", [(8192, 8192, 512, 0, 10.0, -10.0),
                                                          (2048, 8192, 512, 6144, 14.3, -5.0),
                                                          (1000, 3001, 300, 1000, 100.0, -10.0)])
def test_triton_on_cuda_matches_reference(n, N, d, offset, scale, bias, dtype):
    triton_path = compiled_triton("kernels.siglip.triton")
    check_local(triton_path.siglip_loss_local, n, N, d, offset, scale, bias, dtype, seed=N + d, device="cuda")


@gpu
@needs_cuda
def test_auto_takes_triton_on_cuda():
    compiled_triton("kernels.siglip.triton")
    a, b = unit(8, 16, 1, torch.float32, "cuda").requires_grad_(), unit(8, 16, 2, torch.float32, "cuda")
    loss = siglip_loss(a, b, torch.tensor(10.0, device="cuda"), torch.tensor(-10.0, device="cuda"))
    assert type(loss.grad_fn).__name__ == "_TritonLossBackward"
