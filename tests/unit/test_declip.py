"""DeCLIP's objective: each term against a hand computation, starting values, the NN queue
(order, wrap-around, lookup before enqueue, checkpoint round trip), and 2 gloo ranks against
one process on the global batch: equal where the definitions make them equal, and the exact
relationship where they do not."""
import math
import os

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from engine.data.mlm import IGNORE_INDEX, MASK_ID, VOCAB_WITH_MASK, mask_tokens
from engine.dist import free_port
from engine.errors import UserError
from engine.models.presets import get_preset
from engine.objectives.method import lookup
from engine.models.two_tower import TwoTower
from engine.objectives.declip import DeclipObjective

SOT, EOT, CONTEXT = 49406, 49407, 77


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine their
    synchronisation made these tests several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _build(queue_size=48, seed=0, **options):
    """The debug towers and the objective; the objective's defaults unless `options` say otherwise."""
    torch.manual_seed(seed)
    model = TwoTower(lookup("declip", "debug").preset, EOT, SOT)
    return model, DeclipObjective(model, queue_size=queue_size, seed=seed, **options)


def _batch(size, seed):
    """Random captions framed as the tokenizer frames them, MLM-masked, with an 'EDA' copy
    (one word replaced), and two random 32 px image views."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(size, CONTEXT, dtype=torch.long)
    for row in range(size):
        length = int(torch.randint(4, 20, (1,), generator=g))
        tokens[row, 0], tokens[row, length + 1] = SOT, EOT
        tokens[row, 1:length + 1] = torch.randint(1, SOT, (length,), generator=g)
    text, labels = mask_tokens(tokens, generator=g, vocab_size=VOCAB_WITH_MASK, mask_id=MASK_ID,
                               special_ids=(SOT, EOT))
    text_aug = tokens.clone()
    text_aug[:, 1] = torch.randint(1, SOT, (size,), generator=g)
    return {"image": torch.randn(size, 3, 32, 32, generator=g),
            "image2": torch.randn(size, 3, 32, 32, generator=g),
            "text": text, "mlm_labels": labels, "text_aug": text_aug,
            "sample_id": torch.arange(size)}


def _rows(batch, rows):
    return {key: value[rows] for key, value in batch.items()}


def _ce(logits, labels):
    """Mean over rows of -log softmax(row)[label], by an explicit loop in Python floats (a
    plain float, so that pytest.approx never receives a tensor)."""
    rows = logits.double().tolist()
    terms = [-(row[label] - math.log(sum(math.exp(x) for x in row)))
             for row, label in zip(rows, labels)]
    return sum(terms) / len(terms)


def _embeddings(model, batch):
    """The normalised views the objective contrasts, recomputed outside it."""
    with torch.no_grad():
        images = [F.normalize(model.image_outputs(batch[k]).embedding, dim=-1) for k in ("image", "image2")]
        texts = [F.normalize(model.text_outputs(batch[k]).embedding, dim=-1) for k in ("text", "text_aug")]
    return images, texts


def _nearest(queue, text):
    """Row of `queue` with the largest dot product with each text row, by a loop."""
    return torch.stack([queue[max(range(len(queue)), key=lambda j: float(queue[j] @ t))] for t in text])


@pytest.fixture(scope="module")
def second_step():
    """A fresh objective after one step on batch A, then one on batch B: B's terms, the queue
    as it was before B, and what is needed to recompute B's terms by hand."""
    model, objective = _build(queue_size=48)
    objective(model, _batch(8, seed=1))
    before = objective.rank_state()
    batch = _batch(8, seed=2)
    out = objective(model, batch)
    return model, objective, batch, out, before


def test_clip_is_the_mean_of_four_symmetric_infonce_terms(second_step):
    model, _, batch, out, _ = second_step
    (i1, i2), (t, ta) = _embeddings(model, batch)
    s = model.scale().item()
    labels = list(range(8))
    expected = sum((_ce(s * i @ c.T, labels) + _ce(s * c @ i.T, labels)) / 2
                   for i in (i1, i2) for c in (t, ta)) / 4
    assert out["clip"].dtype == torch.float32
    assert out["clip"].item() == pytest.approx(expected, rel=1e-5)


def test_simsiam_is_negative_cosine_with_heads_on_the_unnormalised_embedding(second_step):
    model, objective, batch, out, _ = second_step
    with torch.no_grad():
        e1, e2 = (model.image_outputs(batch[k]).embedding for k in ("image", "image2"))
        z1, z2 = objective.projector(e1), objective.projector(e2)
        p1, p2 = objective.predictor(z1), objective.predictor(z2)

    def cos(p, z):
        return sum(float(p[i] @ z[i]) / (float(p[i].norm()) * float(z[i].norm())) for i in range(len(p))) / len(p)

    assert out["simsiam"].item() == pytest.approx(-(cos(p1, z2) + cos(p2, z1)) / 2, rel=1e-5)


