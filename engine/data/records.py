"""Which records of a dataset are fit to train on, and a deterministic stand-in for one that is not.

A dataset written by another tool can hold anything: truncated or random image bytes, empty
or 1x1 images, empty captions, a page of scraped text as a caption. The converter
(launchers/convert.py) decodes every image before writing it, so its datasets hold none of
these; every other dataset is checked here, in the DataLoader workers, before DALI sees a byte.
That order matters: DALI's CPU decoder can crash the whole process (a segfault, not an
exception) on a truncated PNG, so a bad image must never reach it.

The check is cheap enough for every sample: the header (PIL reads only that), then the
structure of the two formats that make up nearly all web images, walked without decoding
pixels (a JPEG must reach its end-of-image marker; a PNG's chunks must be whole, with
matching checksums, up to IEND). Rarer formats are decoded in full.

A bad record is replaced by another record of the same shard, chosen from (shuffle seed,
sample id, attempt) alone, so a resumed or re-run epoch makes the same substitutions. Same
shard: the shard is already local, where a random one might have to be downloaded. The price
is a small chance that the stand-in is also in the same global batch (about global batch /
shuffle block size), which adds one false negative; a placeholder image would instead add a
fake pair to every batch that meets a bad record. (Its base class, streaming_dataset.py, mends
two failures of streaming's own.)
"""
from __future__ import annotations

import io
import re
import struct
import zlib

import numpy as np
from PIL import Image

from engine.data.dali import DALI_FORMATS
from engine.data.streaming_dataset import MendedStreamingDataset

MIN_IMAGE_SIDE = 8  # px: below this a crop holds no picture (the built-in digits start at 8x8)
# Alt texts are short; thousands of characters are page text scraped beside the image, whose
# first 77 tokens say little about it.
MAX_CAPTION_CHARS = 4_000
MAX_SUBSTITUTE_ATTEMPTS = 8

SAMPLE_ID_KEY = "__sample_id__"
IMAGE_SIZE_KEY = "__image_size__"    # (width, height) as decoded, from the record check
BAD_RECORDS_KEY = "__bad_records__"  # reasons of the bad records replaced on the way to this sample

EMPTY_IMAGE = "empty image"
UNDECODABLE = "undecodable image"
TRUNCATED = "truncated or corrupt image"
UNSUPPORTED = "unsupported image format"
TOO_SMALL = f"image under {MIN_IMAGE_SIDE} px"
EMPTY_CAPTION = "empty caption"
LONG_CAPTION = f"caption over {MAX_CAPTION_CHARS:,} characters"
DECODER_REJECTED = "rejected by the image decoder"  # passed these checks, failed in DALI
NO_SUBSTITUTE = "no usable stand-in"                # every stand-in tried was bad as well
REASONS = (EMPTY_IMAGE, UNDECODABLE, TRUNCATED, UNSUPPORTED, TOO_SMALL, EMPTY_CAPTION, LONG_CAPTION,
           DECODER_REJECTED, NO_SUBSTITUTE)

_EXIF_ORIENTATION = 0x0112
_ROTATED_QUARTER_TURN = frozenset({5, 6, 7, 8})
# In a JPEG's entropy-coded data 0xFF is followed by 0x00 (a stuffed byte), a restart marker
# (0xD0-0xD7) or another 0xFF (fill); anything else is the next marker.
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TIFF_BITS_PER_SAMPLE, _TIFF_SAMPLE_FORMAT = 258, 339


class StreamingDatasetWithIds(MendedStreamingDataset):
    """StreamingDataset whose samples carry their index (crop seeds and logs need it), and whose
    bad records are replaced by a stand-in of the same shard (engine/data/records.py).

    The sample keeps the index of its position, so the order, the resume point and the random
    draws are those of a clean dataset; the reasons of the bad records met on the way travel
    with it to be counted."""


    def get_item(self, sample_id: int, retry: int = 7):
        sample = super().get_item(sample_id, retry)
        problems: list[str] = []
        problem, size = record_problem(sample["jpg"], sample["txt"])
        attempt = 0
        while problem is not None:
            problems.append(problem)
            if attempt == MAX_SUBSTITUTE_ATTEMPTS:  # a mostly bad dataset: the loader stops the run
                problems.append(NO_SUBSTITUTE)
                break
            shard_id, _ = self.spanner[sample_id]
            stand_in = substitute_id(self.shuffle_seed, sample_id, attempt, int(self.sample_offset_per_shard[shard_id]),
                                     int(self.samples_per_shard[shard_id]), self.num_samples)
            sample = super().get_item(stand_in, retry)
            problem, size = record_problem(sample["jpg"], sample["txt"])
            attempt += 1
        sample[SAMPLE_ID_KEY] = int(sample_id)
        sample[IMAGE_SIZE_KEY] = size  # None: no usable image, the placeholder goes in
        sample[BAD_RECORDS_KEY] = problems
        return sample


