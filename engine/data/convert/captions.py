"""A caption cell as text: what the table, parquet and Karpathy listings hold in their caption
column, turned into pairs (pairs.Pair) or the reason it is not text."""
from __future__ import annotations

import numbers
from dataclasses import replace
from typing import Iterator

from engine.data.convert.pairs import Pair

# A caption cell holding a dict (a JSON object, a parquet struct) or other data: the reason says what to do.
NOT_TEXT = "caption is not text: name a text column with --caption-column"


def caption_pairs(pair: Pair, caption: object) -> Iterator[Pair]:
    """`pair` with the caption cell of its row: one pair per caption when the cell is a list.

    A list of captions (a JSON array, a parquet list<string>) describes one image several times,
    as COCO does: each caption becomes a sample with the same image, named NAME#k, like the
    sentences of a Karpathy file. The expansion happens here, in the listing, so the blocks a
    resumed conversion checks are cut the same way each time."""
    if not isinstance(caption, (list, tuple)):
        yield captioned(pair, caption)
    elif not caption:
        yield _problem(pair, "empty caption", "an empty list of captions")
    else:
        for number, item in enumerate(caption):
            yield captioned(replace(pair, name=f"{pair.name}#{number}"), item)


def captioned(pair: Pair, caption: object) -> Pair:
    """`pair` with `caption` as text; a problem pair when the cell holds something else than text."""
    if caption is None or isinstance(caption, str):
        return replace(pair, caption=caption)
    if isinstance(caption, bytes):  # a binary column: text in bytes, decoded as the .txt files are
        try:
            return replace(pair, caption=caption.decode("utf-8"))
        except UnicodeDecodeError:
            return _problem(pair, "caption not UTF-8", "")
    if isinstance(caption, numbers.Real) and not isinstance(caption, bool):  # an ID or a year, kept as text
        return replace(pair, caption=str(caption))
    shown = repr(caption)
    return _problem(pair, NOT_TEXT, f"{type(caption).__name__} {shown[:60]}{'...' * (len(shown) > 60)}")


def _problem(pair: Pair, reason: str, detail: str) -> Pair:
    """The pair as a skipped one: its name and why, nothing to read."""
    return replace(pair, image=None, caption=None, label=None, problem=(reason, detail))
