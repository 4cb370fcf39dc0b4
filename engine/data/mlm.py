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
    if tokens.dim() != 2 or tokens.dtype != torch.long:
        raise ValueError(f"mask_tokens takes a LongTensor [B, L], got {tuple(tokens.shape)} {tokens.dtype}")
    if not 0.0 < probability <= 1.0:
        raise ValueError(f"MLM probability must lie in (0, 1], got {probability}")
    if mask_id == pad_id or mask_id in special_ids:
        raise ValueError(f"mask id {mask_id} must differ from the padding id {pad_id} and the special ids {list(special_ids)}")
    excluded = sorted({*map(int, special_ids), int(mask_id), int(pad_id)})

    device = tokens.device
    excluded_ids = torch.tensor(excluded, dtype=torch.long, device=device)
    ordinary = torch.arange(vocab_size, device=device)
    ordinary = ordinary[~torch.isin(ordinary, excluded_ids)]
    if ordinary.numel() == 0:
        raise ValueError(f"no ordinary token ids left in a vocabulary of {vocab_size} to draw replacements from")

    eligible = ~torch.isin(tokens, excluded_ids)
    chosen = eligible & (torch.rand(tokens.shape, generator=generator, device=device) < probability)
    share = torch.rand(tokens.shape, generator=generator, device=device)
    replacements = ordinary[torch.randint(ordinary.numel(), tokens.shape, generator=generator, device=device)]

    masked = tokens.clone()
    to_mask = chosen & (share < _MASK_SHARE)
    to_random = chosen & (share >= _MASK_SHARE) & (share < _MASK_SHARE + _RANDOM_SHARE)
    masked[to_mask] = mask_id
    masked[to_random] = replacements[to_random]
    labels = torch.where(chosen, tokens, torch.full_like(tokens, IGNORE_INDEX))
    return masked, labels