def test_simsiam_gradient_stops_at_the_targets():
    model, objective = _build()
    batch = _batch(6, seed=14)
    objective(model, batch)["simsiam"].backward()
    params = [*model.image.parameters(), *objective.parameters()]
    got = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    model.zero_grad()
    objective.zero_grad()
    e1, e2 = (model.image_outputs(batch[k]).embedding for k in ("image", "image2"))
    z1, z2 = objective.projector(e1), objective.projector(e2)
    p1, p2 = objective.predictor(z1), objective.predictor(z2)

    def cos(p, z):
        return ((p * z).sum(-1) / (p.norm(dim=-1) * z.norm(dim=-1))).mean()

    (-(cos(p1, z2.detach()) + cos(p2, z1.detach())) / 2).backward()
    for p, g in zip(params, got):
        expected = p.grad if p.grad is not None else torch.zeros_like(p)
        assert torch.allclose(g, expected, rtol=1e-4, atol=1e-7)


def test_mlm_is_cross_entropy_over_the_chosen_positions(second_step):
    model, objective, batch, out, _ = second_step
    with torch.no_grad():
        states = model.text_outputs(batch["text"]).token_states
    w, b = objective.mlm_head.weight, objective.mlm_head.bias
    labels = batch["mlm_labels"]
    chosen = [(r, c) for r in range(labels.shape[0]) for c in range(labels.shape[1]) if labels[r, c] != IGNORE_INDEX]
    assert len(chosen) > 3
    logits = torch.stack([w @ states[r, c] + b for r, c in chosen]).detach()
    assert out["mlm"].item() == pytest.approx(_ce(logits, [int(labels[r, c]) for r, c in chosen]), rel=1e-5)


def test_nn_contrasts_images_with_the_neighbours_in_the_queue_before_the_step(second_step):
    model, _, batch, out, before = second_step
    (i1, i2), (t, ta) = _embeddings(model, batch)
    queue, s = before["queue"], model.scale().item()
    labels = list(range(8))
    # Image-anchored only, one cross-entropy per (image view, text view) pair, averaged.
    expected = sum(_ce(s * i @ _nearest(queue, c).T, labels) for i in (i1, i2) for c in (t, ta)) / 4
    assert out["nn"].item() == pytest.approx(expected, rel=1e-5)


def test_lookup_uses_the_queue_before_this_steps_enqueue():
    model, objective = _build(queue_size=64)
    batch = _batch(8, seed=3)
    first = objective(model, batch)["nn"]
    # Now the queue holds this batch's text views, so each text is its own nearest neighbour
    # and nn becomes the image->text half of the InfoNCE terms; a lookup after the enqueue
    # would already have given that value at the first step.
    second = objective(model, batch)["nn"]
    (i1, i2), (t, ta) = _embeddings(model, batch)
    s, labels = model.scale().item(), list(range(8))
    self_neighbour = sum(_ce(s * i @ c.T, labels) for i in (i1, i2) for c in (t, ta)) / 4
    assert second.item() == pytest.approx(self_neighbour, rel=1e-5)
    assert abs(first.item() - self_neighbour) > 0.05


def test_starting_values_at_random_init():
    model, objective = _build(queue_size=128)
    batch = _batch(32, seed=4)
    out = objective(model, batch)
    # A random linear head on layer-normed states: logits with variance ~1/3 over 49,409 ids.
    assert out["mlm"].item() == pytest.approx(math.log(VOCAB_WITH_MASK), abs=0.5)
    # Unrelated predictor and projector outputs: cosines near 0.
    assert abs(out["simsiam"].item()) < 0.1
    # Random towers give logits s*cos with spread sigma. For exchangeable Gaussian logits
    # Jensen brackets the expected cross-entropy: ln N <= E[CE] <= ln N + sigma^2 / 2.
    (i1, _), (t, _) = _embeddings(model, batch)
    var = (model.scale() * i1 @ t.T).var().item()
    assert math.log(32) - 0.1 < out["clip"].item() < math.log(32) + var / 2 + 0.1
    # With the batch itself in the queue the neighbours are the texts: the same bracket.
    nn_start = objective(model, batch)["nn"].item()
    assert math.log(32) - 0.1 < nn_start < math.log(32) + var / 2 + 0.1


def test_mlm_without_a_chosen_position_is_zero_with_a_finite_gradient():
    model, objective = _build()
    batch = _batch(4, seed=5)
    batch["mlm_labels"] = torch.full_like(batch["mlm_labels"], IGNORE_INDEX)
    out = objective(model, batch)
    assert out["mlm"].item() == 0.0
    sum(objective.weights[k] * v for k, v in out.items()).backward()
    assert torch.equal(objective.mlm_head.weight.grad, torch.zeros_like(objective.mlm_head.weight))
    assert all(torch.isfinite(p.grad).all() for p in [*model.parameters(), *objective.parameters()]
               if p.grad is not None)


