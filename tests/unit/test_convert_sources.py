"""The converter's newer sources: parquet (bytes, structs, paths, img2dataset), Karpathy JSON, unsafe tars."""
import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from streaming import LocalDataset

from engine.data.convert import convert, parquet, writer
from engine.data.mds import describe_mds
from engine.errors import UserError


def _image(seed: int, fmt: str = "JPEG", size=(24, 32)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def _pairs(n: int) -> list[tuple[bytes, str]]:
    return [(_image(i, ("JPEG", "PNG")[i % 2]), f"picture {i}") for i in range(n)]


def _samples(mds_dir) -> list[tuple[bytes, str]]:
    dataset = LocalDataset(local=str(mds_dir))
    return [(dataset[i]["jpg"], dataset[i]["txt"]) for i in range(len(dataset))]


def _converted(source, out, **kwargs):
    report = convert(source, out, log=lambda line: None, **kwargs)
    assert describe_mds(str(out)).num_samples == report.written
    return report, _samples(out)


def _write_parquet(path, columns: dict, row_group_size=None):
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def test_parquet_with_image_bytes_in_batches_and_row_groups(tmp_path, monkeypatch):
    pairs = _pairs(23)
    folder = tmp_path / "pq"
    folder.mkdir()
    # two files, several row groups each, read in batches smaller than a row group
    _write_parquet(folder / "part-1.parquet", {"image": [e for e, _ in pairs[10:]], "text": [c for _, c in pairs[10:]]},
                   row_group_size=4)
    _write_parquet(folder / "part-0.parquet", {"image": [e for e, _ in pairs[:10]], "text": [c for _, c in pairs[:10]]},
                   row_group_size=4)
    monkeypatch.setattr(parquet, "BATCH_ROWS", 3)
    report, written = _converted(folder, tmp_path / "out", workers=2)
    assert written == pairs and not report.skipped
    _, single = _converted(folder / "part-1.parquet", tmp_path / "one")
    assert single == pairs[10:]


def test_parquet_hugging_face_struct_bytes_or_path(tmp_path):
    pairs = _pairs(4)
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "third.png").write_bytes(pairs[2][0])
    struct = [{"bytes": pairs[0][0], "path": "a.jpg"}, {"bytes": pairs[1][0], "path": None},
              {"bytes": None, "path": "img/third.png"}, {"bytes": None, "path": None}]
    source = _write_parquet(tmp_path / "train.parquet", {"image": struct, "caption": [c for _, c in pairs]})
    report, written = _converted(source, tmp_path / "out")
    assert written == pairs[:3]
    assert report.skipped == {"missing image file": 1}


def test_parquet_with_paths_and_named_columns(tmp_path):
    pairs = _pairs(5)
    root = tmp_path / "images"
    root.mkdir()
    for i, (encoded, _) in enumerate(pairs):
        (root / f"{i}.img").write_bytes(encoded)
    source = _write_parquet(tmp_path / "rows.parquet",
                            {"file": [f"{i}.img" for i in range(5)], "alt": [c for _, c in pairs]})
    with pytest.raises(UserError, match=r"--image-column"):
        convert(source, tmp_path / "out")
    _, written = _converted(source, tmp_path / "out", image_column="file", caption_column="alt", image_root=root)
    assert written == pairs
    with pytest.raises(UserError, match=r"no column 'nope'.*--caption-column"):
        convert(source, tmp_path / "other", image_column="file", caption_column="nope")
    with pytest.raises(UserError, match=r"column 'alt' holds .*--image-column must name"):
        _write_parquet(tmp_path / "ints.parquet", {"alt": [1, 2], "caption": ["a", "b"]})
        convert(tmp_path / "ints.parquet", tmp_path / "other", image_column="alt")


def _img2dataset_columns(pairs, statuses):
    ok = [s == "success" for s in statuses]
    return {
        "url": [f"https://example.com/{i}.jpg" for i in range(len(pairs))],
        "caption": [c for _, c in pairs],
        "key": [f"{i:09d}" for i in range(len(pairs))],
        "status": statuses,
        "error_message": [None if good else "HTTP Error 404" for good in ok],
        "width": [32 if good else None for good in ok],
        "height": [24 if good else None for good in ok],
        "jpg": pa.array([e if good else None for (e, _), good in zip(pairs, ok)], type=pa.binary()),
    }


def test_img2dataset_parquet_output_skips_failed_downloads(tmp_path):
    pairs = _pairs(6)
    statuses = ["success", "failed_to_download", "success", "success", "failed_to_resize", "success"]
    columns = _img2dataset_columns(pairs, statuses)
    # row 3 says success but holds no bytes
    columns["jpg"] = pa.array([None if s != "success" or i == 3 else e
                               for i, ((e, _), s) in enumerate(zip(pairs, statuses))], type=pa.binary())
    folder = tmp_path / "laion"
    folder.mkdir()
    _write_parquet(folder / "00000.parquet", columns)
    (folder / "00000_stats.json").write_text("{}")
    report, written = _converted(folder, tmp_path / "out")
    assert written == [pairs[i] for i in (0, 2, 5)]
    assert report.skipped == {"download failed (img2dataset status)": 2, "no image bytes": 1}
    assert report.examples["download failed (img2dataset status)"][0] == \
        "00000.parquet:1 (failed_to_download: HTTP Error 404)"


