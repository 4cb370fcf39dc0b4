"""Zero-shot over an ImageFolder and retrieval over a Karpathy file, through the launcher's own
code (engine/eval/benchmark.py: decoding, prompts, tokenizer, classifier, caption grouping), with
a model built to be exactly right: 100%; the same model with its class texts shuffled scores
its fixed points, about chance."""
import io
import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from engine.data.dali import CLIP_MEAN, CLIP_STD
from engine.data.text import ClipTokenizer
from engine.errors import UserError
from engine.eval.benchmark import retrieval, zeroshot
from engine.eval.load_run import LoadedRun

SIDE = 32


def _colours(count: int) -> list[tuple[int, int, int]]:
    """Solid colours whose directions after CLIP's normalisation are well apart (cosine < 0.95)."""
    chosen, vectors = [], []
    for rgb in itertools.product((0, 64, 128, 192, 255), repeat=3):
        v = F.normalize(_normalised(rgb), dim=0)
        if v.norm() > 0 and all(float(v @ w) < 0.95 for w in vectors):
            chosen.append(rgb)
            vectors.append(v)
        if len(chosen) == count:
            return chosen
    raise AssertionError("not enough distinct colours")


def _normalised(rgb) -> torch.Tensor:
    return (torch.tensor(rgb, dtype=torch.float) / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)


class ColourModel(nn.Module):
    """Image: the mean normalised colour. Text: the colour of the class name found in the prompt
    (each name is one BPE token), through `text_of_class`, which a test may shuffle."""

    def __init__(self, colours, name_tokens, text_of_class):
        super().__init__()
        self.register_buffer("table", torch.stack([_normalised(c) for c in colours])[text_of_class])
        self.name_tokens = torch.tensor(name_tokens)

    def encode_image(self, images):
        return F.normalize(images.float().mean((2, 3)), dim=-1)

    def encode_text(self, tokens):
        found = (tokens[:, :, None] == self.name_tokens[None, None, :]).any(1)   # [N, classes]
        assert (found.sum(1) == 1).all(), "every prompt names exactly one class"
        return F.normalize(self.table[found.float().argmax(1)], dim=-1)


NAMES = ["apple", "boat", "cloud", "drum", "egg", "fish", "grass", "house", "ink", "jam", "kite", "lamp"]


