"""CLIP-Lite's objective: the JSD bound and the prior by hand, the prior's three modes, its
optimizer groups, and global vs local negatives over 2 gloo ranks against one process."""
import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from engine.dist import free_port
from engine.objectives.method import lookup
from engine.models.two_tower import TwoTower
from engine.objectives.clip_lite import ClipLiteObjective, prior_loss
from engine.model_with_loss import ModelWithLoss
from engine.train.lookahead import Lookahead
from engine.train.optim import optimizer_for_plan

SOT, EOT = 49406, 49407
CONTEXT = 32


def _batch(n: int, seed: int) -> dict:
    """32 px images and token rows framed as ClipTokenizer frames them."""
    g = torch.Generator().manual_seed(seed)
    text = torch.zeros(n, CONTEXT, dtype=torch.long)
    for i in range(n):
        length = int(torch.randint(1, 20, (1,), generator=g))
        text[i, 0] = SOT
        text[i, 1:length + 1] = torch.randint(1, 49000, (length,), generator=g)
        text[i, length + 1] = EOT
    return {"image": torch.randn(n, 3, 32, 32, generator=g), "text": text}


def _new_model(seed: int = 0) -> TwoTower:
    torch.manual_seed(seed)
    return TwoTower(lookup("clip-lite", "debug").preset, EOT, SOT)


def _calibrated_model() -> TwoTower:
    """A model in eval mode whose BatchNorm statistics come from one batch: every sample is
    then computed on its own (no batch statistics, no dropout), so a batch split over ranks
    gives the same rows as the whole batch, yet the embeddings differ from sample to sample
    (with BatchNorm's initial statistics they would be nearly identical)."""
    model = _new_model()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # running statistics = the average over the batches seen
    calibration = _batch(64, 99)
    with torch.no_grad():
        model.image_outputs(calibration["image"])
        model.text_outputs(calibration["text"])
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return _calibrated_model()


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_interface_and_weights(model):
    objective = ClipLiteObjective(model)
    assert (objective.image_views, objective.augment, objective.text_aug, objective.mlm,
            objective.strip_punctuation) == (1, "crop_jitter", False, False, True)
    # The reference's config turns the text prior on too (config.py MODEL.LOSS.TEXT_PRIOR).
    assert objective.image_prior is not None and objective.text_prior is not None
    assert objective.weights == {"jsd": 0.9, "prior": 0.1}
    assert objective.rank_state() == {}
    image_only = ClipLiteObjective(model, text_prior=False)
    assert image_only.text_prior is None
    with pytest.raises(ValueError, match="negatives='batch'"):
        ClipLiteObjective(model, negatives="batch")
    with pytest.raises(ValueError, match="prior='on'"):
        ClipLiteObjective(model, prior="on")


def test_jsd_matches_a_hand_computation(model):
    batch = _batch(5, 1)
    with torch.no_grad():
        terms = ClipLiteObjective(model)(model, batch)
        a = F.normalize(model.image_outputs(batch["image"]).embedding, dim=-1).tolist()
        b = F.normalize(model.text_outputs(batch["text"]).embedding, dim=-1).tolist()
        s = model.scale().item()

    def critic(i, j):
        return s * sum(x * y for x, y in zip(a[i], b[j]))

    positives = sum(_softplus(-critic(i, i)) for i in range(5)) / 5
    negatives = sum(_softplus(critic(i, (i + 1) % 5)) for i in range(5)) / 5
    assert terms["jsd"].dtype == torch.float32
    assert terms["jsd"].item() == pytest.approx(positives + negatives, rel=1e-5)


def test_jsd_starts_near_two_ln_two():
    # softplus(x) = ln 2 + x/2 + x^2/8 + ...: with random towers the critic's cosines average
    # ~0 with a variance of order 1/D, so jsd exceeds 2 ln 2 by about s^2 / (4 D): 0.4 for the
    # debug critic (D = 128), 0.025 for rn50's (D = 2048).
    model = _new_model()  # training mode, as at the first step
    with torch.no_grad():
        jsd = ClipLiteObjective(model)(model, _batch(32, 2))["jsd"].item()
    s, d = 1 / 0.07, model.embed_dim
    assert 2 * math.log(2) - 0.05 < jsd < 2 * math.log(2) + s**2 / (2 * d)