def _write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return path


def test_img2dataset_webdataset_tars_win_over_their_metadata_parquet(tmp_path):
    pairs = _pairs(4)
    folder = tmp_path / "shards"
    folder.mkdir()
    members = []
    for i, (encoded, caption) in enumerate(pairs):
        suffix = ".jpg" if i % 2 == 0 else ".png"
        members += [(f"{i:09d}.jpg" if suffix == ".jpg" else f"{i:09d}.png", encoded),
                    (f"{i:09d}.txt", caption.encode()), (f"{i:09d}.json", b'{"status": "success"}')]
    _write_tar(folder / "00000.tar", members)
    metadata = _img2dataset_columns(pairs, ["success"] * 4)
    del metadata["jpg"]  # webdataset output: the parquet beside each tar holds no image bytes
    _write_parquet(folder / "00000.parquet", metadata)
    _, written = _converted(folder, tmp_path / "out")
    assert written == pairs


def test_img2dataset_files_layout_beside_its_metadata_parquet(tmp_path):
    pairs = _pairs(3)
    folder = tmp_path / "files"
    (folder / "00000").mkdir(parents=True)
    for i, (encoded, caption) in enumerate(pairs):
        (folder / "00000" / f"{i:09d}{'.jpg' if i % 2 == 0 else '.png'}").write_bytes(encoded)
        (folder / "00000" / f"{i:09d}.txt").write_text(caption)
    metadata = _img2dataset_columns(pairs, ["success"] * 3)
    del metadata["jpg"]
    _write_parquet(folder / "00000.parquet", metadata)
    _, written = _converted(folder, tmp_path / "out")
    assert written == pairs


def _karpathy(tmp_path, pairs):
    """A dataset_coco.json in the Karpathy layout: two captions per image, images under val2014/ or train2014/."""
    splits = ["train", "restval", "val", "test", "train"]
    images = []
    for i, split in enumerate(splits):
        folder = "train2014" if split == "train" else "val2014"
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / folder / f"COCO_{i:06d}.jpg").write_bytes(pairs[i][0])
        images.append({"filepath": folder, "filename": f"COCO_{i:06d}.jpg", "split": split, "cocoid": i,
                       "sentences": [{"raw": f"{pairs[i][1]} first", "tokens": ["x"]},
                                     {"raw": f"{pairs[i][1]} second", "tokens": ["y"]}]})
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    return tmp_path / "dataset_coco.json"


def test_karpathy_json_one_sample_per_caption_and_splits(tmp_path):
    pairs = [(_image(i), f"picture {i}") for i in range(5)]
    source = _karpathy(tmp_path / "coco", pairs)
    _, written = _converted(source, tmp_path / "train")  # default: train + restval
    assert written == [(pairs[i][0], f"{pairs[i][1]} {which}") for i in (0, 1, 4) for which in ("first", "second")]
    _, test = _converted(source, tmp_path / "test", split="test")
    assert test == [(pairs[3][0], "picture 3 first"), (pairs[3][0], "picture 3 second")]
    # images elsewhere: --image-root
    moved = tmp_path / "elsewhere"
    (tmp_path / "coco" / "val2014").rename(moved)
    with pytest.raises(UserError, match=r"no usable image-caption pair.*2 missing image file"):
        convert(source, tmp_path / "val", split="val")
    assert not (tmp_path / "val").exists() and not (tmp_path / ".val.converting").exists()
    (tmp_path / "root").mkdir()
    moved.rename(tmp_path / "root" / "val2014")
    _, val = _converted(source, tmp_path / "val2", split="val", image_root=tmp_path / "root")
    assert [c for _, c in val] == ["picture 2 first", "picture 2 second"]
    with pytest.raises(UserError, match=r"--split dev: give one or more of train, restval, val, test"):
        convert(source, tmp_path / "bad", split="dev")
    with pytest.raises(UserError, match=r"--split selects images of a Karpathy"):
        convert(tmp_path / "root", tmp_path / "bad", split="test")


