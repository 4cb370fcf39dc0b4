"""Training data written by another tool: every bad record is replaced by a stand-in of its shard,
deterministically, counted by reason; a mostly bad dataset stops with the converter named."""
import io
from itertools import islice

import numpy as np
import pytest
import torch
from PIL import Image
from streaming import LocalDataset, MDSWriter

from engine.data.loader import TrainLoader
from engine.data.records import (EMPTY_CAPTION, EMPTY_IMAGE, LONG_CAPTION, TOO_SMALL, TRUNCATED, UNDECODABLE,
                                 UNSUPPORTED)
from engine.data.spec import DataSpec
from engine.data.text import ClipTokenizer
from engine.errors import UserError

SAMPLES, MICRO_BATCH = 64, 16


def _encode(seed: int, fmt: str, side: int = 24) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def _hostile_records() -> dict[int, tuple[bytes, str, str]]:
    """Sample id -> (image bytes, caption, the reason it is bad)."""
    gif = io.BytesIO()
    Image.new("P", (24, 24)).save(gif, format="GIF")
    jpeg, png = _encode(100, "JPEG", side=64), _encode(101, "PNG")  # a third of it is past the header
    return {
        3: (np.random.default_rng(0).bytes(700), "sample 3", UNDECODABLE),
        7: (b"", "sample 7", EMPTY_IMAGE),
        11: (_encode(102, "PNG", side=1), "sample 11", TOO_SMALL),
        13: (jpeg[: len(jpeg) // 3], "sample 13", TRUNCATED),
        17: (png[: len(png) // 3], "sample 17", TRUNCATED),  # DALI's CPU decoder segfaulted on these
        19: (_encode(103, "JPEG"), "   ", EMPTY_CAPTION),
        23: (_encode(104, "JPEG"), "scraped page text " * 1_700, LONG_CAPTION),
        29: (gif.getvalue(), "sample 29", UNSUPPORTED),
        40: (png[: len(png) // 2], "sample 40", TRUNCATED),
    }


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile") / "mds"
    bad = _hostile_records()
    # Small shards (about 16 samples each): stand-ins must come from the bad record's own shard.
    with MDSWriter(out=str(out), columns={"jpg": "bytes", "txt": "str"}, size_limit=16 * 1_800) as writer:
        for index in range(SAMPLES):
            image, caption, _ = bad.get(index, (_encode(index, "PNG" if index % 2 else "JPEG"), f"sample {index}", ""))
            writer.write({"jpg": image, "txt": caption})
    return out


@pytest.fixture(scope="module")
def tokenizer():
    return ClipTokenizer()


def _epoch(data, tokenizer, workers=1, spec=DataSpec()):
    loader = TrainLoader.from_data(str(data), micro_batch=MICRO_BATCH, image_size=16, spec=spec, seed=7, workers=workers,
                                   decode_device="cpu", tokenizer=tokenizer, rank=0, world_size=1)
    batches = [{k: v.clone() for k, v in batch.items()} for batch in islice(iter(loader), loader.batches_per_epoch)]
    return loader, batches


def _shard_of(data) -> list[int]:
    dataset = LocalDataset(local=str(data))
    starts = np.cumsum([0] + [shard.samples for shard in dataset.shards])
    assert len(starts) > 3, "the fixture must span several shards"
    return [int(np.searchsorted(starts, i, side="right")) - 1 for i in range(SAMPLES)]


def test_bad_records_are_replaced_by_good_pairs_of_their_shard_and_counted(hostile, tokenizer):
    loader, batches = _epoch(hostile, tokenizer)
    bad = _hostile_records()
    shard_of = _shard_of(hostile)
    captions = {index: tokenizer([f"sample {index}"])[0] for index in range(SAMPLES) if index not in bad}
    seen = []
    for batch in batches:
        for image, text, sample_id in zip(batch["image"], batch["text"], batch["sample_id"].tolist()):
            seen.append(sample_id)
            assert image.flatten(1).std(1).min() > 0.1, f"sample {sample_id}: a flat placeholder went in"
            if sample_id not in bad:
                assert torch.equal(text, captions[sample_id])
                continue
            # A stand-in: a good pair of the same shard, never the bad record's own caption.
            stand_in = [index for index, caption in captions.items() if torch.equal(text, caption)]
            assert len(stand_in) == 1, sample_id
            alone = shard_of.count(shard_of[sample_id]) == 1  # the 30 kB caption fills a shard by itself
            assert alone or shard_of[stand_in[0]] == shard_of[sample_id], sample_id
    assert sorted(seen) == list(range(SAMPLES))  # every position once: the order is a clean dataset's
    expected = {reason for _, _, reason in bad.values()}
    assert set(loader.bad_records) == expected
    for reason in expected:  # a stand-in that is bad too is counted as well, so at least
        assert loader.bad_records[reason] >= sum(r == reason for _, _, r in bad.values())
    assert loader.samples_taken == SAMPLES


def test_the_same_stand_ins_every_time_whatever_the_workers(hostile, tokenizer):
    spec = DataSpec(image_views=2, augment="moco_v2")  # DeCLIP: two views of one decode
    first, again = _epoch(hostile, tokenizer, workers=0, spec=spec)[1], _epoch(hostile, tokenizer, workers=2, spec=spec)[1]
    for a, b in zip(first, again):
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_a_mostly_bad_dataset_stops_early_and_names_the_converter(tmp_path, tokenizer):
    out = tmp_path / "mostly_bad"
    good = _encode(1, "JPEG")
    with MDSWriter(out=str(out), columns={"jpg": "bytes", "txt": "str"}) as writer:
        for index in range(1_000):
            writer.write({"jpg": good if index % 4 == 0 else good[:200], "txt": f"sample {index}"})
    loader = TrainLoader.from_data(str(out), micro_batch=32, image_size=16, spec=DataSpec(), seed=0, workers=1,
                                   decode_device="cpu", tokenizer=tokenizer, rank=0, world_size=1)
    with pytest.raises(UserError, match="launchers/convert.py") as caught:
        for _ in islice(iter(loader), loader.batches_per_epoch):
            pass
    assert "of the first 256 samples this rank took were unusable" in str(caught.value)
    assert loader.samples_taken < 400  # stopped after the first few batches, not at the end of the epoch


def test_an_eval_set_leaves_its_bad_records_out_and_stays_aligned(hostile):
    from engine.eval.eval_set import load_eval_set

    bad = _hostile_records()
    eval_set = load_eval_set(hostile, image_size=16)
    assert eval_set.captions == [f"sample {index}" for index in range(SAMPLES) if index not in bad]
    assert eval_set.images.shape[0] == len(eval_set.captions)
    assert eval_set.images.flatten(1).std(1).min() > 0.1  # no placeholder among them
