"""The contrastive loss reference, and gather-with-grad: 2 gloo ranks == one process."""
import math
import os

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from engine import dist
from engine.dist import free_port
from kernels import contrastive_loss, contrastive_loss_local


def _unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)


def test_matches_hand_computed_value():
    a, b = _unit(5, 7, 0), _unit(5, 7, 1)
    scale = torch.tensor(3.0, dtype=torch.float64)
    logits = scale * a @ b.T
    by_rows = -sum(math.log(logits[i].exp()[i] / logits[i].exp().sum()) for i in range(5)) / 5
    by_cols = -sum(math.log(logits[:, j].exp()[j] / logits[:, j].exp().sum()) for j in range(5)) / 5
    assert contrastive_loss(a, b, scale).item() == pytest.approx((by_rows + by_cols) / 2, rel=1e-12)


def test_matches_open_clip_cliploss():
    from open_clip.loss import ClipLoss

    a, b = _unit(33, 16, 2), _unit(33, 16, 3)
    scale = torch.tensor(14.3, dtype=torch.float64)
    expected = ClipLoss()(a, b, scale)
    assert torch.allclose(contrastive_loss(a, b, scale), expected, rtol=1e-12)


def test_random_start_is_near_log_batch():
    # Unrelated embeddings with a small scale: every column equally likely.
    a, b = _unit(256, 64, 4), _unit(256, 64, 5)
    loss = contrastive_loss(a, b, torch.tensor(1.0, dtype=torch.float64))
    assert loss.item() == pytest.approx(math.log(256), rel=0.02)


def test_perfect_alignment_goes_to_zero():
    a = _unit(16, 32, 6)
    assert contrastive_loss(a, a, torch.tensor(100.0, dtype=torch.float64)).item() < 1e-6



def _rank_worker(rank, world, port, a_full, b_full, scale_value, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch_dist.init_process_group("gloo", rank=rank, world_size=world)
    n = a_full.shape[0] // world
    # Leaf tensors standing in for the towers' outputs on this rank.
    a = a_full[rank * n:(rank + 1) * n].clone().requires_grad_()
    b = b_full[rank * n:(rank + 1) * n].clone().requires_grad_()
    scale = torch.tensor(scale_value, dtype=a.dtype, requires_grad=True)
    loss = contrastive_loss_local(a, b, dist.all_gather_with_grad(a), dist.all_gather_with_grad(b),
                                  rank * n, scale)
    loss.backward()
    # DeepSpeed averages gradients over ranks; do the same for the scale, which every rank holds.
    scale_grad = scale.grad.clone()
    torch_dist.all_reduce(scale_grad)
    loss_mean = loss.detach().clone()
    torch_dist.all_reduce(loss_mean)
    out[rank] = (loss_mean / world, a.grad, b.grad, scale_grad / world)
    torch_dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process_on_the_global_batch():
    world, n = 2, 6
    a_full, b_full = _unit(world * n, 8, 7), _unit(world * n, 8, 8)
    scale_value = 9.0
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_rank_worker, args=(world, free_port(), a_full, b_full, scale_value, out), nprocs=world)

    a, b = a_full.clone().requires_grad_(), b_full.clone().requires_grad_()
    scale = torch.tensor(scale_value, dtype=a.dtype, requires_grad=True)
    loss = contrastive_loss(a, b, scale)
    loss.backward()
    for rank in range(world):
        rank_loss, grad_a, grad_b, grad_scale = out[rank]
        rows = slice(rank * n, (rank + 1) * n)
        assert torch.allclose(rank_loss, loss.detach(), rtol=1e-12)
        # A rank's feature gradients carry every rank's loss (the gather's backward sums them),
        # so they are `world` times the global-mean loss's; DeepSpeed's averaging divides back.
        assert torch.allclose(grad_a / world, a.grad[rows], rtol=1e-10)
        assert torch.allclose(grad_b / world, b.grad[rows], rtol=1e-10)
        assert torch.allclose(grad_scale, scale.grad, rtol=1e-10)
