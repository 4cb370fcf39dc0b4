"""The built-in digits dataset and `describe_mds`."""
import io
import json
import multiprocessing
import re
import socket
import subprocess
import sys
import time
from collections import Counter

import pytest
from PIL import Image
from streaming import LocalDataset, MDSWriter

from engine.data.embedded import CLASSNAMES, PROMPT_TEMPLATES, EmbeddedDataset, ensure_digits
from engine.data.mds import describe_mds
from engine.errors import UserError


def _samples(mds_dir):
    dataset = LocalDataset(local=str(mds_dir))
    return [dataset[i] for i in range(len(dataset))]


def test_split_sizes_and_stratified_heldout(digits):
    train, heldout = _samples(digits.train), _samples(digits.heldout)
    assert len(train) + len(heldout) == 1797
    assert 280 <= len(heldout) <= 320
    per_class = Counter(sample["cls"] for sample in heldout)
    assert sorted(per_class) == list(range(10))
    assert max(per_class.values()) - min(per_class.values()) <= 1


def test_heldout_images_never_in_train(digits):
    train_images = {sample["jpg"] for sample in _samples(digits.train)}
    heldout_images = {sample["jpg"] for sample in _samples(digits.heldout)}
    assert len(train_images) == 1497 and len(heldout_images) == 300  # every digit image is distinct
    assert not train_images & heldout_images


def test_samples_are_rgb_png_with_matching_caption(digits):
    for sample in _samples(digits.heldout):
        image = Image.open(io.BytesIO(sample["jpg"]))
        assert (image.format, image.mode, image.size) == ("PNG", "RGB", (32, 32))
        label = sample["cls"]
        assert re.search(rf"\b({CLASSNAMES[label]}|{label})\b", sample["txt"]), sample["txt"]
    captions = [sample["txt"] for sample in _samples(digits.train)]
    assert any(re.search(r"\b\d\b", c) for c in captions) and any(w in c for c in captions for w in CLASSNAMES)


def test_columns_and_classes_json(digits):
    for split in (digits.train, digits.heldout):
        info = describe_mds(str(split))
        assert info.columns == {"jpg": "bytes", "txt": "str", "cls": "int"}
        assert info.classes == {"classnames": list(CLASSNAMES), "templates": list(PROMPT_TEMPLATES)}
        assert json.loads((split / "classes.json").read_text()) == info.classes
    assert describe_mds(str(digits.train)).num_samples == 1497


def test_default_cache_from_env_and_second_call_is_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPZERO_CACHE", str(tmp_path))
    first = ensure_digits()
    assert first == EmbeddedDataset(train=tmp_path / "digits-v1" / "train", heldout=tmp_path / "digits-v1" / "heldout")
    stamp = (first.train / "index.json").stat().st_mtime_ns
    started = time.perf_counter()
    second = ensure_digits()
    assert time.perf_counter() - started < 0.2  # building takes seconds
    assert second == first and (first.train / "index.json").stat().st_mtime_ns == stamp


def _build_in(cache_dir, results):
    results.put(ensure_digits(cache_dir))


def test_two_processes_racing_and_a_crashed_writer(tmp_path):
    # A writer that crashed mid-build left its partial copy behind (its pid is gone).
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    abandoned = tmp_path / f"digits-v1.partial-{socket.gethostname()}-{int(dead.stdout)}"
    (abandoned / "train").mkdir(parents=True)

    context = multiprocessing.get_context("fork")  # children inherit the imports: starts in milliseconds
    results = context.Queue()
    racers = [context.Process(target=_build_in, args=(tmp_path, results)) for _ in range(2)]
    for racer in racers:
        racer.start()
    outcomes = [results.get(timeout=120) for _ in racers]
    for racer in racers:
        racer.join(timeout=30)
        assert racer.exitcode == 0
    assert outcomes[0] == outcomes[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits-v1"]
    assert describe_mds(str(outcomes[0].train)).num_samples == 1497


# ---- describe_mds ---------------------------------------------------------------------------

def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_mds(out, columns, sample):
    with MDSWriter(out=str(out), columns=columns) as writer:
        writer.write(sample)


def test_missing_path_names_the_fix(tmp_path):
    with pytest.raises(UserError, match=r"no such file.*launchers/convert\.py"):
        describe_mds(str(tmp_path / "nowhere"))


def test_directory_without_index_names_convert(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(UserError, match=r"no index\.json.*launchers/convert\.py"):
        describe_mds(str(tmp_path / "images"))


def test_missing_caption_column_lists_found_columns(tmp_path):
    _write_mds(tmp_path / "mds", {"jpg": "bytes", "caption": "str"}, {"jpg": _png(), "caption": "a cat"})
    with pytest.raises(UserError, match=r"missing column\(s\) \['txt'\]; found \['caption', 'jpg'\].*convert\.py"):
        describe_mds(str(tmp_path / "mds"))


def test_image_column_must_hold_raw_bytes(tmp_path):
    _write_mds(tmp_path / "mds", {"jpg": "png", "txt": "str"}, {"jpg": Image.new("RGB", (4, 4)), "txt": "a cat"})
    with pytest.raises(UserError, match=r"`jpg` is encoded as 'png', expected 'bytes'.*convert\.py"):
        describe_mds(str(tmp_path / "mds"))


def test_happy_path_without_classes(tmp_path):
    _write_mds(tmp_path / "mds", {"jpg": "bytes", "txt": "str"}, {"jpg": _png(), "txt": "a cat"})
    info = describe_mds(str(tmp_path / "mds"))
    assert (info.location, info.num_samples, info.columns, info.classes) == (
        str(tmp_path / "mds"), 1, {"jpg": "bytes", "txt": "str"}, None)
