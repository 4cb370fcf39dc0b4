"""MLM corruption: exact-expectation statistics on a large batch, and the special-id rules.

The batch holds about 155,000 eligible positions, so the chosen fraction has a standard
error near 0.1% and each share of the chosen near 0.2%: the tolerances are 5+ sigma.
"""
import pytest
import torch

from engine.data.mlm import IGNORE_INDEX, MASK_ID, VOCAB_WITH_MASK, mask_rows, mask_tokens

SOT, EOT, PAD, CONTEXT = 49406, 49407, 0, 77
SPECIAL = (SOT, EOT)


def caption_rows(count: int, seed: int = 0) -> torch.LongTensor:
    """Rows framed as ClipTokenizer frames them: sot, 1-75 ordinary ids, eot, zero padding."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.full((count, CONTEXT), PAD, dtype=torch.long)
    lengths = torch.randint(1, CONTEXT - 1, (count,), generator=generator)
    for row, length in enumerate(lengths.tolist()):
        rows[row, 0] = SOT
        rows[row, 1:length + 1] = torch.randint(1, SOT, (length,), generator=generator)
        rows[row, length + 1] = EOT
    return rows


def corrupt(tokens, seed=0, **options):
    options = {"vocab_size": VOCAB_WITH_MASK, "mask_id": MASK_ID, "special_ids": SPECIAL, **options}
    return mask_tokens(tokens, generator=torch.Generator().manual_seed(seed), **options)


@pytest.fixture(scope="module")
def batch():
    tokens = caption_rows(4096)
    masked, labels = corrupt(tokens)
    return tokens, masked, labels


def test_constants_extend_clip_vocabulary_by_one():
    assert (MASK_ID, VOCAB_WITH_MASK) == (49408, 49409)


def test_fifteen_percent_of_eligible_positions_are_chosen(batch):
    tokens, _, labels = batch
    eligible = (tokens != SOT) & (tokens != EOT) & (tokens != PAD)
    chosen = labels != IGNORE_INDEX
    assert eligible.sum() > 150_000
    assert not (chosen & ~eligible).any()  # start, end and padding never chosen
    assert abs(chosen.sum().item() / eligible.sum().item() - 0.15) < 0.005


def test_chosen_split_eighty_ten_ten(batch):
    tokens, masked, labels = batch
    chosen = labels != IGNORE_INDEX
    to_mask = chosen & (masked == MASK_ID)
    to_random = chosen & (masked != MASK_ID) & (masked != tokens)
    unchanged = chosen & (masked == tokens)
    total = chosen.sum().item()
    assert to_mask.sum() + to_random.sum() + unchanged.sum() == total
    assert abs(to_mask.sum().item() / total - 0.8) < 0.015
    # a random draw equal to the original (odds 1 in 49,405) counts as unchanged: negligible
    assert abs(to_random.sum().item() / total - 0.1) < 0.015
    assert abs(unchanged.sum().item() / total - 0.1) < 0.015


def test_labels_are_originals_exactly_at_chosen_positions(batch):
    tokens, masked, labels = batch
    chosen = labels != IGNORE_INDEX
    assert torch.equal(labels[chosen], tokens[chosen])
    assert torch.equal(masked[~chosen], tokens[~chosen])  # nothing changes outside the chosen
    assert not (masked[~chosen] == MASK_ID).any()
    assert labels.dtype == masked.dtype == torch.long and labels.shape == tokens.shape


def test_special_ids_are_never_inserted(batch):
    tokens, masked, labels = batch
    assert torch.equal(masked == SOT, tokens == SOT) and torch.equal(masked == EOT, tokens == EOT)
    assert torch.equal(masked == PAD, tokens == PAD)
    # each row still pools at its own end token (text towers take argmax over ids)
    inserted = masked[(labels != IGNORE_INDEX) & (masked != MASK_ID) & (masked != tokens)]
    assert inserted.min() > PAD and inserted.max() < SOT


def test_random_replacements_cover_exactly_the_ordinary_vocabulary():
    # vocabulary 0..11: pad 0, specials 9 and 10, mask 11 -> replacements from 1..8 only
    tokens = torch.randint(1, 9, (2000, 40), generator=torch.Generator().manual_seed(1))
    tokens[:, 0], tokens[:, -1], tokens[:, -5:-1] = 9, 10, 0
    masked, labels = corrupt(tokens, vocab_size=12, mask_id=11, special_ids=(9, 10))
    chosen = labels != IGNORE_INDEX
    inserted = masked[chosen & (masked != 11)]
    assert set(inserted.unique().tolist()) == set(range(1, 9))
    assert torch.equal(masked[:, [0, -1]], tokens[:, [0, -1]]) and not masked[:, -5:-1].any()


def test_same_seed_same_result_and_input_untouched():
    tokens = caption_rows(64, seed=2)
    before = tokens.clone()
    first, second = corrupt(tokens, seed=5), corrupt(tokens, seed=5)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert torch.equal(tokens, before)
    other = corrupt(tokens, seed=6)
    assert not torch.equal(first[1], other[1])


def test_consecutive_calls_advance_the_generator():
    tokens = caption_rows(64, seed=3)
    generator = torch.Generator().manual_seed(0)
    options = {"vocab_size": VOCAB_WITH_MASK, "mask_id": MASK_ID, "special_ids": SPECIAL}
    first = mask_tokens(tokens, generator=generator, **options)
    second = mask_tokens(tokens, generator=generator, **options)
    assert not torch.equal(first[1], second[1])


def test_probability_is_respected():
    tokens = caption_rows(1024, seed=4)
    eligible = ((tokens != SOT) & (tokens != EOT) & (tokens != PAD)).sum().item()
    _, labels = corrupt(tokens, probability=0.5)
    assert abs((labels != IGNORE_INDEX).sum().item() / eligible - 0.5) < 0.01
    _, labels = corrupt(tokens, probability=1.0)
    assert (labels != IGNORE_INDEX).sum().item() == eligible


def test_bad_arguments_are_rejected():
    tokens = caption_rows(4)
    with pytest.raises(ValueError, match="LongTensor"):
        corrupt(tokens[0])
    with pytest.raises(ValueError, match="LongTensor"):
        corrupt(tokens.int())
    with pytest.raises(ValueError, match="probability"):
        corrupt(tokens, probability=0.0)
    with pytest.raises(ValueError, match="mask id"):
        corrupt(tokens, mask_id=EOT)
    with pytest.raises(ValueError, match="mask id"):
        corrupt(tokens, mask_id=PAD)


def test_mask_rows_masks_each_row_from_its_own_seed():
    tokens = caption_rows(16, seed=7)
    options = {"vocab_size": VOCAB_WITH_MASK, "mask_id": MASK_ID, "special_ids": SPECIAL}
    seeds = [2**64 - 1 - row * 7919 for row in range(16)]  # the loader's seeds span 64 bits
    masked, labels = mask_rows(tokens, seeds=seeds, **options)
    for row, seed in enumerate(seeds):
        alone = mask_tokens(tokens[row:row + 1], generator=torch.Generator().manual_seed(seed), **options)
        assert torch.equal(masked[row], alone[0][0]) and torch.equal(labels[row], alone[1][0])
    # a row's result does not depend on its neighbours
    reordered = mask_rows(tokens.flip(0), seeds=seeds[::-1], **options)
    assert torch.equal(reordered[0].flip(0), masked) and torch.equal(reordered[1].flip(0), labels)
    with pytest.raises(ValueError, match="one seed per row"):
        mask_rows(tokens, seeds=seeds[:3], **options)