def test_prior_by_hand_with_explicit_log_sigmoid(model):
    objective = ClipLiteObjective(model)
    seen = {}
    for name in ("image_prior", "text_prior"):
        getattr(objective, name).register_forward_hook(
            lambda module, args, output, name=name: seen.__setitem__(name, (args[0], output)))
    batch = _batch(6, 3)
    with torch.no_grad():
        prior = objective(model, batch)["prior"]
        features = {"image_prior": model.image_outputs(batch["image"]).features,
                    "text_prior": model.text_outputs(batch["text"]).features}
    expected = 0.0
    for name, (inputs, logits) in seen.items():
        uniform, real = inputs[:6], inputs[6:]
        assert uniform.shape == real.shape and 0 <= uniform.min() and uniform.max() < 1
        assert torch.allclose(real, features[name], atol=1e-6)  # D reads the raw tower features
        d_uniform, d_real = torch.sigmoid(logits[:6]), torch.sigmoid(logits[6:])
        expected += -(torch.log(d_uniform).mean() + torch.log(1 - d_real).mean()).item()
    assert prior.item() == pytest.approx(expected, rel=1e-5)


def test_stable_prior_is_finite_where_log_sigmoid_underflows():
    uniform_logits = torch.tensor([0.3, -1.2])
    real_logits = torch.tensor([-0.5, 0.8])
    naive = -(torch.log(torch.sigmoid(uniform_logits)).mean()
              + torch.log(1 - torch.sigmoid(real_logits)).mean())
    assert prior_loss(uniform_logits, real_logits).item() == pytest.approx(naive.item(), rel=1e-6)
    # A discriminator sure that a feature is real: 1 - sigmoid(200) rounds to 0 in fp32.
    confident = torch.tensor([200.0], requires_grad=True)
    assert torch.isinf(-torch.log(1 - torch.sigmoid(confident.detach()))).all()
    loss = prior_loss(torch.tensor([30.0]), confident)
    loss.backward()
    assert loss.item() == pytest.approx(200.0, rel=1e-6)
    assert confident.grad.item() == pytest.approx(1.0)


def test_adversarial_reverses_the_encoder_gradient_and_leaves_the_discriminator_alone(model):
    cooperative = ClipLiteObjective(model, prior="cooperative")
    adversarial = ClipLiteObjective(model, prior="adversarial")
    adversarial.load_state_dict(cooperative.state_dict())
    g = torch.Generator().manual_seed(4)
    image_features = torch.randn(4, model.image.feature_dim, generator=g)
    text_features = torch.randn(4, model.text_width, generator=g)
    grads = []
    for objective in (cooperative, adversarial):
        image, text = image_features.clone().requires_grad_(), text_features.clone().requires_grad_()
        torch.manual_seed(5)  # the same uniform samples for both
        objective.prior(image, text).backward()
        grads.append((image.grad, text.grad, [p.grad for p in objective.parameters()]))
    (image_c, text_c, d_c), (image_a, text_a, d_a) = grads
    assert image_c.abs().sum() > 0 and text_c.abs().sum() > 0
    assert torch.equal(image_a, -image_c) and torch.equal(text_a, -text_c)
    assert all(torch.equal(x, y) for x, y in zip(d_c, d_a))


def test_prior_off_gives_only_jsd(model):
    off = ClipLiteObjective(model, prior="off")
    assert off.weights == {"jsd": 1.0}
    assert list(off.parameters()) == []
    batch = _batch(4, 6)
    with torch.no_grad():
        terms = off(model, batch)
        with_prior = ClipLiteObjective(model)(model, batch)
    assert list(terms) == ["jsd"]
    assert terms["jsd"].item() == pytest.approx(with_prior["jsd"].item(), rel=1e-6)


