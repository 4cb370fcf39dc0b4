"""CLIP's byte-pair tokenizer, usable offline.

open_clip ships the 49,408-token BPE vocabulary inside its wheel, so no download is needed.
We reuse its BPE merge step and build the fixed-length id rows ourselves, so the framing
(start token, end token, zero padding, truncation) is explicit here and tested.
"""
from __future__ import annotations

import re
import unicodedata
from typing import Sequence

import torch
from open_clip.tokenizer import SimpleTokenizer


# CLIP-Lite's caption clean-up (its reference inherits it from VirTex): these characters are
# deleted ("dog's" -> "dogs"), hyphens and slashes become spaces ("black-and-white").
_DELETED = re.compile(r"[,.'!?\"()*#:;~]")
_SPACED = re.compile(r"[-/]")


def strip_punctuation(caption: str) -> str:
    """CLIP-Lite's caption normalisation: lower-case, punctuation out, accents stripped, spaces collapsed."""
    caption = _SPACED.sub(" ", _DELETED.sub("", caption.lower()))
    caption = "".join(char for char in unicodedata.normalize("NFKD", caption) if not unicodedata.combining(char))
    return " ".join(caption.split())


class ClipTokenizer:
    """CLIP BPE (49,408 tokens) from open_clip's bundled vocabulary; works offline.

    Calling it on N captions returns a LongTensor [N, context_length] holding the start token,
    the caption's tokens, the end token, then zeros. A caption too long for the context is cut
    so that the end token still sits in the last position: text towers pool at the end token
    (its position is found with argmax over ids), so it must never be cut away.
    """

    vocab_size: int
    sot_id: int
    eot_id: int
    pad_id: int = 0
    context_length: int

    def __init__(self, context_length: int = 77):
        if context_length < 2:
            raise ValueError(f"context_length must hold at least the start and end tokens, got {context_length}")
        self._bpe = SimpleTokenizer(context_length=context_length)
        self.vocab_size = len(self._bpe.encoder)
        self.sot_id = self._bpe.encoder["<start_of_text>"]
        self.eot_id = self._bpe.encoder["<end_of_text>"]
        self.context_length = context_length

    def encode(self, text: str) -> list[int]:
        """BPE ids of one caption, without start/end tokens (text is cleaned and lower-cased)."""
        return self._bpe.encode(text)

    def __call__(self, texts: Sequence[str]) -> torch.LongTensor:
        if isinstance(texts, str):
            raise TypeError("ClipTokenizer takes a sequence of captions; wrap a single caption in a list")
        rows = torch.full((len(texts), self.context_length), self.pad_id, dtype=torch.long)
        room = self.context_length - 2  # positions left between the start and end tokens
        for row, text in enumerate(texts):
            ids = [self.sot_id, *self.encode(text)[:room], self.eot_id]
            rows[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return rows