def test_queue_is_fifo_with_wrap_around_text_aug_first():
    model, objective = _build(queue_size=5)
    a, b = _batch(2, seed=6), _batch(2, seed=7)
    objective(model, a)
    assert objective.pointer == 4
    objective(model, b)
    (_, (t_a, ta_a)), (_, (t_b, ta_b)) = _embeddings(model, a), _embeddings(model, b)
    # Pushed in order: a's EDA view, a's caption, b's EDA view, b's caption; 8 rows into 5
    # slots: b's rows fill slot 4 and wrap to slots 0-2.
    expected = torch.stack([ta_b[1], t_b[0], t_b[1], t_a[1], ta_b[0]])
    state = objective.rank_state()
    assert state["pointer"] == 3
    assert torch.allclose(state["queue"], expected, atol=1e-6)


def test_a_push_longer_than_the_queue_keeps_its_newest_rows():
    _, objective = _build(queue_size=3)
    objective.rank_state()  # creates the queue
    objective.pointer = 1
    rows = torch.arange(1.0, 6.0)[:, None].expand(5, objective.embed_dim)
    objective._push(rows)
    # Row by row, rows 1-5 go to slots 1, 2, 0, 1, 2: slots hold rows 3, 4, 5, pointer back at 0.
    assert objective.pointer == 0
    assert objective.queue[:, 0].tolist() == [3.0, 4.0, 5.0]


def test_the_queue_starts_seeded_and_is_not_a_buffer_or_parameter():
    _, first = _build(seed=3)
    _, second = _build(seed=3)
    _, other = _build(seed=4)
    q = first.rank_state()["queue"]
    assert torch.equal(q, second.rank_state()["queue"]) and not torch.equal(q, other.rank_state()["queue"])
    assert q.dtype == torch.float32 and torch.allclose(q.norm(dim=-1), torch.ones(len(q)))
    assert not any(t is first.queue for t in [*first.buffers(), *first.parameters()])
    assert all("queue" not in name for name in first.state_dict())


def test_eval_mode_leaves_the_queue_alone():
    model, objective = _build()
    before = objective.rank_state()
    objective.eval()
    objective(model, _batch(4, seed=8))
    after = objective.rank_state()
    assert torch.equal(before["queue"], after["queue"]) and after["pointer"] == before["pointer"]


def test_rank_state_round_trip_restores_identical_losses(tmp_path):
    model, objective = _build(queue_size=40)
    for seed in (9, 10, 11):  # 48 rows into 40 slots: wrapped, pointer mid-queue
        objective(model, _batch(8, seed))
    torch.save(objective.rank_state(), tmp_path / "rank0.pt")
    restored = DeclipObjective(model, queue_size=40, seed=123)  # a different start queue
    restored.load_state_dict(objective.state_dict())            # heads, as the checkpoint restores them
    restored.load_rank_state(torch.load(tmp_path / "rank0.pt"))
    for seed in (12, 13):
        batch = _batch(8, seed)
        expected, got = objective(model, batch), restored(model, batch)
        for name in expected:
            assert torch.equal(expected[name], got[name]), name
    with pytest.raises(UserError, match="queue"):
        DeclipObjective(model, queue_size=41).load_rank_state(objective.rank_state())


def test_a_vocabulary_without_the_mask_token_is_refused():
    model = TwoTower(get_preset("debug"), EOT, SOT)
    with pytest.raises(UserError, match="lookup"):
        DeclipObjective(model, queue_size=8)


# --- 2 gloo ranks against one process on the global batch ---------------------------------

WORLD, PER_RANK, QUEUE = 2, 4, 24


def _global_batches():
    batches = [_batch(WORLD * PER_RANK, seed) for seed in (20, 21)]
    # Rank 0's half with 3 chosen MLM positions, rank 1's with 9: their means differ in weight.
    labels = torch.full_like(batches[1]["mlm_labels"], IGNORE_INDEX)
    for k, (row, col) in enumerate([(0, 1), (1, 2), (3, 1)] + [(r, c) for r in (4, 5, 6) for c in (1, 2, 3)]):
        labels[row, col] = 1000 + k
    batches[1]["mlm_labels"] = labels
    return batches


def _prepare(model):
    # BatchNorm in the image tower uses running statistics, so an image's embedding does not
    # depend on which rank's batch it sits in; the objective's own BatchNorm stays in training.
    model.image.eval()
    return model


def _step_and_grads(model, objective, batches):
    """Terms of two steps; gradients of the rank-independent terms at the second."""
    with torch.no_grad():
        first = objective(model, batches[0])
    second = objective(model, batches[1])
    model.zero_grad()
    (0.4 * second["clip"] + 0.2 * second["nn"]).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return first, second, grads