def test_optimizer_groups_follow_the_reference(model):
    task = ModelWithLoss(model, ClipLiteObjective(model))
    plan = SimpleNamespace(optimizer="sgd_lookahead", group_lrs=(("image", 0.2), ("text", 1e-3), ("heads", 5e-4)),
                           momentum=0.9, weight_decay=1e-4, zero_stage=1, precision="fp32")
    optimizer = optimizer_for_plan(task, plan)
    assert isinstance(optimizer, Lookahead) and (optimizer.k, optimizer.alpha) == (5, 0.5)
    assert optimizer.optimizer.defaults["momentum"] == 0.9
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    expected = {"model.image.trunk": 0.2, "model.text.transformer": 1e-3, "model.image.proj": 5e-4,
                "model.text.proj": 5e-4, "model.logit_scale": 5e-4, "objective": 5e-4}
    names = dict(task.named_parameters())
    assert len(lr_of) == len(names)
    for name, p in names.items():
        assert lr_of[id(p)] == next(lr for prefix, lr in expected.items() if name.startswith(prefix))
    # The reference decays every parameter, biases, norms and the temperature included.
    assert {g["weight_decay"] for g in optimizer.param_groups} == {1e-4}


def _rank_worker(rank, world, port, state, batch, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two ranks share the cores; more threads only contend
    torch_dist.init_process_group("gloo", rank=rank, world_size=world)
    model = _new_model()
    model.load_state_dict(state)
    model.eval()
    n = batch["image"].shape[0] // world
    shard = {key: value[rank * n:(rank + 1) * n] for key, value in batch.items()}
    for negatives in ("global", "local"):
        model.zero_grad()
        loss = ClipLiteObjective(model, negatives=negatives, prior="off")(model, shard)["jsd"]
        loss.backward()
        # DeepSpeed averages gradients over ranks; so does this.
        grads = {}
        for name, p in model.named_parameters():
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            torch_dist.all_reduce(grad)
            grads[name] = grad / world
        out[(rank, negatives)] = (loss.item(), grads if rank == 0 else None)
    torch_dist.destroy_process_group()


def _single_process(model, batches) -> tuple[float, dict]:
    """The mean of the objective over `batches`, and its gradients, in this process."""
    model.zero_grad()
    objective = ClipLiteObjective(model, prior="off")
    loss = sum(objective(model, b)["jsd"] for b in batches) / len(batches)
    loss.backward()
    return loss.item(), {name: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                         for name, p in model.named_parameters()}


def _assert_close_to_scale(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    # The ranks sum in another order than one process: allow float32 rounding relative to the
    # tensor's largest gradient, not to each (possibly tiny) element.
    tolerance = 1e-5 * want.abs().max().item() + 1e-9
    assert (got - want).abs().max().item() <= tolerance, name


def test_two_gloo_ranks_global_negatives_equal_one_process_local_ones_do_not(model):
    world, n = 2, 4
    batch = _batch(world * n, 7)
    out = mp.Manager().dict()
    mp.spawn(_rank_worker, args=(world, free_port(), model.state_dict(), batch, out), nprocs=world)

    global_loss, global_grads = _single_process(model, [batch])
    shards = [{k: v[r * n:(r + 1) * n] for k, v in batch.items()} for r in range(world)]
    local_loss, local_grads = _single_process(model, shards)
    model.zero_grad()

    for rank in range(world):
        assert out[(rank, "global")][0] == pytest.approx(global_loss, rel=1e-5)
    for name, grad in out[(0, "global")][1].items():
        _assert_close_to_scale(grad, global_grads[name], name)

    # Local negatives train the mean of each rank's own rolled loss. That is not the global
    # batch's loss: the last row of each rank meets its own first caption as its negative,
    # where the global roll pairs it with the next rank's first caption.
    ranks_mean = sum(out[(rank, "local")][0] for rank in range(world)) / world
    assert ranks_mean == pytest.approx(local_loss, rel=1e-5)
    assert abs(local_loss - global_loss) > 1e-3
    for name, grad in out[(0, "local")][1].items():
        _assert_close_to_scale(grad, local_grads[name], name)
    differences = [(out[(0, "local")][1][name] - grad).abs().max().item()
                   for name, grad in global_grads.items()]
    assert max(differences) > 1e-3
