"""Easy Data Augmentation (Wei & Zou, 2019) of captions, as DeCLIP uses it for its second text view.

Each caption gets exactly one of three edits: replace one word by a WordNet synonym, swap
one pair of words, or drop each word with probability 0.1. (EDA's fourth edit, random
insertion, is not among the ones DeCLIP applies.) The edit runs in data workers, not in the
model's forward pass, and its randomness is a function of (seed, *sample_key) alone, so a
resumed run, or a different worker count, reproduces every augmented caption.

Words are whitespace-separated pieces of the caption as given; punctuation attached to a
word stays in place around its synonym. Unlike the EDA reference, captions are not
lower-cased or stripped of non-letters first: the CLIP tokenizer cleans text itself.
"""
from __future__ import annotations

import numpy as np

from engine.data.wordnet import WordNet

DELETE_PROBABILITY = 0.1

# Function words carry little meaning, and their WordNet entries are mostly unrelated
# senses ("a" -> "angstrom", "in" -> "indium"), so synonym replacement never touches them.
STOP_WORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being
below between both but by can could did do does doing down during each few for from further
had has have having he her here hers herself him himself his how i if in into is it its itself
just me more most my myself no nor not now of off on once only or other our ours ourselves out
over own same she should so some such than that the their theirs them themselves then there
these they this those through to too under until up very was we were what when where which
while who whom why will with would you your yours yourself yourselves s t don
""".split())


def _split_affixes(token: str) -> tuple[str, str, str]:
    """(leading non-letters, core, trailing non-letters): "(dogs," -> ("(", "dogs", ",")."""
    start, end = 0, len(token)
    while start < end and not token[start].isalpha():
        start += 1
    while end > start and not token[end - 1].isalpha():
        end -= 1
    return token[:start], token[start:end], token[end:]


class Eda:
    """One EDA edit per caption, reproducible from (seed, *sample_key).

    Without a WordNet database only swap and deletion are drawn from (each with probability
    1/2 instead of 1/3).
    """

    def __init__(self, wordnet: WordNet | None, seed: int):
        if seed < 0:
            raise ValueError(f"EDA seed must be a non-negative integer, got {seed}")
        self.wordnet = wordnet
        self.seed = int(seed)
        self._edits = ((self._replace_synonym,) if wordnet is not None else ()) + (self._swap, self._delete)

    def __call__(self, caption: str, sample_key: tuple[int, ...]) -> str:
        """The caption after one edit; a caption with no words comes back as it was."""
        if any(part < 0 for part in sample_key):
            raise ValueError(f"EDA sample key must hold non-negative integers, got {sample_key}")
        words = caption.split()
        if not words:
            return caption
        rng = np.random.default_rng([self.seed, *(int(part) for part in sample_key)])
        edit = self._edits[rng.integers(len(self._edits))]
        return " ".join(edit(words, rng))

    def _replace_synonym(self, words: list[str], rng: np.random.Generator) -> list[str]:
        """One non-stop word, the first in a random order that has a synonym, becomes a random
        synonym; with no such word the caption is unchanged (as in the EDA reference)."""
        for position in rng.permutation(len(words)):
            prefix, core, suffix = _split_affixes(words[position])
            if not core or core.lower() in STOP_WORDS:
                continue
            synonyms = self.wordnet.synonyms(core)
            if synonyms:
                edited = list(words)
                edited[position] = prefix + synonyms[rng.integers(len(synonyms))] + suffix
                return edited
        return words

    @staticmethod
    def _swap(words: list[str], rng: np.random.Generator) -> list[str]:
        if len(words) < 2:
            return words
        first, second = rng.choice(len(words), size=2, replace=False)
        edited = list(words)
        edited[first], edited[second] = words[second], words[first]
        return edited

    @staticmethod
    def _delete(words: list[str], rng: np.random.Generator) -> list[str]:
        kept = [word for word, draw in zip(words, rng.random(len(words))) if draw >= DELETE_PROBABILITY]
        # An empty caption would tokenize to start/end tokens only: keep one word instead.
        return kept or [words[rng.integers(len(words))]]