def test_tar_members_outside_the_tar_are_skipped(tmp_path):
    pairs = _pairs(2)
    outside = tmp_path / "secret.txt"
    outside.write_text("never read")
    tar = _write_tar(tmp_path / "00000.tar", [
        ("000000000.jpg", pairs[0][0]), ("000000000.txt", pairs[0][1].encode()),
        ("../secret.jpg", pairs[1][0]), ("../secret.txt", b"escaped"),
        ("/etc/evil.jpg", pairs[1][0]), ("/etc/evil.txt", b"absolute"),
        ("a/../../up.txt", b"sneaky"),
        ("000000001.png", pairs[1][0]), ("000000001.txt", pairs[1][1].encode()),
    ])
    report, written = _converted(tar, tmp_path / "out")
    assert written == pairs
    assert report.skipped == {"unsafe tar member path": 5}
    assert sorted(report.examples["unsafe tar member path"]) == [
        "00000.tar:../secret.jpg ('..' in the path)", "00000.tar:../secret.txt ('..' in the path)",
        "00000.tar:/etc/evil.jpg (absolute path)"]


def test_a_list_of_captions_gives_one_sample_per_caption_and_other_data_is_not_text(tmp_path, monkeypatch):
    pairs = _pairs(6)
    images = [e for e, _ in pairs]
    # parquet list<string> cells: COCO-style several captions per image, as Karpathy files have
    captions = [["a", "b"], ["c"], None, [], ["x y", ""], [None, "z"]]
    _write_parquet(tmp_path / "lists.parquet", {"jpg": images, "caption": captions})
    # three pairs a block: the expansion happens in the listing, so blocks hold listed pairs
    monkeypatch.setattr(writer, "ENTRIES_PER_BLOCK", 3)
    report, written = _converted(tmp_path / "lists.parquet", tmp_path / "pq", workers=2)
    assert written == [(images[0], "a"), (images[0], "b"), (images[1], "c"), (images[4], "x y"), (images[5], "z")]
    assert report.skipped == {"empty caption": 4}  # None, [], "" and a null in a list
    assert "lists.parquet:3 (an empty list of captions)" in report.examples["empty caption"]
    assert report.blocks == 3  # 9 listed pairs: 2 + 1 + 1 (None) + 1 ([]) + 2 + 2

    # JSONL: arrays too; an object or a nested list is not text; numbers are kept as text
    for i, encoded in enumerate(images):
        (tmp_path / f"{i}.jpg").write_bytes(encoded)
    rows = [{"image": "0.jpg", "caption": ["first", "second"]}, {"image": "1.jpg", "caption": {"en": "x"}},
            {"image": "2.jpg", "caption": 1984}, {"image": "3.jpg", "caption": [["nested"], "kept"]},
            {"image": "4.jpg", "caption": True}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    report, written = _converted(tmp_path / "rows.jsonl", tmp_path / "jsonl")
    assert written == [(images[0], "first"), (images[0], "second"), (images[2], "1984"), (images[3], "kept")]
    reason = "caption is not text: name a text column with --caption-column"
    assert report.skipped == {reason: 3}
    assert report.examples[reason] == ["rows.jsonl:2 1.jpg (dict {'en': 'x'})",
                                       "rows.jsonl:4 3.jpg#0 (list ['nested'])", "rows.jsonl:5 4.jpg (bool True)"]


def test_repeated_keys_links_and_compressed_tars_are_counted(tmp_path):
    pairs = _pairs(3)
    folder = tmp_path / "shards"
    folder.mkdir()
    _write_tar(folder / "00000.tar", [
        ("000000000.jpg", pairs[0][0]), ("000000000.txt", pairs[0][1].encode()),
        ("000000000.jpg", pairs[1][0]), ("000000000.txt", b"a repeated caption"),
        ("000000001.png", pairs[1][0]), ("000000001.txt", pairs[1][1].encode())])
    with tarfile.open(folder / "00000.tar", "a") as tar:
        link = tarfile.TarInfo("000000002.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "000000000.jpg"
        tar.addfile(link)
        text = tarfile.TarInfo("000000002.txt")
        text.size = 4
        tar.addfile(text, io.BytesIO(b"link"))
    with tarfile.open(tmp_path / "gz.tar", "w:gz") as tar:  # compressed, named like a plain tar
        member = tarfile.TarInfo("000000003.jpg")
        member.size = len(pairs[2][0])
        tar.addfile(member, io.BytesIO(pairs[2][0]))
    (folder / "00001.tar").write_bytes((tmp_path / "gz.tar").read_bytes())
    report, written = _converted(folder, tmp_path / "out")
    assert written == pairs[:2]  # each key's first members
    compressed = "compressed tar (gzip): decompress it into a plain .tar and convert that"
    assert report.skipped == {"repeated key in the tar, later member not read": 2,
                              "link in the tar, not read": 1, compressed: 1}
    assert report.examples["link in the tar, not read"] == ["00000.tar:000000002.jpg (-> 000000000.jpg)"]
    assert report.examples["repeated key in the tar, later member not read"][0] == \
        "00000.tar:000000000.jpg (000000000.jpg is used)"
    (tmp_path / "gz.tar").rename(tmp_path / "gz.tar.gz")
    with pytest.raises(UserError, match=r"gz.tar.gz: a compressed tar; .* decompress it"):
        convert(tmp_path / "gz.tar.gz", tmp_path / "gz")
