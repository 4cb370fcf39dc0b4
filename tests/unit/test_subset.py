"""--data-fraction subsets: sizes, determinism, byte-for-byte copies, atomic and concurrent writes."""
import multiprocessing
import os

import numpy as np
import pytest
from streaming import LocalDataset, MDSWriter

from engine.data import subset as subset_module
from engine.data.subset import ensure_subset
from engine.errors import UserError

COUNT = 60


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """60 samples over several shards, with an extra JSON column and a classes.json beside them."""
    out = tmp_path_factory.mktemp("source") / "mds"
    rng = np.random.default_rng(0)
    columns = {"jpg": "bytes", "txt": "str", "cls": "int", "meta": "json"}
    with MDSWriter(out=str(out), columns=columns, size_limit=2048) as writer:
        for index in range(COUNT):
            writer.write({"jpg": rng.bytes(100 + index), "txt": f"caption {index}", "cls": index % 7,
                          "meta": {"index": index}})
    (out / "classes.json").write_text('{"classnames": ["a"], "templates": ["{}"]}')
    return out


def _samples(path) -> list[dict]:
    dataset = LocalDataset(local=str(path))
    return [dataset[i] for i in range(len(dataset))]


def test_subset_copies_a_fixed_fraction_byte_for_byte(source, tmp_path):
    out = ensure_subset(str(source), 0.25, tmp_path)
    assert out != str(source) and (tmp_path / "subsets").is_dir()
    taken = _samples(out)
    assert len(taken) == 15
    originals = {sample["meta"]["index"]: sample for sample in _samples(source)}
    ids = [sample["meta"]["index"] for sample in taken]
    assert ids == sorted(set(ids))  # distinct, in source order
    for sample in taken:
        assert sample == originals[sample["meta"]["index"]]  # every column as it was
    assert (source / "classes.json").read_text() == (tmp_path / out / "classes.json").read_text()


def test_subset_is_reused_and_independent_of_the_cache(source, tmp_path):
    first = ensure_subset(str(source), 0.25, tmp_path / "one")
    mtime = os.stat(os.path.join(first, "index.json")).st_mtime_ns
    assert ensure_subset(str(source), 0.25, tmp_path / "one") == first
    assert os.stat(os.path.join(first, "index.json")).st_mtime_ns == mtime  # reused, not rewritten
    elsewhere = ensure_subset(str(source), 0.25, tmp_path / "two")
    assert _samples(first) == _samples(elsewhere)


def test_smaller_fractions_nest_and_tiny_ones_keep_one_sample(source, tmp_path):
    index_set = lambda fraction: {s["meta"]["index"] for s in _samples(ensure_subset(str(source), fraction, tmp_path))}
    small, large = index_set(0.1), index_set(0.5)
    assert len(small) == 6 and len(large) == 30 and small < large
    assert len(index_set(1e-6)) == 1


def test_fraction_one_is_the_data_itself_and_bad_input_is_refused(source, tmp_path):
    assert ensure_subset(str(source), 1.0, tmp_path) == str(source)
    assert not (tmp_path / "subsets").exists()
    for fraction in (0.0, -0.5, 1.5):
        with pytest.raises(UserError, match=r"must lie in \(0, 1\]"):
            ensure_subset(str(source), fraction, tmp_path)
    with pytest.raises(UserError, match="copy it to local disk first"):
        ensure_subset("s3://bucket/pairs", 0.5, tmp_path)


def test_a_failed_write_leaves_nothing_behind(source, tmp_path, monkeypatch):
    def crash(*args):
        raise RuntimeError("disk full")

    with monkeypatch.context() as patched:
        patched.setattr(subset_module, "_copy_samples", crash)
        with pytest.raises(RuntimeError, match="disk full"):
            ensure_subset(str(source), 0.5, tmp_path)
    assert os.listdir(tmp_path / "subsets") == []
    assert len(_samples(ensure_subset(str(source), 0.5, tmp_path))) == 30


def test_a_writer_that_loses_the_race_uses_the_winners_subset(source, tmp_path, monkeypatch):
    copy = subset_module._copy_samples

    def slow_copy(*args):  # another process finishes the same subset while this one writes
        copy(*args)
        monkeypatch.setattr(subset_module, "_copy_samples", copy)
        winner.append(ensure_subset(str(source), 0.5, tmp_path))

    winner = []
    monkeypatch.setattr(subset_module, "_copy_samples", slow_copy)
    assert ensure_subset(str(source), 0.5, tmp_path) == winner[0]
    assert os.listdir(tmp_path / "subsets") == [os.path.basename(winner[0])]


def _subset_in_child(args):
    source, cache = args
    return ensure_subset(source, 0.5, cache)


def test_concurrent_callers_agree_on_one_complete_subset(source, tmp_path):
    with multiprocessing.get_context("fork").Pool(4) as pool:
        paths = pool.map(_subset_in_child, [(str(source), tmp_path)] * 8)
    assert len(set(paths)) == 1
    assert os.listdir(tmp_path / "subsets") == [os.path.basename(paths[0])]  # no temporary copies left
    assert len(_samples(paths[0])) == 30
