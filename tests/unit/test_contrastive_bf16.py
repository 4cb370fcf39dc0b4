"""bf16 towers through the objectives: what training under DeepSpeed's bf16 mode relies on.

Each objective's cross terms, fed bf16 embeddings, give the loss and the gradients that the same
embeddings upcast to fp32 give, within the tolerance its kernel promises in bf16 against the
reference (contrastive_checks.py, test_siglip_kernel.py, kernel_checks.py), on both CPU paths:
the reference (small batches) and the tiled one. And `embed` hands the kernels the towers'
dtype: bf16 rows normalised in fp32 and rounded once; fp32 rows bit for bit what they were.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import kernels.contrastive
import kernels.jsd
import kernels.jsd.chunked
import kernels.knn
import kernels.siglip
from engine.data.mlm import MASK_ID, VOCAB_WITH_MASK, mask_tokens
from engine.objectives.method import lookup
from engine.models.two_tower import TwoTower
from engine.objectives.base import unit_rows
from engine.objectives.registry import objective_class
from kernels import row_blocks
from tests.unit.contrastive_checks import TOLERANCE as CONTRASTIVE_TOLERANCE, unit
from tests.unit.test_siglip_kernel import TOLERANCE as SIGLIP_TOLERANCE

SOT, EOT = 49406, 49407
OPTIONS = {"clip": {}, "siglip": {}, "clip-lite": {"negatives": "local", "prior": "cooperative"},
           "declip": {"queue_size": 48, "enqueue": "global"}}
METHODS = list(OPTIONS)
# The views each objective's cross terms compare.
VIEWS = {"clip": ("image", "text"), "siglip": ("image", "text"), "clip-lite": ("image", "text"),
         "declip": ("image", "image2", "text", "text_aug")}
# Per objective, its kernel's promise in bf16: (the loss and the temperature's and bias's
# gradients, which are fp32 sums on every path; the embeddings' gradients, relative to their
# largest entry). DeCLIP's clip term is the contrastive kernel; its nn term is fp32 throughout.
# CLIP-Lite's JSD kernel promises one bf16 unit in the last place (kernel_checks._assert_close).
TOLERANCE = {
    "clip": (CONTRASTIVE_TOLERANCE[torch.float32], CONTRASTIVE_TOLERANCE[torch.bfloat16]),
    "declip": (CONTRASTIVE_TOLERANCE[torch.float32], CONTRASTIVE_TOLERANCE[torch.bfloat16]),
    "siglip": (SIGLIP_TOLERANCE[torch.float32], SIGLIP_TOLERANCE[torch.bfloat16]),
    "clip-lite": (1e-5, torch.finfo(torch.bfloat16).eps),
}
# The autograd node of the term when the tiled path runs (DeCLIP's clip is a sum of four).
TILED_NODE = {"clip": "_TiledLossBackward", "siglip": "_TiledLossBackward", "clip-lite": "_JSDLossBackward"}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from intra-op threads on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _build(method):
    torch.manual_seed(0)
    preset = lookup(method, "debug").preset
    model = TwoTower(preset, EOT, SOT)
    return preset, model, objective_class(method).from_plan(model, OPTIONS[method], seed=0)


def _batch(objective, preset, n, seed):
    """What the objective's loader would yield: 32 px views, framed captions, MLM labels."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(n, preset.context_length, dtype=torch.long)
    for row in range(n):
        length = int(torch.randint(1, 20, (1,), generator=g))
        tokens[row, 0], tokens[row, length + 1] = SOT, EOT
        tokens[row, 1:length + 1] = torch.randint(1, 49000, (length,), generator=g)
    batch = {"image": torch.randn(n, 3, 32, 32, generator=g), "text": tokens}
    if objective.image_views == 2:
        batch["image2"] = torch.randn(n, 3, 32, 32, generator=g)
    if objective.text_aug:
        batch["text_aug"] = tokens.clone()
        batch["text_aug"][:, 1] = torch.randint(1, 49000, (n,), generator=g)
    if objective.mlm:
        batch["text"], batch["mlm_labels"] = mask_tokens(tokens, generator=g, vocab_size=VOCAB_WITH_MASK,
                                                         mask_id=MASK_ID, special_ids=(SOT, EOT))
    return batch


def _tiled_path(monkeypatch):
    """Every kernel's tiled path whatever the size, in blocks small enough to cross their edges."""
    monkeypatch.setattr(kernels.contrastive, "CHUNKED_MIN_LOGITS", 0)
    monkeypatch.setattr(kernels.siglip, "CHUNKED_MIN_LOGITS", 0)
    monkeypatch.setattr(kernels.jsd, "CHUNKED_MIN_ELEMENTS", 0)
    monkeypatch.setattr(kernels.knn, "REFERENCE_MAX_SIMILARITIES", 0)
    monkeypatch.setattr(row_blocks, "TILE_ELEMENTS", 0)
    monkeypatch.setattr(row_blocks, "MIN_ROWS", 5)
    monkeypatch.setattr(kernels.jsd.chunked, "BLOCK_ELEMENTS", 1)