def _png(colour, width=SIDE) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, SIDE), colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """12 classes of solid-colour PNGs, unbalanced (1 to 3 images each), folders in name order."""
    root = tmp_path_factory.mktemp("imagefolder")
    colours = _colours(len(NAMES))
    for index, (name, colour) in enumerate(zip(NAMES, colours)):
        (root / name).mkdir()
        for copy in range(1 + index % 3):
            (root / name / f"{copy}.png").write_bytes(_png(colour, SIDE + 8 * copy))
    (root / NAMES[0] / "notes.txt").write_text("not an image")   # ignored: not an image extension
    (root / NAMES[1] / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # left out, reported
    return root, colours


def _run(colours, text_of_class) -> LoadedRun:
    tokenizer = ClipTokenizer(16)
    name_tokens = [tokenizer.encode(name) for name in NAMES]
    assert all(len(t) == 1 for t in name_tokens)
    model = ColourModel(colours, [t[0] for t in name_tokens], torch.as_tensor(text_of_class)).eval()
    return LoadedRun(model=model, tokenizer=tokenizer, clean_text=None, plan={"method": "clip", "model": "test"},
                     run_dir=None, checkpoint=None, step=0, image_size=SIDE)


def test_a_model_built_to_be_right_scores_everything(folder):
    root, colours = folder
    result = zeroshot(_run(colours, list(range(len(NAMES)))), str(root), templates="simple")
    assert result.metrics == {"zeroshot_top1": 1.0, "zeroshot_top5": 1.0, "zeroshot_mean_per_class_recall": 1.0}
    assert result.counts == {"images": 24, "classes": 12, "templates": 7, "left_out": 1}


def test_shuffled_class_texts_score_their_fixed_points(folder):
    root, colours = folder
    permutation = np.random.default_rng(5).permutation(len(NAMES))
    fixed = permutation == np.arange(len(NAMES))
    counts = np.array([1 + i % 3 for i in range(len(NAMES))])
    result = zeroshot(_run(colours, permutation), str(root), templates="openai")
    # An image is right exactly when its class kept its own text: chance is 1/12 on average.
    assert result.metrics["zeroshot_top1"] == pytest.approx(counts[fixed].sum() / counts.sum())
    assert result.metrics["zeroshot_mean_per_class_recall"] == pytest.approx(fixed.mean())
    assert result.metrics["zeroshot_top1"] <= 0.25 and result.metrics["zeroshot_top5"] < 1.0


def test_class_names_must_fit_the_folders(folder, tmp_path):
    root, colours = folder
    names = tmp_path / "names.txt"
    names.write_text("\n".join(NAMES[:-1]))
    with pytest.raises(UserError, match="lists 11 class"):
        zeroshot(_run(colours, list(range(len(NAMES)))), str(root), classnames=str(names))
    with pytest.raises(UserError, match="not a directory"):
        zeroshot(_run(colours, list(range(len(NAMES)))), str(tmp_path / "nowhere"))


def test_karpathy_retrieval_groups_captions_by_image(tmp_path):
    colours = _colours(len(NAMES))
    (tmp_path / "images").mkdir()
    entries = []
    for i in range(5):
        (tmp_path / "images" / f"{i}.png").write_bytes(_png(colours[i]))
        sentences = [{"raw": f"a {NAMES[i]} here."}, {"raw": f"{NAMES[i]}"}, {"tokens": ["one", NAMES[i]]}][:1 + i % 3]
        entries.append({"filepath": "images", "filename": f"{i}.png", "split": "test", "sentences": sentences})
    entries[4]["split"] = "train"                                     # not in the test split
    (tmp_path / "images" / "3.png").write_bytes(b"\xff\xd8 not a jpeg")  # left out with its captions
    pairs = tmp_path / "dataset_test.json"
    pairs.write_text(json.dumps({"images": entries}))

    result = retrieval(_run(colours, list(range(len(NAMES)))), str(pairs))
    assert result.counts == {"images": 3, "captions": 1 + 2 + 3, "left_out": 1}
    assert set(result.metrics.values()) == {1.0} and len(result.metrics) == 6
    assert result.name == "dataset_test-test"
    # Images 0 and 1 swap their texts: image 2 and its 3 captions stay right, R@1 3/6 text->image.
    shuffled = retrieval(_run(colours, [1, 0, *range(2, len(NAMES))]), str(pairs))
    assert shuffled.metrics["retrieval_i2t_r1"] == pytest.approx(1 / 3)
    assert shuffled.metrics["retrieval_t2i_r1"] == pytest.approx(3 / 6)
    with pytest.raises(UserError, match="no image in split"):
        retrieval(_run(colours, list(range(len(NAMES)))), str(pairs), split="val")
    with pytest.raises(UserError, match="Karpathy-split .json file or an MDS directory"):
        retrieval(_run(colours, list(range(len(NAMES)))), str(tmp_path / "images" / "0.png"))
    with pytest.raises(UserError, match="must be an MDS dataset"):
        retrieval(_run(colours, list(range(len(NAMES)))), str(tmp_path / "images"))


def test_prompts_and_captions_get_the_runs_caption_cleaning(folder, tmp_path):
    """CLIP-Lite's runs load with strip_punctuation (tests/unit/test_evaluate_load.py); whatever
    the run carries is applied to every text before the tokenizer."""
    import dataclasses

    root, colours = folder
    cleaned = []

    def clean(text: str) -> str:
        cleaned.append(text)
        return text.rstrip(".")

    run = dataclasses.replace(_run(colours, list(range(len(NAMES)))), clean_text=clean)
    zeroshot(run, str(root), templates="simple")
    assert len(cleaned) == 7 * len(NAMES) and "itap of a apple." in cleaned
    cleaned.clear()
    (tmp_path / "0.png").write_bytes(_png(colours[0]))
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps({"images": [{"filename": "0.png", "split": "test",
                                             "sentences": [{"raw": "An apple."}, {"raw": "apple"}]}]}))
    retrieval(run, str(pairs))
    assert cleaned == ["An apple.", "apple"]
