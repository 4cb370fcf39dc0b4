"""Masked-language-modelling corruption of token rows, for DeCLIP's text self-supervision.

BERT's recipe as DeCLIP applies it to CLIP token rows: each eligible position is chosen
with probability 0.15; a chosen position becomes the mask token with probability 0.8, a
random ordinary token with 0.1, or stays as it is with 0.1. Independent draws per position
make those the exact expected fractions. Start, end and padding positions are never chosen.

The DeCLIP reference appends one `<|mask|>` token after CLIP's 49,408 BPE ids, so the text
tower's embedding and the MLM head hold 49,409 rows.
"""
from __future__ import annotations

from typing import Sequence

import torch

MASK_ID = 49408
VOCAB_WITH_MASK = 49409
IGNORE_INDEX = -100  # torch cross-entropy's default ignore_index

_MASK_SHARE = 0.8
_RANDOM_SHARE = 0.1


def mask_tokens(
    tokens: torch.LongTensor,
    *,
    generator: torch.Generator,
    vocab_size: int,
    mask_id: int,
    special_ids: Sequence[int],
    pad_id: int = 0,
    probability: float = 0.15,
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """(masked tokens, labels) for token rows [B, L]; the input is left untouched.

    labels hold the original id at chosen positions and IGNORE_INDEX elsewhere. Random
    replacements are drawn uniformly from ids in [0, vocab_size) other than special_ids,
    mask_id and pad_id: a drawn end-of-text id would move the position the text tower pools
    at (a fault of the DeCLIP reference). The draws consumed from `generator` depend only on
    the shape of `tokens`, so equal seeds give equal results whatever the rows contain.
    """
    _check(tokens, probability, mask_id, pad_id, special_ids)
    excluded = _excluded(vocab_size, mask_id, special_ids, pad_id)
    draws = _draw(tokens.shape, generator, _num_ordinary(vocab_size, excluded), tokens.device)
    return _corrupt(tokens, draws, excluded, mask_id, probability)


def mask_rows(
    tokens: torch.LongTensor,
    *,
    seeds: Sequence[int],
    vocab_size: int,
    mask_id: int,
    special_ids: Sequence[int],
    pad_id: int = 0,
    probability: float = 0.15,
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """mask_tokens with one seed per row: row i equals mask_tokens(tokens[i:i+1]) drawn from a
    generator seeded with seeds[i], so a row's masking does not depend on the batch it is in."""
    _check(tokens, probability, mask_id, pad_id, special_ids)
    if len(seeds) != tokens.shape[0]:
        raise ValueError(f"mask_rows needs one seed per row: {len(seeds)} seeds for {tokens.shape[0]} rows")
    excluded = _excluded(vocab_size, mask_id, special_ids, pad_id)
    num_ordinary = _num_ordinary(vocab_size, excluded)
    generator = torch.Generator(device=tokens.device)
    rows = []
    for seed in seeds:
        generator.manual_seed(int(seed))
        rows.append(_draw((1, tokens.shape[1]), generator, num_ordinary, tokens.device))
    draws = tuple(torch.cat(parts) for parts in zip(*rows))
    return _corrupt(tokens, draws, excluded, mask_id, probability)


def _check(tokens, probability, mask_id, pad_id, special_ids) -> None:
    if tokens.dim() != 2 or tokens.dtype != torch.long:
        raise ValueError(f"mask_tokens takes a LongTensor [B, L], got {tuple(tokens.shape)} {tokens.dtype}")
    if not 0.0 < probability <= 1.0:
        raise ValueError(f"MLM probability must lie in (0, 1], got {probability}")
    if mask_id == pad_id or mask_id in special_ids:
        raise ValueError(f"mask id {mask_id} must differ from the padding id {pad_id} "
                         f"and the special ids {list(special_ids)}")


def _excluded(vocab_size, mask_id, special_ids, pad_id) -> list[int]:
    """Ids never chosen nor drawn as replacements, ascending; fails if nothing else is left."""
    excluded = sorted({*map(int, special_ids), int(mask_id), int(pad_id)})
    if _num_ordinary(vocab_size, excluded) <= 0:
        raise ValueError(f"no ordinary token ids left in a vocabulary of {vocab_size} to draw replacements from")
    return excluded


def _num_ordinary(vocab_size: int, excluded: list[int]) -> int:
    return vocab_size - sum(0 <= e < vocab_size for e in excluded)


def _ordinary_ids(index: torch.Tensor, excluded: list[int]) -> torch.Tensor:
    """The index-th ordinary id: the index-th id of [0, vocab) with the excluded ids left out.

    Stepping over each excluded id in ascending order maps indices onto ordinary ids without
    materialising the 49,408-entry table per call (the data workers call this per caption).
    """
    ids = index.clone()
    for excluded_id in excluded:
        if excluded_id >= 0:  # ids below 0 are not in the vocabulary, so nothing to step over
            ids += (ids >= excluded_id).long()
    return ids


def _draw(shape, generator: torch.Generator, num_ordinary: int, device) -> tuple[torch.Tensor, ...]:
    """(choice draw, share draw, replacement index) per position: the only randomness used."""
    return (torch.rand(shape, generator=generator, device=device),
            torch.rand(shape, generator=generator, device=device),
            torch.randint(num_ordinary, shape, generator=generator, device=device))


def _corrupt(tokens, draws, excluded, mask_id, probability):
    choice, share, replacement_index = draws
    eligible = torch.ones_like(tokens, dtype=torch.bool)
    for excluded_id in excluded:
        eligible &= tokens != excluded_id
    chosen = eligible & (choice < probability)
    replacements = _ordinary_ids(replacement_index, excluded)

    masked = tokens.clone()
    to_mask = chosen & (share < _MASK_SHARE)
    to_random = chosen & (share >= _MASK_SHARE) & (share < _MASK_SHARE + _RANDOM_SHARE)
    masked[to_mask] = mask_id
    masked[to_random] = replacements[to_random]
    labels = torch.where(chosen, tokens, torch.full_like(tokens, IGNORE_INDEX))
    return masked, labels