def _rank_worker(rank, world, port, batches, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch_dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)  # two ranks share the machine's cores
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    local = [_rows(b, rows) for b in batches]
    model, objective = _build(queue_size=QUEUE)
    first, second, grads = _step_and_grads(_prepare(model), objective, local)
    for grad in grads.values():  # DeepSpeed averages gradients over ranks
        torch_dist.all_reduce(grad)
        grad /= world
    _, per_rank = _build(queue_size=QUEUE, enqueue="rank")
    with torch.no_grad():
        per_rank(model, local[0])
    torch.save(({k: v.detach() for k, v in first.items()}, {k: v.detach() for k, v in second.items()},
                grads, objective.rank_state(), per_rank.rank_state()), out_dir / f"rank{rank}.pt")
    torch_dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    batches = _global_batches()
    out_dir = tmp_path_factory.mktemp("declip_ranks")
    # Forked, not spawned: the ranks inherit the imported torch, timm and transformers instead
    # of importing them again (about 10 s each on a busy 2-core machine).
    mp.start_processes(_rank_worker, args=(WORLD, free_port(), batches, out_dir), nprocs=WORLD,
                       start_method="fork")
    ranks = [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]
    model, objective = _build(queue_size=QUEUE)
    single = _step_and_grads(_prepare(model), objective, batches)
    return batches, ranks, single, objective.rank_state()


def test_two_ranks_equal_one_process_for_clip_and_nn(two_ranks):
    _, ranks, (first, second, grads), _ = two_ranks
    for step, single_terms in ((0, first), (1, second)):
        for name in ("clip", "nn"):
            mean = sum(ranks[r][step][name] for r in range(WORLD)) / WORLD
            assert mean.item() == pytest.approx(single_terms[name].item(), rel=1e-5), (step, name)
    for name, grad in grads.items():
        for r in range(WORLD):
            assert torch.allclose(ranks[r][2][name], grad, rtol=1e-4, atol=1e-7), name


def test_global_enqueue_equals_one_process_on_the_concatenated_batch(two_ranks):
    _, ranks, _, single_state = two_ranks
    for r in range(WORLD):
        assert ranks[r][3]["pointer"] == single_state["pointer"] == (2 * 2 * WORLD * PER_RANK) % QUEUE
        assert torch.allclose(ranks[r][3]["queue"], single_state["queue"], atol=1e-6)


def test_rank_enqueue_keeps_each_ranks_own_rows(two_ranks):
    batches, ranks, _, _ = two_ranks
    for r in range(WORLD):
        model, objective = _build(queue_size=QUEUE, enqueue="rank")
        with torch.no_grad():
            objective(_prepare(model), _rows(batches[0], slice(r * PER_RANK, (r + 1) * PER_RANK)))
        assert ranks[r][4]["pointer"] == 2 * PER_RANK
        assert torch.allclose(ranks[r][4]["queue"], objective.rank_state()["queue"], atol=1e-6)
    assert not torch.allclose(ranks[0][4]["queue"], ranks[1][4]["queue"])


def test_simsiam_and_mlm_are_per_rank_quantities(two_ranks):
    batches, ranks, (_, second, _), _ = two_ranks
    halves = []
    for r in range(WORLD):
        model, objective = _build(queue_size=QUEUE)
        with torch.no_grad():
            halves.append(objective(_prepare(model), _rows(batches[1], slice(r * PER_RANK, (r + 1) * PER_RANK))))
    # SimSiam's BatchNorm normalises with this rank's batch statistics (plain BatchNorm, as the
    # reference): each rank computes exactly one process's value on its own rows, and their
    # mean is not the global batch's value.
    simsiam = [ranks[r][1]["simsiam"].item() for r in range(WORLD)]
    for r in range(WORLD):
        assert simsiam[r] == pytest.approx(halves[r]["simsiam"].item(), rel=1e-5)
    assert abs(sum(simsiam) / WORLD - second["simsiam"].item()) > 1e-3
    # MLM averages over each rank's chosen positions (3 and 9 here): one process's mean over
    # all 12 is the count-weighted mean of the ranks' values, not their plain mean.
    mlm = [ranks[r][1]["mlm"].item() for r in range(WORLD)]
    counts = [int((batches[1]["mlm_labels"][r * PER_RANK:(r + 1) * PER_RANK] != IGNORE_INDEX).sum())
              for r in range(WORLD)]
    assert counts == [3, 9]
    for r in range(WORLD):
        assert mlm[r] == pytest.approx(halves[r]["mlm"].item(), rel=1e-5)
    weighted = sum(m * c for m, c in zip(mlm, counts)) / sum(counts)
    assert second["mlm"].item() == pytest.approx(weighted, rel=1e-5)
    assert abs(sum(mlm) / WORLD - weighted) > 1e-3
