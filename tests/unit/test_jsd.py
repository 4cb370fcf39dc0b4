"""CLIP-Lite's JSD loss reference: hand values, what theory predicts, gradients, low precision."""
import math

import pytest
import torch
import torch.nn.functional as F

from kernels.jsd import jsd_loss


def _unit(n, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1).to(dtype)


def _softplus(x):
    return math.log1p(math.exp(x))


def test_matches_hand_computed_value():
    a = [[0.6, 0.8], [1.0, 0.0], [0.0, -1.0]]
    b = [[0.8, 0.6], [0.0, 1.0], [-0.6, -0.8]]
    s = 2.5

    def dot(u, v):
        return sum(x * y for x, y in zip(u, v))

    positive = sum(_softplus(-s * dot(a[i], b[i])) for i in range(3)) / 3
    negative = sum(_softplus(s * dot(a[i], b[(i + 1) % 3])) for i in range(3)) / 3
    loss = jsd_loss(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64),
                    torch.tensor(s, dtype=torch.float64))
    assert loss.item() == pytest.approx(positive + negative, rel=1e-12)


@pytest.mark.parametrize("shift", [1, 2, -1, 7])
def test_shift_matches_index_loop(shift):
    a, b = _unit(5, 8, 0), _unit(5, 8, 1)
    s = 4.0
    expected = (sum(_softplus(-s * float(a[i] @ b[i])) for i in range(5)) / 5
                + sum(_softplus(s * float(a[i] @ b[(i + shift) % 5])) for i in range(5)) / 5)
    loss = jsd_loss(a, b, torch.tensor(s, dtype=torch.float64), shift=shift)
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_unrelated_embeddings_give_two_ln_two():
    # softplus(x) = ln 2 + x/2 + x^2/8 + ...: with <a_i, b_j> ~ N(0, 1/D) and D large the
    # linear terms average out and the quadratic one adds only scale^2 / (4 D) = 0.012 here.
    a, b, s = _unit(512, 4096, 2), _unit(512, 4096, 3), 1 / 0.07
    loss = jsd_loss(a, b, torch.tensor(s, dtype=torch.float64)).item()
    assert loss == pytest.approx(2 * math.log(2), abs=0.03)
    assert loss == pytest.approx(2 * math.log(2) + s**2 / (4 * 4096), abs=0.005)


def test_perfect_positives_and_opposite_negatives_go_to_zero():
    # a_i = (-1)^i e_0 with N even: each row matches itself and is opposite to the next one.
    signs = torch.tensor([1.0, -1.0] * 4, dtype=torch.float64)
    a = signs[:, None] * torch.eye(8, dtype=torch.float64)[0]
    losses = [jsd_loss(a, a, torch.tensor(s, dtype=torch.float64)).item() for s in (1.0, 10.0, 100.0)]
    assert losses[0] > losses[1] > losses[2]
    assert losses[2] < 1e-40


def test_orthogonal_negatives_leave_ln_two():
    # Orthogonal negatives have critic value 0 whatever the scale: their term stays softplus(0).
    a = torch.eye(6, dtype=torch.float64)
    loss = jsd_loss(a, a, torch.tensor(100.0, dtype=torch.float64))
    assert loss.item() == pytest.approx(math.log(2), rel=1e-12)


def test_shift_pairs_row_i_with_row_i_plus_shift():
    # b_i = e_i, a_i = (e_i - e_{i+1}) / sqrt 2: only b_{i+1} is opposite to a_i, so only
    # shift = 1 (mod N) finds negatives that push the loss to 0; other shifts are orthogonal.
    n = 5
    b = torch.eye(n, dtype=torch.float64)
    a = (b - torch.roll(b, -1, dims=0)) / math.sqrt(2)
    scale = torch.tensor(100.0, dtype=torch.float64)
    assert jsd_loss(a, b, scale, shift=1).item() < 1e-30
    assert jsd_loss(a, b, scale, shift=1 + n).item() < 1e-30
    for shift in (2, 3, -1):
        assert jsd_loss(a, b, scale, shift=shift).item() == pytest.approx(math.log(2), rel=1e-12)


def test_gradcheck_a_b_scale():
    a = _unit(6, 5, 4).requires_grad_()
    b = _unit(6, 5, 5).requires_grad_()
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(jsd_loss, (a, b, scale))
    assert torch.autograd.gradcheck(lambda a, b, s: jsd_loss(a, b, s, shift=2), (a, b, scale))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_give_float32_close_to_float64(dtype):
    a, b = _unit(64, 32, 6, dtype).requires_grad_(), _unit(64, 32, 7, dtype).requires_grad_()
    scale = torch.tensor(1 / 0.07)
    loss = jsd_loss(a, b, scale)
    assert loss.dtype == torch.float32
    # Against float64 on the same rounded inputs: only float32 arithmetic separates them.
    exact = jsd_loss(a.double(), b.double(), scale.double())
    assert loss.item() == pytest.approx(exact.item(), rel=1e-6)
    # Against the unrounded inputs: the input rounding is all that is left.
    unrounded = jsd_loss(_unit(64, 32, 6), _unit(64, 32, 7), scale.double())
    assert loss.item() == pytest.approx(unrounded.item(), rel=1e-3)
    loss.backward()
    assert a.grad.dtype == dtype and torch.isfinite(a.grad).all() and b.grad is not None


@pytest.mark.parametrize("a_shape, b_shape, shift, scale_shape, message", [
    ((4, 3), (4, 2), 1, (), "same shape"),
    ((4, 3), (5, 3), 1, (), "same shape"),
    ((4,), (4,), 1, (), "same shape"),
    ((1, 3), (1, 3), 1, (), "N >= 2"),
    ((4, 3), (4, 3), 4, (), "multiple of N"),
    ((4, 3), (4, 3), 0, (), "multiple of N"),
    ((4, 3), (4, 3), 1, (1,), "0-dim"),
])
def test_bad_inputs_raise(a_shape, b_shape, shift, scale_shape, message):
    with pytest.raises(ValueError, match=message):
        jsd_loss(torch.zeros(a_shape), torch.zeros(b_shape), torch.ones(scale_shape), shift=shift)
