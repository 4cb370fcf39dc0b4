"""The nearest-neighbour reference: brute force agreement, tie order, no gradient, errors."""
import pytest
import torch
import torch.nn.functional as F

from kernels.knn import nearest_neighbors


def _unit(n, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1).to(dtype)


def _brute_force(q, bank, k):
    values, indices = [], []
    for row in q.tolist():
        sims = [sum(x * y for x, y in zip(row, other)) for other in bank.tolist()]
        best = sorted(range(len(sims)), key=lambda j: (-sims[j], j))[:k]
        values.append([sims[j] for j in best])
        indices.append(best)
    return torch.tensor(values, dtype=torch.float64), torch.tensor(indices)


@pytest.mark.parametrize("k", [1, 3, 40])
def test_matches_brute_force(k):
    q, bank = _unit(7, 16, 0), _unit(40, 16, 1)
    values, indices = nearest_neighbors(q, bank, k)
    expected_values, expected_indices = _brute_force(q, bank, k)
    assert values.shape == indices.shape == (7, k) and indices.dtype == torch.int64
    assert torch.equal(indices, expected_indices)
    assert torch.allclose(values, expected_values, rtol=1e-12)
    assert (values[:, :-1] >= values[:, 1:]).all()


def test_ties_go_to_the_lower_index():
    # Exact 0/1 vectors make the tied similarities bit-identical. On this bank torch.topk
    # itself returns the tied indices out of order, so the test does bite.
    bank = torch.zeros(100, 4)
    bank[:, 1] = 1.0
    tied = torch.randperm(100, generator=torch.Generator().manual_seed(2))[:33]
    bank[tied] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    q = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    values, indices = nearest_neighbors(q, bank, k=5)
    assert indices[0].tolist() == sorted(tied.tolist())[:5]
    untied = sorted(set(range(100)) - set(tied.tolist()))
    assert indices[1].tolist() == untied[:5]
    assert (values == 1.0).all()


def test_no_gradient():
    q = _unit(4, 8, 3).requires_grad_()
    bank = _unit(10, 8, 4).requires_grad_()
    values, indices = nearest_neighbors(q, bank, k=2)
    assert not values.requires_grad and not indices.requires_grad


def test_half_bank_ranks_as_its_float32_copy():
    q, bank = _unit(8, 32, 5, torch.bfloat16), _unit(500, 32, 6, torch.bfloat16)
    values, indices = nearest_neighbors(q, bank, k=3)
    expected_values, expected_indices = nearest_neighbors(q.float(), bank.float(), k=3)
    assert values.dtype == torch.float32
    assert torch.equal(values, expected_values) and torch.equal(indices, expected_indices)


@pytest.mark.parametrize("q_shape, bank_shape, k, message", [
    ((2, 4), (5, 4), 0, "k must be"),
    ((2, 4), (5, 4), 6, "k must be"),
    ((2, 4), (5, 4), 1.0, "k must be"),
    ((2, 4), (5, 3), 1, "same D"),
    ((4,), (5, 4), 1, "same D"),
    ((2, 4), (5, 4, 1), 1, "same D"),
])
def test_bad_inputs_raise(q_shape, bank_shape, k, message):
    with pytest.raises(ValueError, match=message):
        nearest_neighbors(torch.zeros(q_shape), torch.zeros(bank_shape), k)
