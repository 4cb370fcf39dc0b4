"""A small reader of the WordNet 3.0 database files, for EDA's synonym replacement.

NLTK's reader wants its own directory layout and refuses symlinked paths, while the
synonym lookup EDA needs is two file reads: the word's line in index.<pos> (found by binary
search, as the files are sorted bytewise by lemma) gives synset offsets, and the lines at
those byte offsets in data.<pos> list each synset's lemmas. The files are memory-mapped
on first use, so data-loader workers share the pages instead of each holding a parsed copy.
"""
from __future__ import annotations

import mmap
import os
from functools import lru_cache
from pathlib import Path

from engine.errors import UserError

POS = ("noun", "verb", "adj", "adv")
_REQUIRED = tuple(f"{kind}.{pos}" for kind in ("index", "data") for pos in POS)

# WordNet's own detachment rules (morphy(7WN)): captions say "dogs" and "running", the
# index holds "dog" and "run". Without them most words in a caption would find no synsets.
_SUFFIX_RULES = {
    "noun": (("s", ""), ("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"),
             ("men", "man"), ("ies", "y")),
    "verb": (("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""),
             ("ing", "e"), ("ing", "")),
    "adj": (("er", ""), ("est", ""), ("er", "e"), ("est", "e")),
    "adv": (),
}
SYSTEM_DIR = Path("/usr/share/wordnet")  # where Debian's wordnet-base installs the database
# Bounds the per-process memory of repeated lookups; captions reuse a small vocabulary.
_CACHE_WORDS = 65_536


def _is_database(directory: Path) -> bool:
    return all((directory / name).is_file() for name in _REQUIRED)


def find_wordnet() -> Path | None:
    """The first WordNet 3.0 database directory found, or None when there is none.

    Looks in $WORDNET_DIR, then Debian's /usr/share/wordnet (package wordnet-base), then
    NLTK's ~/nltk_data/corpora/wordnet. A $WORDNET_DIR that is set but holds no database
    is an error rather than a silent fall-through, since the user asked for that copy.
    """
    chosen = os.environ.get("WORDNET_DIR")
    if chosen:
        directory = Path(chosen).expanduser()
        if not _is_database(directory):
            raise UserError(f"WORDNET_DIR={chosen} holds no WordNet database "
                            f"(expected the files {', '.join(_REQUIRED)}); unset it or point it at one")
        return directory
    for directory in (SYSTEM_DIR, Path.home() / "nltk_data" / "corpora" / "wordnet"):
        if _is_database(directory):
            return directory
    return None


def _map(path: Path) -> bytes | mmap.mmap:
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            return b""  # mmap refuses empty files; an empty bytes answers the same searches
        return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)


def _index_line(text: bytes | mmap.mmap, key: bytes) -> bytes | None:
    """Binary search over lines for the one whose first field is key.

    The licence header lines start with two spaces, so their first field is empty and
    sorts before every lemma, which keeps the search valid over the whole file.
    """
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi) // 2
        start = text.rfind(b"\n", 0, mid) + 1  # lo always sits at a line start, so start >= lo
        end = text.find(b"\n", start)
        end = len(text) if end < 0 else end
        line = text[start:end]
        found = line.split(b" ", 1)[0]
        if found == key:
            return line
        if found < key:
            lo = end + 1
        else:
            hi = start
    return None


def _strip_marker(lemma: str) -> str:
    # Adjectives may carry a syntactic marker: "galore(ip)", "outback(a)", "handy(p)".
    return lemma[: lemma.index("(")] if lemma.endswith(")") and "(" in lemma else lemma


