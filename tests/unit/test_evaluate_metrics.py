"""The standalone evaluation's counting: multi-caption retrieval on a hand-made example, mean
per-class recall against scikit-learn, and where class names and templates come from."""
import json

import pytest
import torch
import torch.nn.functional as F

from engine.errors import UserError
from engine.eval.benchmark import classnames_for, mean_per_class_recall, multi_caption_recall, templates_for
from engine.eval.retrieval import retrieval_metrics


def test_multi_caption_recall_counted_by_hand():
    # Image i's embedding is the i-th basis vector, so scores[i, j] = text[j, i]: the score
    # matrix below is written directly. Captions 0, 1 are image 0's; 2 is image 1's; 3, 4 image 2's.
    scores = torch.tensor([[0.2, 0.9, 0.8, 0.3, 0.1],
                           [0.7, 0.6, 0.5, 0.8, 0.4],
                           [0.6, 0.7, 0.3, 0.5, 0.1]])
    image_of_text = torch.tensor([0, 0, 1, 2, 2])
    r = multi_caption_recall(torch.eye(3), scores.T.contiguous(), image_of_text, ks=(1, 2, 3))
    # image -> text, the best own caption's rank (keys scoring strictly higher):
    #   image 0: caption 1 (0.9) is first, though its caption 0 (0.2) is fourth -> rank 0
    #   image 1: caption 2 (0.5) is beaten by 0.7, 0.6, 0.8                  -> rank 3
    #   image 2: caption 3 (0.5) is beaten by 0.6, 0.7                       -> rank 2
    assert (r["retrieval_i2t_r1"], r["retrieval_i2t_r2"], r["retrieval_i2t_r3"]) == pytest.approx((1 / 3, 1 / 3, 2 / 3))
    # text -> image, the own image's rank in each column:
    #   caption 0: 0.2 below 0.7, 0.6 -> 2;  caption 1: 0.9 -> 0;  caption 2: 0.5 below 0.8 -> 1
    #   caption 3: 0.5 below 0.8 -> 1;       caption 4: 0.1 below 0.4 (a tie at 0.1 is no loss) -> 1
    assert (r["retrieval_t2i_r1"], r["retrieval_t2i_r2"], r["retrieval_t2i_r3"]) == pytest.approx((1 / 5, 4 / 5, 1.0))


def test_one_caption_per_image_equals_the_training_evaluation_exactly():
    torch.manual_seed(0)
    image, text = F.normalize(torch.randn(50, 16), dim=-1), F.normalize(torch.randn(50, 16), dim=-1)
    text[7] = text[3]  # a tie, counted the same way by both
    assert multi_caption_recall(image, text, torch.arange(50)) == retrieval_metrics(image, text)


def test_mean_per_class_recall_is_balanced_accuracy():
    from sklearn.metrics import balanced_accuracy_score

    torch.manual_seed(1)
    classifier = F.normalize(torch.randn(4, 8), dim=-1)
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 2, 3, 3, 3])  # unbalanced on purpose
    image = F.normalize(classifier[labels] + 0.9 * torch.randn(len(labels), 8), dim=-1)
    predicted = (image @ classifier.T).argmax(1)
    assert 0 < (predicted == labels).float().mean() < 1  # the example has hits and misses
    expected = balanced_accuracy_score(labels.numpy(), predicted.numpy())
    assert mean_per_class_recall(image, classifier, labels) == pytest.approx(expected)


def test_open_clip_lists_by_name():
    names = classnames_for("imagenet", [f"n{i:08d}" for i in range(1000)])
    assert len(names) == 1000 and names[0] == "tench"
    openai, simple = templates_for("openai", None), templates_for("simple", None)
    assert len(openai) == 80 and len(simple) == 7
    assert all("{}" in t for t in openai + simple) and openai[0].format("dog") == "a bad photo of a dog."


def test_class_files_and_their_templates(tmp_path):
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps({"classnames": ["cat", "dog"], "templates": ["a {}."]}))
    lines = tmp_path / "names.txt"
    lines.write_text("cat\n\ndog\n")
    assert classnames_for(None, ["a_cat", "b_dog"]) == ["a_cat", "b_dog"]
    assert classnames_for(str(classes), ["a", "b"]) == classnames_for(str(lines), ["a", "b"]) == ["cat", "dog"]
    assert templates_for(None, str(classes)) == ["a {}."]         # the class file's own templates
    assert templates_for(None, str(lines)) == templates_for("openai", None)
    with pytest.raises(UserError, match="lists 2 class.*3 class folder"):
        classnames_for(str(classes), ["a", "b", "c"])
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo\n")
    with pytest.raises(UserError, match="needs a {}"):
        templates_for(str(bad), None)
    with pytest.raises(UserError, match="no such file"):
        classnames_for(str(tmp_path / "missing.json"), ["a"])