def _cross_terms(objective, embeddings, scale_value):
    """The cross terms from leaf copies of `embeddings` and a fp32 temperature (as the task passes
    it), and the gradients of their weighted sum w.r.t. the embeddings, the temperature and
    SigLIP's bias."""
    leaves = {name: x.detach().clone().requires_grad_() for name, x in embeddings.items()}
    scale = torch.tensor(scale_value, requires_grad=True)
    terms = objective.loss_from_embeddings(leaves, scale)
    total = sum(objective.weights[name] * value for name, value in terms.items())
    wrt = {**leaves, "scale": scale, **({"bias": objective.bias} if hasattr(objective, "bias") else {})}
    grads = torch.autograd.grad(total, list(wrt.values()))
    return terms, dict(zip(wrt, grads))


@pytest.mark.parametrize("path", ["reference", "tiled"])
@pytest.mark.parametrize("method", METHODS)
def test_bf16_embeddings_give_the_fp32_loss_and_gradients(monkeypatch, method, path):
    if path == "tiled":
        _tiled_path(monkeypatch)
    preset, model, objective = _build(method)
    embeddings = {name: unit(24, preset.embed_dim, seed, torch.bfloat16) for seed, name in enumerate(VIEWS[method])}
    scale = 10.0 if method == "siglip" else 100.0  # SigLIP's start; the others' clamp (CLIP-Lite's is unclamped)
    # Each run on its own copy: DeCLIP's forward enqueues the step's captions.
    half_objective, full_objective = copy.deepcopy(objective), copy.deepcopy(objective)
    half_terms, half_grads = _cross_terms(half_objective, embeddings, scale)
    full_terms, full_grads = _cross_terms(full_objective, {k: x.float() for k, x in embeddings.items()}, scale)

    loss_tol, grad_tol = TOLERANCE[method]
    if path == "tiled" and method in TILED_NODE:
        assert type(next(iter(half_terms.values())).grad_fn).__name__ == TILED_NODE[method]
    for name, value in half_terms.items():
        assert value.dtype == torch.float32, name
        torch.testing.assert_close(value, full_terms[name], rtol=loss_tol, atol=loss_tol, msg=lambda m: f"{name}: {m}")
    for name, grad in half_grads.items():
        want = full_grads[name]
        assert grad.dtype == (torch.bfloat16 if name in embeddings else torch.float32), name
        tol = grad_tol if name in embeddings else loss_tol
        unit_size = max(want.abs().max().item(), 0.0 if name in embeddings else 1.0)
        torch.testing.assert_close(grad.double(), want.double(), rtol=tol, atol=tol * unit_size,
                                   msg=lambda m: f"d {name}: {m}")
    if method == "declip":
        # The queue stays fp32 and holds the same rows: bf16 rows are exact in fp32.
        assert half_objective.queue.dtype == torch.float32
        assert torch.equal(half_objective.queue, full_objective.queue)


@pytest.mark.parametrize("tower, fed", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
                                         (torch.float32, torch.float32), (torch.float64, torch.float64)], ids=str)
def test_unit_rows_feeds_bf16_as_it_is_and_fp16_as_fp32(tower, fed):
    """The plan's loss_input_dtype row (engine/plan/precision.py): fp16's range is too narrow."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(16, 64, generator=g, dtype=torch.float64) * 20).to(tower)
    rows = unit_rows(x)
    wide = torch.promote_types(tower, torch.float32)
    assert rows.dtype == fed and torch.equal(rows, F.normalize(x.to(wide), dim=-1).to(fed))


def _tower_embeddings(model, batch, names):
    """The towers' unnormalised embedding of each view the objective contrasts."""
    tower = {"image": model.image_outputs, "image2": model.image_outputs,
             "text": model.text_outputs, "text_aug": model.text_outputs}
    return {name: tower[name](batch[name]).embedding for name in names}


@pytest.mark.parametrize("method", METHODS)
def test_embed_hands_the_kernels_the_towers_dtype(method):
    preset, model, objective = _build(method)
    batch = _batch(objective, preset, 6, seed=2)
    model.eval()  # BatchNorm's running statistics: the same rows from every forward
    with torch.no_grad():
        embeddings = objective.embed(model, batch)[0]
        raw = _tower_embeddings(model, batch, embeddings)
    assert tuple(embeddings) == VIEWS[method]
    for name, x in embeddings.items():
        # fp32 towers: F.normalize's rows, bit for bit what the objectives gave before bf16.
        assert x.dtype == torch.float32 and torch.equal(x, F.normalize(raw[name], dim=-1)), name

    model.to(torch.bfloat16)
    objective.to(torch.bfloat16)
    with torch.no_grad():
        embeddings = objective.embed(model, batch)[0]
        raw = _tower_embeddings(model, batch, embeddings)
    for name, x in embeddings.items():
        # bf16 towers: normalised in fp32, rounded once to bf16 (engine/objectives/base.unit_rows).
        assert x.dtype == torch.bfloat16 and torch.equal(x, F.normalize(raw[name].float(), dim=-1).bfloat16()), name
        assert (x.float().norm(dim=-1) - 1).abs().max().item() < 2 ** -8, name

    # The whole forward in bf16: fp32 losses, bf16 gradients for the towers and heads.
    model.train()
    losses = objective(model, batch)
    assert all(value.dtype == torch.float32 and torch.isfinite(value) for value in losses.values()), losses
    sum(objective.weights[name] * value for name, value in losses.items()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads)