class WordNet:
    """Synonym lookup over a WordNet 3.0 database directory (index.* and data.* files).

    Nothing is read at construction beyond checking the files exist; the files are mapped
    on the first lookup. Pickles as just its directory, so spawned data-loader workers
    reopen the files themselves.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not _is_database(self.directory):
            missing = [name for name in _REQUIRED if not (self.directory / name).is_file()]
            raise UserError(f"{self.directory} is not a WordNet database: missing {', '.join(missing)}")
        self._index: dict[str, bytes | mmap.mmap] = {}
        self._data: dict[str, bytes | mmap.mmap] = {}
        self._exceptions: dict[str, dict[str, tuple[str, ...]]] = {}
        self._cached = lru_cache(maxsize=_CACHE_WORDS)(self._lookup)

    def __getstate__(self) -> dict:
        return {"directory": self.directory}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["directory"])

    def synonyms(self, word: str) -> list[str]:
        """Lemmas of every synset of word (noun, verb, adjective, adverb senses in that order,
        each in WordNet's sense order), lower-cased, underscores as spaces, without repeats
        and without the word itself or the base forms it was looked up by."""
        key = "_".join(word.lower().split())
        return list(self._cached(key)) if key else []

    def _lookup(self, key: str) -> tuple[str, ...]:
        excluded = {key.replace("_", " ")}
        found: list[str] = []
        for pos in POS:
            for base, line in self._entries(key, pos):
                excluded.add(base.replace("_", " "))
                for offset in self._offsets(line, pos):
                    found.extend(self._lemmas(pos, offset))
        return tuple(dict.fromkeys(lemma for lemma in found if lemma not in excluded))

    def _entries(self, key: str, pos: str) -> list[tuple[str, bytes]]:
        """Index lines of the word and of its uninflected forms, as WordNet's morphy finds them."""
        exceptions = self._exceptions_for(pos).get(key)
        if exceptions is not None:
            candidates = [key, *exceptions]
        else:
            candidates = [key] + [key[: -len(suffix)] + ending for suffix, ending in _SUFFIX_RULES[pos]
                                  if key.endswith(suffix) and len(key) > len(suffix)]
        if pos not in self._index:
            self._index[pos] = _map(self.directory / f"index.{pos}")
        lines = ((form, _index_line(self._index[pos], form.encode("utf-8"))) for form in dict.fromkeys(candidates))
        return [(form, line) for form, line in lines if line is not None]

    def _offsets(self, line: bytes, pos: str) -> list[int]:
        # index line: lemma pos synset_cnt p_cnt [ptr_symbol...] sense_cnt tagsense_cnt offset...
        fields = line.split()
        try:
            synset_cnt, p_cnt = int(fields[2]), int(fields[3])
            offsets = fields[4 + p_cnt + 2:]
            if len(offsets) != synset_cnt:
                raise ValueError(f"{synset_cnt} synsets announced, {len(offsets)} listed")
            return [int(offset) for offset in offsets]
        except (IndexError, ValueError) as error:
            raise UserError(f"{self.directory}/index.{pos}: malformed line {line[:60]!r} ({error})") from error

    def _lemmas(self, pos: str, offset: int) -> list[str]:
        # data line: offset lex_filenum ss_type w_cnt(2 hex digits) [word lex_id]... p_cnt ...
        if pos not in self._data:
            self._data[pos] = _map(self.directory / f"data.{pos}")
        text = self._data[pos]
        end = text.find(b"\n", offset)
        fields = text[offset: len(text) if end < 0 else end].decode("utf-8").split(" ")
        try:
            if int(fields[0]) != offset:
                raise ValueError(f"line there starts with {fields[0]!r}")
            words = fields[4: 4 + 2 * int(fields[3], 16): 2]
        except (IndexError, ValueError) as error:
            raise UserError(f"{self.directory}/data.{pos}: no synset at byte {offset} ({error})") from error
        return [_strip_marker(word).lower().replace("_", " ") for word in words]

    def _exceptions_for(self, pos: str) -> dict[str, tuple[str, ...]]:
        """Irregular forms from <pos>.exc ("mice mouse"); the file is optional and small."""
        if pos not in self._exceptions:
            table: dict[str, tuple[str, ...]] = {}
            path = self.directory / f"{pos}.exc"
            if path.is_file():
                for line in path.read_text(encoding="utf-8").splitlines():
                    if fields := line.split():
                        table[fields[0]] = tuple(fields[1:])
            self._exceptions[pos] = table
        return self._exceptions[pos]
