"""Zero-shot and retrieval metrics on embeddings whose answers are known by construction."""
import torch
import torch.nn.functional as F

from engine.eval.retrieval import recall_at_k, retrieval_metrics
from engine.eval.zeroshot import class_prompts, classifier_from_prompts, topk_accuracy


def test_prompts_are_grouped_by_class():
    assert class_prompts(["cat", "dog"], ["a {}", "the {}"]) == ["a cat", "the cat", "a dog", "the dog"]


def test_classifier_averages_templates_then_normalises():
    prompts = F.normalize(torch.tensor([[1.0, 0], [0.6, 0.8], [0, 1.0], [0, 1.0]]), dim=-1)
    classifier = classifier_from_prompts(prompts, num_classes=2)
    assert torch.allclose(classifier[0], F.normalize(torch.tensor([1.6, 0.8]), dim=0))
    assert torch.allclose(classifier[1], torch.tensor([0.0, 1.0]))


def test_topk_accuracy_counts_hits():
    classifier = torch.eye(3)
    images = torch.tensor([[1.0, 0.2, 0], [0.1, 1.0, 0.5], [0.9, 0, 0.8], [0, 0.3, 1.0]])
    labels = torch.tensor([0, 1, 2, 1])
    acc = topk_accuracy(images, classifier, labels, ks=(1, 2))
    assert acc["zeroshot_top1"] == 0.5   # rows 0 and 1 right
    assert acc["zeroshot_top2"] == 1.0


def test_recall_at_k_on_a_known_ranking():
    keys = torch.eye(4)
    # Query 0 ranks its own key first; query 1 second; query 2 third; query 3 last.
    query = torch.tensor([[1.0, 0, 0, 0], [0.9, 0.5, 0, 0], [0.9, 0.8, 0.5, 0], [0.9, 0.8, 0.7, 0.1]])
    r = recall_at_k(query, keys, ks=(1, 2, 3, 4))
    assert r == {1: 0.25, 2: 0.5, 3: 0.75, 4: 1.0}


def test_perfect_pairs_give_full_recall_both_ways():
    x = F.normalize(torch.randn(20, 8), dim=-1)
    m = retrieval_metrics(x, x)
    assert m["retrieval_i2t_r1"] == m["retrieval_t2i_r1"] == 1.0


def test_evaluation_text_gets_the_training_caption_cleaning():
    """CLIP-Lite trains on lower-cased captions without punctuation: the held-out captions and
    the zero-shot prompts must reach its text tower cleaned the same way."""
    from engine.eval.eval_set import EvalSet
    from engine.data.text import ClipTokenizer, strip_punctuation
    from engine.eval.evaluate import evaluate
    from engine.objectives.method import lookup
    from engine.models.two_tower import TwoTower

    tokenizer = ClipTokenizer(32)
    seen: list[str] = []

    def recording(texts):
        seen.extend(texts)
        return tokenizer(texts)

    torch.manual_seed(0)
    model = TwoTower(lookup("clip-lite", "debug").preset, tokenizer.eot_id, tokenizer.sot_id)
    eval_set = EvalSet(images=torch.randn(4, 3, 32, 32), captions=["A Cat.", "the dog!", "A Cat.", "x, y"],
                       labels=torch.tensor([0, 1, 0, 1]), classnames=["cat", "dog"],
                       templates=["a photo of a {}."])
    metrics = evaluate(model, eval_set, recording, torch.device("cpu"), clean_text=strip_punctuation)
    assert seen == ["a cat", "the dog", "a cat", "x y", "a photo of a cat", "a photo of a dog"]
    assert "zeroshot_top1" in metrics
    seen.clear()
    evaluate(model, eval_set, recording, torch.device("cpu"))  # CLIP, DeCLIP: as written
    assert seen[-1] == "a photo of a dog."
