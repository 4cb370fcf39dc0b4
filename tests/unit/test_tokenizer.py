import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer

from engine.data.text import ClipTokenizer

CAPTIONS = [
    "a photo of a cat",
    "Handwritten SEVEN,   on white paper!",
    "the number 7",
    "café au lait — naïve résumé",
    "",
]


@pytest.fixture(scope="module")
def tokenizer():
    return ClipTokenizer()


def test_vocabulary_and_special_ids(tokenizer):
    assert (tokenizer.vocab_size, tokenizer.sot_id, tokenizer.eot_id, tokenizer.pad_id) == (49408, 49406, 49407, 0)
    assert tokenizer.context_length == 77


def test_rows_are_sot_tokens_eot_then_zero_padding(tokenizer):
    rows = tokenizer(CAPTIONS)
    assert rows.shape == (len(CAPTIONS), 77) and rows.dtype == torch.long
    for text, row in zip(CAPTIONS, rows):
        n = len(tokenizer.encode(text))
        assert row[0] == tokenizer.sot_id
        assert row[n + 1] == tokenizer.eot_id
        assert (row[1:n + 1] < tokenizer.sot_id).all()
        assert (row[n + 2:] == 0).all()
    assert rows[4, :2].tolist() == [tokenizer.sot_id, tokenizer.eot_id]  # empty caption


def test_too_long_caption_is_cut_and_still_ends_with_eot(tokenizer):
    long_caption = " ".join(["digit"] * 200)
    row = tokenizer([long_caption])[0]
    assert row[0] == tokenizer.sot_id and row[-1] == tokenizer.eot_id
    assert (row != 0).all()
    assert row[1:-1].tolist() == tokenizer.encode(long_caption)[:75]


def test_short_context_truncates_the_same_way():
    row = ClipTokenizer(context_length=6)(["one two three four five six seven"])[0]
    assert row.tolist()[0] == 49406 and row.tolist()[-1] == 49407 and len(row) == 6


def test_ids_agree_with_open_clip(tokenizer):
    captions = CAPTIONS + [" ".join(["handwritten"] * 100)]
    assert torch.equal(tokenizer(captions), SimpleTokenizer()(captions, context_length=77))
