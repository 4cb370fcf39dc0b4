"""The WordNet reader and EDA caption augmentation, against a tiny WordNet database built here.

The fixture writes index.<pos>, data.<pos> and noun.exc files in WordNet 3.0's own format
(licence header lines, byte offsets, hex word counts, adjective markers), so the reader is
exercised without the wordnet-base package; one test also reads the real database when present.
"""
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from engine.data import wordnet as wordnet_module
from engine.data.eda import STOP_WORDS, Eda
from engine.data.wordnet import WordNet, find_wordnet
from engine.errors import UserError

HEADER = "  1 This software and database is being provided to you, the LICENSEE, by  \n" \
         "  2 Princeton University under the following license.  \n"

# pos -> synsets, each (ss_type, words as written in data files); sense order as listed.
SYNSETS = {
    "noun": [("n", ["car", "auto", "automobile", "machine", "motorcar"]),
             ("n", ["car", "railcar", "railway_car"]),
             ("n", ["dog", "domestic_dog", "Canis_familiaris"]),
             ("n", ["photograph", "photo", "exposure"]),
             ("n", ["mouse", "computer_mouse"]),
             ("n", ["a", "angstrom"]),
             ("n", ["park", "parkland"])],
    "verb": [("v", ["run", "scat", "scamper"]),
             ("v", ["photograph", "snap", "shoot"])],
    "adj": [("a", ["big", "large"]),
            ("s", ["huge(a)", "immense"])],
    "adv": [("r", ["quickly", "rapidly", "speedily"])],
}


def write_wordnet(directory: Path) -> Path:
    """A WordNet-format database holding SYNSETS, with correct byte offsets."""
    directory.mkdir(parents=True, exist_ok=True)
    for pos, synsets in SYNSETS.items():
        data, senses = HEADER, {}
        for ss_type, words in synsets:
            offset = len(data.encode())
            members = " ".join(f"{word} 0" for word in words)
            data += f"{offset:08d} 03 {ss_type} {len(words):02x} {members} 000 | a gloss  \n"
            for word in words:
                lemma = word.split("(")[0].lower()
                senses.setdefault(lemma, []).append(offset)
        index = HEADER
        for lemma in sorted(senses):
            offsets = " ".join(f"{offset:08d}" for offset in senses[lemma])
            count = len(senses[lemma])
            index += f"{lemma} {pos[0]} {count} 2 @ ~ {count} 0 {offsets}  \n"
        (directory / f"data.{pos}").write_text(data)
        (directory / f"index.{pos}").write_text(index)
    (directory / "noun.exc").write_text("mice mouse\n")
    return directory


@pytest.fixture
def wordnet(tmp_path):
    return WordNet(write_wordnet(tmp_path / "dict"))


# ---------------------------------------------------------------- WordNet reader

def test_synonyms_follow_sense_order_lower_cased_without_the_word(wordnet):
    assert wordnet.synonyms("car") == ["auto", "automobile", "machine", "motorcar", "railcar", "railway car"]
    assert wordnet.synonyms("Dog") == ["domestic dog", "canis familiaris"]
    # noun senses first, then verb senses; repeats dropped
    assert wordnet.synonyms("photograph") == ["photo", "exposure", "snap", "shoot"]
    assert wordnet.synonyms("domestic dog") == ["dog", "canis familiaris"]
    assert wordnet.synonyms("huge") == ["immense"]  # adjective marker "(a)" stripped
    assert wordnet.synonyms("immense") == ["huge"]
    assert wordnet.synonyms("quickly") == ["rapidly", "speedily"]


def test_every_lemma_is_found_and_unknown_words_have_none(wordnet):
    for synsets in SYNSETS.values():
        for _, words in synsets:
            for word in words:
                assert wordnet.synonyms(word.split("(")[0]), word
    for word in ["", "  ", "zebra", "aardvark", "1", "cab", "ca", "carz"]:
        assert wordnet.synonyms(word) == []


def test_inflected_forms_are_looked_up_by_their_base(wordnet):
    assert wordnet.synonyms("cars") == wordnet.synonyms("car")
    assert wordnet.synonyms("mice") == ["computer mouse"]  # from noun.exc
    assert wordnet.synonyms("runs") == ["scat", "scamper"]  # verb rule s -> ""
    assert wordnet.synonyms("parks") == ["parkland"]