def record_problem(encoded: bytes, caption: object) -> tuple[str | None, tuple[int, int] | None]:
    """A pair's check: (None, (width, height)) when fit to train on, else (reason, None)."""
    problem = caption_problem(caption)
    return (problem, None) if problem is not None else image_problem(encoded)


def image_problem(encoded: bytes) -> tuple[str | None, tuple[int, int] | None]:
    """(None, (width, height) as DALI will decode it), or (reason, None) for an unusable image."""
    if len(encoded) == 0:
        return EMPTY_IMAGE, None
    try:
        with Image.open(io.BytesIO(encoded)) as image:
            if image.format not in DALI_FORMATS:
                return UNSUPPORTED, None
            width, height = image.size
            image_format = image.format
            # DALI applies the EXIF orientation, so a quarter-turned photo swaps its sides. (PNG
            # keeps EXIF after the pixels: PIL would decode the whole image to find it.)
            if image_format != "PNG" and image.getexif().get(_EXIF_ORIENTATION, 1) in _ROTATED_QUARTER_TURN:
                width, height = height, width
            if min(width, height) < MIN_IMAGE_SIDE:
                return TOO_SMALL, None
            if image_format == "TIFF" and not _dali_reads_tiff(image):
                return UNSUPPORTED, None
            if image_format not in ("JPEG", "PNG"):
                image.load()  # rare formats: a full decode is the only structural check PIL offers
    except Exception:  # PIL raises many types for bad data; all mean "cannot decode"
        return UNDECODABLE, None
    if image_format == "JPEG" and not _jpeg_is_whole(encoded):
        return TRUNCATED, None
    if image_format == "PNG" and not _png_is_whole(encoded):
        return TRUNCATED, None
    return None, (width, height)


def _dali_reads_tiff(image: Image.Image) -> bool:
    """False for the TIFF kinds that PIL reads and DALI's decoder refuses (test_records.py asks
    DALI about each): no BitsPerSample tag (TIFF lets bilevel images leave it out, DALI's parser
    requires it), and 32-bit integer samples. 16-bit and float samples DALI scales to 8 bits."""
    tags = image.tag_v2
    bits = tags.get(_TIFF_BITS_PER_SAMPLE)
    if bits is None:
        return False
    sample_format = tags.get(_TIFF_SAMPLE_FORMAT, (1,))
    integer = (sample_format[0] if isinstance(sample_format, tuple) else sample_format) in (1, 2)
    return not (integer and max(bits if isinstance(bits, tuple) else (bits,)) > 16)


def caption_problem(caption: object) -> str | None:
    if not isinstance(caption, str) or not caption.strip():
        return EMPTY_CAPTION
    if len(caption) > MAX_CAPTION_CHARS:
        return LONG_CAPTION
    return None


def substitute_id(seed: int, sample_id: int, attempt: int, shard_start: int, shard_samples: int,
                  dataset_samples: int) -> int:
    """The stand-in for `sample_id` at this attempt, fixed by the arguments: another sample of its
    shard, or of the whole dataset when the shard holds nothing else (a record too big to share one)."""
    if shard_samples < 2:
        shard_start, shard_samples = 0, dataset_samples
    if shard_samples < 2:
        return sample_id
    draw = int(np.random.SeedSequence((seed, sample_id, attempt)).generate_state(1, np.uint64)[0])
    offset = (sample_id - shard_start + 1 + draw % (shard_samples - 1)) % shard_samples  # never itself
    return shard_start + offset


def _jpeg_is_whole(data: bytes) -> bool:
    """Walk the marker segments from SOI to EOI without decoding; False if the data ends first."""
    if data[:2] != b"\xff\xd8":
        return False
    position, end = 2, len(data)
    while position + 1 < end:
        if data[position] != 0xFF:
            # Stray bytes between segments: decoders skip them with a warning, and so do we.
            position = data.find(b"\xff", position)
            if position < 0:
                return False
            continue
        marker = data[position + 1]
        if marker == 0xD9:  # end of image; whatever follows (some cameras append data) is ignored
            return True
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            position += 2
            continue
        if position + 4 > end:
            return False
        length = struct.unpack_from(">H", data, position + 2)[0]
        position += 2 + length
        if position > end:
            return False
        if marker == 0xDA:  # start of scan: entropy-coded data runs to the next real marker
            found = _NEXT_MARKER.search(data, position)
            if found is None:
                return False
            position = found.start()
    return False


def _png_is_whole(data: bytes) -> bool:
    """Every chunk whole, with its checksum intact, up to IEND (PIL too refuses a bad checksum)."""
    if data[:8] != _PNG_SIGNATURE:
        return False
    position, end = 8, len(data)
    while position + 12 <= end:
        length, kind = struct.unpack_from(">I4s", data, position)
        chunk_end = position + 12 + length
        if chunk_end > end:
            return False
        (stored,) = struct.unpack_from(">I", data, chunk_end - 4)
        if zlib.crc32(memoryview(data)[position + 4:chunk_end - 4]) != stored:
            return False
        if kind == b"IEND":
            return True
        position = chunk_end
    return False
