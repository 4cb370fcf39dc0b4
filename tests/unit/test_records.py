"""The record check: every kind of bad record gets its reason, and no good image is turned away."""
import io
import struct
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from engine.data.records import (EMPTY_CAPTION, EMPTY_IMAGE, LONG_CAPTION, MAX_CAPTION_CHARS, MIN_IMAGE_SIDE,
                                 TOO_SMALL, TRUNCATED, UNDECODABLE, UNSUPPORTED, caption_problem, image_problem,
                                 substitute_id)
from engine.observe.bad_records import BadRecordTally, metric_name


def _encode(pixels: np.ndarray, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _photo(seed: int, height: int = 40, width: int = 56) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _decodes(encoded: bytes) -> bool:
    """PIL's full decode: the independent opinion the structural check must agree with."""
    try:
        with Image.open(io.BytesIO(encoded)) as image:
            image.load()
        return True
    except Exception:
        return False


@pytest.mark.parametrize("fmt, options", [("JPEG", {}), ("JPEG", {"progressive": True}), ("PNG", {}),
                                          ("WEBP", {}), ("BMP", {}), ("TIFF", {})])
def test_good_images_pass_with_their_size(fmt, options):
    assert image_problem(_encode(_photo(1), fmt, **options)) == (None, (56, 40))


@pytest.mark.parametrize("fmt, options", [("JPEG", {}), ("JPEG", {"progressive": True}), ("PNG", {})])
def test_every_cut_of_a_jpeg_or_png_is_caught(fmt, options):
    # The header alone (what was checked before) passes most of these cuts, and DALI's CPU
    # decoder crashed the process on truncated PNGs.
    encoded = _encode(_photo(2, 64, 64), fmt, **options)
    cuts = sorted(set(np.linspace(1, len(encoded) - 1, 60, dtype=int).tolist()) | {len(encoded) - 1})
    for cut in cuts:
        problem, size = image_problem(encoded[:cut])
        assert problem in (TRUNCATED, UNDECODABLE) and size is None, f"cut at {cut} of {len(encoded)} passed"
        # PIL stops reading at the last pixel row, so it takes a PNG cut inside its closing IEND chunk.
        if fmt == "PNG" and cut < len(encoded) - 12:
            assert not _decodes(encoded[:cut])


def test_corrupt_png_pixels_are_caught_by_the_chunk_checksum():
    encoded = bytearray(_encode(_photo(3), "PNG"))
    idat = encoded.index(b"IDAT")
    encoded[idat + 40] ^= 0xFF
    assert image_problem(bytes(encoded))[0] == TRUNCATED
    assert not _decodes(bytes(encoded))


def test_data_after_the_end_of_a_jpeg_is_ignored():
    encoded = _encode(_photo(5), "JPEG")
    assert image_problem(encoded + b"camera trailer \xff\xd8 with markers")[0] is None


def test_a_thumbnails_end_marker_does_not_hide_a_truncated_jpeg():
    # EXIF with an embedded JPEG thumbnail: its FFD9 sits in the APP1 segment, before the scan.
    thumbnail = _encode(_photo(6, 16, 16), "JPEG")
    exif = Image.Exif()
    exif[0x010E] = "with a thumbnail"
    app1_payload = b"Exif\x00\x00" + exif.tobytes() + thumbnail
    encoded = _encode(_photo(7, 64, 64), "JPEG")
    app1 = b"\xff\xe1" + struct.pack(">H", len(app1_payload) + 2) + app1_payload
    whole = encoded[:2] + app1 + encoded[2:]
    assert image_problem(whole)[0] is None
    assert image_problem(whole[:len(whole) - len(encoded) // 3])[0] == TRUNCATED


def test_empty_random_tiny_and_unsupported_images_get_their_reason():
    assert image_problem(b"") == (EMPTY_IMAGE, None)
    assert image_problem(np.random.default_rng(0).bytes(500)) == (UNDECODABLE, None)
    assert image_problem(_encode(_photo(8, 1, 1), "PNG")) == (TOO_SMALL, None)
    assert image_problem(_encode(_photo(8, MIN_IMAGE_SIDE - 1, 40), "JPEG")) == (TOO_SMALL, None)
    assert image_problem(_encode(_photo(8, MIN_IMAGE_SIDE, MIN_IMAGE_SIDE), "JPEG"))[0] is None
    gif = io.BytesIO()
    Image.fromarray(_photo(9)).convert("P").save(gif, format="GIF")
    assert image_problem(gif.getvalue()) == (UNSUPPORTED, None)


def _tiff(pixels: np.ndarray, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="TIFF", **options)
    return buffer.getvalue()


def _dali_decodes(encoded: bytes) -> bool:
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def graph():
        images = fn.external_source(source=lambda: [np.frombuffer(encoded, np.uint8)], batch=True, dtype=types.UINT8)
        return fn.decoders.image(images, device="cpu", output_type=types.RGB)

    pipe = graph()
    try:
        pipe.build()
        pipe.run()
        return True
    except RuntimeError:
        return False


def test_tiffs_pass_exactly_when_dalis_decoder_reads_them():
    rng = np.random.default_rng()
    kinds = {
        "rgb": _tiff(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)),
        "rgb, lzw": _tiff(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8), compression="tiff_lzw"),
        "16-bit grey": _tiff(rng.integers(0, 65536, (20, 24)).astype(np.uint16)),
        "float grey": _tiff(rng.random((20, 24)).astype(np.float32)),
        "bilevel, packbits": _tiff(rng.integers(0, 2, (20, 24)).astype(bool), compression="packbits"),
        "bilevel, no BitsPerSample": _tiff(rng.integers(0, 2, (20, 24)).astype(bool)),
        "32-bit integer grey": _tiff(rng.integers(0, 70_000, (20, 24)).astype(np.int32)),
    }
    verdicts = {kind: (image_problem(encoded)[0] is None, _dali_decodes(encoded)) for kind, encoded in kinds.items()}
    assert all(ours == dali for ours, dali in verdicts.values()), verdicts
    assert not verdicts["32-bit integer grey"][0] and verdicts["16-bit grey"][0]  # both kinds are exercised
    assert image_problem(kinds["32-bit integer grey"]) == (UNSUPPORTED, None)


def test_captions():
    assert caption_problem("a dog on a sofa") is None
    assert caption_problem("") == caption_problem("  \n ") == caption_problem(None) == EMPTY_CAPTION
    assert caption_problem("word " * (30_000 // 5)) == LONG_CAPTION
    assert caption_problem("x" * MAX_CAPTION_CHARS) is None


def test_a_stand_in_is_another_sample_of_the_same_shard_fixed_by_its_arguments():
    start, samples = 1_000, 37
    for sample_id in range(start, start + samples):
        stand_ins = [substitute_id(3, sample_id, attempt, start, samples, 5_000) for attempt in range(8)]
        assert all(start <= s < start + samples and s != sample_id for s in stand_ins)
        assert stand_ins == [substitute_id(3, sample_id, attempt, start, samples, 5_000) for attempt in range(8)]
    spread = Counter(substitute_id(3, sample_id, 0, start, samples, 5_000) for sample_id in range(start, start + samples))
    assert len(spread) > samples // 3  # not one sample standing in for all
    other_seed = [substitute_id(4, start, attempt, start, samples, 5_000) for attempt in range(8)]
    assert other_seed != [substitute_id(3, start, attempt, start, samples, 5_000) for attempt in range(8)]
    # A record alone in its shard (too big to share one) takes a stand-in from the whole dataset.
    alone = {substitute_id(3, 42, attempt, 42, 1, 5_000) for attempt in range(8)}
    assert 42 not in alone and all(0 <= s < 5_000 for s in alone)


def test_tally_carries_totals_and_counts_each_record_once():
    counts = Counter({EMPTY_CAPTION: 1, TRUNCATED: 3})   # the loader's, which it keeps adding to
    tally = BadRecordTally(counts, torch.device("cpu"), carried={"empty caption": 2})
    assert tally.scalars(step=1) == {"data/bad_records": 6, "data/bad_records/empty_caption": 3,
                                     "data/bad_records/truncated_or_corrupt_image": 3}
    assert tally.rank_state() == {"bad_records": {EMPTY_CAPTION: 3, TRUNCATED: 3}}  # nothing new since
    counts.update([TRUNCATED])
    assert tally.scalars(step=2)["data/bad_records"] == 7
    assert "replaced by stand-ins: 7 (4 truncated or corrupt image, 3 empty caption)" in tally.summary()
    assert BadRecordTally(Counter(), torch.device("cpu")).metrics() == {}
    assert metric_name(TOO_SMALL) == f"image_under_{MIN_IMAGE_SIDE}_px"