def test_reader_pickles_as_its_directory(wordnet):
    wordnet.synonyms("car")  # maps files, fills the cache
    copy = pickle.loads(pickle.dumps(wordnet))
    assert copy.directory == wordnet.directory and copy.synonyms("dog") == wordnet.synonyms("dog")


def test_missing_or_corrupt_database_is_a_user_error(tmp_path):
    directory = write_wordnet(tmp_path / "partial")
    (directory / "data.adv").unlink()
    with pytest.raises(UserError, match="data.adv"):
        WordNet(directory)
    directory = write_wordnet(tmp_path / "corrupt")
    (directory / "data.noun").write_text(HEADER + "nonsense\n")
    with pytest.raises(UserError, match="no synset at byte"):
        WordNet(directory).synonyms("car")


def test_find_wordnet_looks_in_env_then_system_then_nltk(tmp_path, monkeypatch):
    monkeypatch.setattr(wordnet_module, "SYSTEM_DIR", tmp_path / "absent")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("WORDNET_DIR", raising=False)
    assert find_wordnet() is None
    nltk_copy = write_wordnet(tmp_path / "home" / "nltk_data" / "corpora" / "wordnet")
    assert find_wordnet() == nltk_copy
    system_copy = write_wordnet(tmp_path / "system")
    monkeypatch.setattr(wordnet_module, "SYSTEM_DIR", system_copy)
    assert find_wordnet() == system_copy
    chosen = write_wordnet(tmp_path / "chosen")
    monkeypatch.setenv("WORDNET_DIR", str(chosen))
    assert find_wordnet() == chosen
    monkeypatch.setenv("WORDNET_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="WORDNET_DIR"):
        find_wordnet()


@pytest.mark.skipif(not (Path("/usr/share/wordnet") / "index.noun").is_file(),
                    reason="WordNet 3.0 not installed (apt-get install wordnet-base)")
def test_real_wordnet_database():
    real = WordNet("/usr/share/wordnet")
    assert {"automobile", "auto", "motorcar"} <= set(real.synonyms("car"))
    assert "automobile" in real.synonyms("cars")
    assert "photograph" in real.synonyms("photo")
    assert real.synonyms("the") == [] and real.synonyms("qwzx") == []
    caption = "a man riding a horse on the beach"
    assert Eda(real, seed=0)(caption, (0, 1)).split()  # runs end to end on real data


# ---------------------------------------------------------------- EDA

WORDS = ["car", "dog", "photo", "big", "quickly", "run", "tree", "sky", "red", "a", "the", "of", "on", "and"]


def classify(before: str, after: str, wordnet: WordNet | None) -> str:
    """Which EDA edit can explain `after`; fails the test when none can."""
    old, new = before.split(), after.split()
    assert new, f"empty result for {before!r}"
    if new == old:
        return "unchanged"
    if sorted(new) == sorted(old) and len(old) >= 2:
        diff = [i for i in range(len(old)) if old[i] != new[i]]
        i, j = diff
        assert (old[i], old[j]) == (new[j], new[i]), (before, after)
        return "swap"
    if len(new) < len(old):
        it = iter(old)
        assert all(word in it for word in new), f"{after!r} is not a subsequence of {before!r}"
        return "delete"
    assert wordnet is not None, f"{after!r} needs a synonym but there is no WordNet"
    for i, word in enumerate(old):
        for synonym in wordnet.synonyms(word):
            if " ".join(old[:i] + [synonym] + old[i + 1:]) == after:
                assert word.lower() not in STOP_WORDS
                return "synonym"
    raise AssertionError(f"no EDA edit turns {before!r} into {after!r}")


def random_captions(count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    captions = ["car", "the", "a of the on", "a", "of and", "dog dog", "car dog"]
    while len(captions) < count:
        length = int(rng.integers(1, 12))
        captions.append(" ".join(rng.choice(WORDS, size=length)))
    return captions


@pytest.mark.parametrize("with_wordnet", [True, False])
def test_every_result_is_one_edit_and_never_empty(wordnet, with_wordnet):
    source = wordnet if with_wordnet else None
    eda = Eda(source, seed=3)
    kinds = Counter(classify(caption, eda(caption, (1, n)), source)
                    for n, caption in enumerate(random_captions(3000)))
    expected = {"synonym", "swap", "delete", "unchanged"} if with_wordnet else {"swap", "delete", "unchanged"}
    assert set(kinds) == expected


def test_edits_are_drawn_evenly(wordnet):
    # Every word has a synonym and the words are distinct, so each edit is recognisable;
    # deletion leaves the caption as it was with probability 0.9^8.
    caption = "car dog photo big quickly run park mice"
    eda = Eda(wordnet, seed=0)
    kinds = Counter(classify(caption, eda(caption, (0, n)), wordnet) for n in range(3000))
    assert abs(kinds["synonym"] / 3000 - 1 / 3) < 0.04
    assert abs(kinds["swap"] / 3000 - 1 / 3) < 0.04
    assert abs((kinds["delete"] + kinds["unchanged"]) / 3000 - 1 / 3) < 0.04
    assert abs(kinds["unchanged"] / 3000 - 0.9 ** 8 / 3) < 0.03


def test_deletion_drops_about_one_word_in_ten():
    caption = " ".join(f"w{i}" for i in range(50))
    eda = Eda(None, seed=0)
    lengths = [len(eda(caption, (0, n)).split()) for n in range(1000)]
    deleted = [50 - length for length in lengths if length != 50]  # swaps keep all 50 words
    assert 400 < len(deleted) < 600
    assert abs(np.mean(deleted) / 50 - 0.1) < 0.01


def test_all_deleted_keeps_one_word_and_one_word_captions_survive(wordnet):
    eda = Eda(None, seed=0)
    results = {eda("car dog", (0, n)) for n in range(2000)}
    assert {"car", "dog", "car dog", "dog car"} == results  # 1% of deletions remove both words
    for source in (None, wordnet):
        results = {Eda(source, seed=1)("car", (0, n)) for n in range(300)}
        assert "car" in results and results <= {"car", *wordnet.synonyms("car")}


def test_stop_words_are_never_replaced(wordnet):
    assert wordnet.synonyms("a")  # "a" has a synonym in the fixture, yet is a stop word
    eda = Eda(wordnet, seed=0)
    for n in range(500):
        result = eda("a of the on a", (0, n))
        assert sorted(result.split()) == sorted("a of the on a".split()) or len(result.split()) < 5


def test_punctuation_stays_around_the_synonym(wordnet):
    eda = Eda(wordnet, seed=0)
    results = {eda("the (car), parked", (0, n)) for n in range(300)}
    assert "the (automobile), parked" in results and "the (railway car), parked" in results


def test_same_key_same_result_different_keys_vary(wordnet):
    caption = "a big dog quickly photo of a car on the run"
    first, again = Eda(wordnet, seed=7), pickle.loads(pickle.dumps(Eda(wordnet, seed=7)))
    assert all(first(caption, (e, n)) == again(caption, (e, n)) for e in range(3) for n in range(100))
    assert len({first(caption, (0, n)) for n in range(100)}) > 30
    assert first(caption, (0, 1)) != first(caption, (1, 0)) or first(caption, (0, 2)) != first(caption, (2, 0))
    other = Eda(wordnet, seed=8)
    assert any(first(caption, (0, n)) != other(caption, (0, n)) for n in range(20))


def test_without_wordnet_only_swap_and_deletion(wordnet):
    caption = "car dog photo big quickly run park mice"
    kinds = Counter(classify(caption, Eda(None, seed=0)(caption, (0, n)), None) for n in range(2000))
    assert abs(kinds["swap"] / 2000 - 0.5) < 0.04 and "synonym" not in kinds


def test_blank_captions_and_bad_keys(wordnet):
    eda = Eda(wordnet, seed=0)
    assert eda("", (0, 0)) == "" and eda("   ", (0, 0)) == "   "
    assert eda("  car   dog ", (0, 0)).count("  ") == 0  # whitespace is normalised
    with pytest.raises(ValueError):
        eda("car", (-1, 0))
    with pytest.raises(ValueError):
        Eda(None, seed=-1)
