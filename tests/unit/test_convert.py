"""The converter: every source type round-trips, bad pairs are skipped, output appears atomically."""
import csv
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image
from streaming import LocalDataset

from engine.data.convert import convert, samples, writer
from engine.data.mds import describe_mds
from engine.errors import UserError
from launchers.convert import main as convert_main


def _image(seed: int, fmt: str = "JPEG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def _samples(mds_dir) -> list[tuple[bytes, str]]:
    dataset = LocalDataset(local=str(mds_dir))
    return [(dataset[i]["jpg"], dataset[i]["txt"]) for i in range(len(dataset))]


def _pairs(n: int, first_seed: int = 0) -> list[tuple[bytes, str]]:
    formats = ("JPEG", "PNG", "WEBP")
    return [(_image(first_seed + i, formats[i % 3]), f"a photo number {first_seed + i}") for i in range(n)]


def _suffix(encoded: bytes) -> str:
    return {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp"}[Image.open(io.BytesIO(encoded)).format]


def _write_folder(root, pairs):
    """img2dataset's files layout: NNNNN/KEY.jpg + KEY.txt, two subfolders."""
    for i, (encoded, caption) in enumerate(pairs):
        folder = root / f"{i // 4:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:09d}{_suffix(encoded)}").write_bytes(encoded)
        (folder / f"{i:09d}.txt").write_text(caption + "\n")  # the trailing newline is stripped
    return root


def _write_images(folder, pairs) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, (encoded, _) in enumerate(pairs):
        names.append(f"img{i}{_suffix(encoded)}")
        (folder / names[-1]).write_bytes(encoded)
    return names


def _write_tar(path, pairs, first_key=0):
    with tarfile.open(path, "w") as tar:
        for i, (encoded, caption) in enumerate(pairs):
            # img2dataset's members per key; .json first, so a key seen before its image is not listed twice
            for name, data in ((f"{first_key + i:09d}.json", b"{}"),
                               (f"{first_key + i:09d}{_suffix(encoded)}", encoded),
                               (f"{first_key + i:09d}.txt", caption.encode())):
                member = tarfile.TarInfo(name)
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    return path


def _converted(source, out, **kwargs):
    report = convert(source, out, log=lambda line: None, **kwargs)
    info = describe_mds(str(out))
    assert info.num_samples == report.written
    return report, _samples(out)


def test_folder_round_trip(tmp_path):
    pairs = _pairs(10)
    report, written = _converted(_write_folder(tmp_path / "src", pairs), tmp_path / "out", workers=2)
    assert written == pairs and report.written == 10 and not report.skipped
    assert report.shards == 1 and report.bytes > sum(len(e) for e, _ in pairs)


@pytest.mark.parametrize("suffix, delimiter, image_key, caption_key",
                         [(".csv", ",", "filepath", "caption"), (".tsv", "\t", "image", "title"),
                          (".csv", ",", "Path", "TEXT")])
def test_table_round_trip(tmp_path, suffix, delimiter, image_key, caption_key):
    pairs = _pairs(6)
    names = _write_images(tmp_path / "images", pairs)
    table = tmp_path / f"pairs{suffix}"
    with open(table, "w", newline="") as f:
        rows = csv.writer(f, delimiter=delimiter)
        rows.writerow(["id", image_key, caption_key])
        for i, (name, (_, caption)) in enumerate(zip(names, pairs)):
            # half relative to the table's folder, half absolute
            path = f"images/{name}" if i % 2 else str(tmp_path / "images" / name)
            rows.writerow([i, path, caption])
    _, written = _converted(table, tmp_path / "out", workers=2)
    assert written == pairs


def test_jsonl_round_trip_and_named_columns(tmp_path):
    pairs = _pairs(5)
    names = _write_images(tmp_path / "images", pairs)
    lines = [json.dumps({"file": f"images/{name}", "alt": caption}) for name, (_, caption) in zip(names, pairs)]
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n\n")
    with pytest.raises(UserError, match=r"--image-column"):
        convert(tmp_path / "pairs.jsonl", tmp_path / "out")
    _, written = _converted(tmp_path / "pairs.jsonl", tmp_path / "out", image_column="file", caption_column="alt")
    assert written == pairs


def test_webdataset_tars_round_trip(tmp_path):
    pairs = _pairs(9)
    shards = tmp_path / "shards"
    shards.mkdir()
    _write_tar(shards / "00001.tar", pairs[5:], first_key=5)  # listed out of order on purpose
    _write_tar(shards / "00000.tar", pairs[:5])
    (shards / "00000.parquet").write_bytes(b"not read")
    _, written = _converted(shards, tmp_path / "out", workers=2)
    assert written == pairs
    _, single = _converted(shards / "00001.tar", tmp_path / "one")
    assert single == pairs[5:]


def test_truncated_tar_keeps_the_pairs_before_the_damage(tmp_path):
    pairs = _pairs(6)
    tar = _write_tar(tmp_path / "00000.tar", pairs)
    whole = tar.read_bytes()
    tar.write_bytes(whole[: int(len(whole) * 0.6)])
    report, written = _converted(tar, tmp_path / "out")
    assert written == pairs[: len(written)] and 2 <= len(written) < 6
    assert set(report.skipped) <= {"unreadable image file", "missing caption file", "unreadable tar"}


def test_text_source_that_is_not_utf8_is_a_user_error(tmp_path):
    (tmp_path / "pairs.csv").write_bytes(b"image,caption\na.jpg,caf\xe9\n")
    with pytest.raises(UserError, match=r"UTF-8"):
        convert(tmp_path / "pairs.csv", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.csv"]


def test_bad_pairs_are_skipped_and_counted(tmp_path):
    pairs = _pairs(8)
    names = _write_images(tmp_path, pairs)
    truncated = _image(99)
    (tmp_path / "truncated.jpg").write_bytes(truncated[: len(truncated) // 2])
    (tmp_path / "anim.gif").write_bytes(_image(98, "GIF"))
    deep = io.BytesIO()  # 32-bit integer samples: PIL reads them, DALI's decoder does not
    Image.fromarray(np.arange(40 * 56, dtype=np.int32).reshape(40, 56) * 30).save(deep, format="TIFF")
    (tmp_path / "deep.tif").write_bytes(deep.getvalue())
    rows = [{"image": name, "caption": caption} for name, (_, caption) in zip(names, pairs)]
    rows[1]["caption"] = "   "
    rows[2]["image"] = "gone.jpg"
    rows[3]["image"] = "truncated.jpg"
    rows[4]["image"] = "anim.gif"
    rows[5]["image"] = "https://example.com/a.jpg"
    rows[6]["image"] = "deep.tif"
    with open(tmp_path / "pairs.jsonl", "w") as f:
        f.write("\n".join(json.dumps(row) for row in rows) + "\n{not json\n")
    report, written = _converted(tmp_path / "pairs.jsonl", tmp_path / "out", workers=2)
    assert written == [pairs[i] for i in (0, 7)]
    assert report.skipped == {"empty caption": 1, "missing image file": 1, "undecodable image": 1,
                              "unsupported image format": 2, "image is a URL": 1, "malformed JSON line": 1}
    assert "gone.jpg" in report.examples["missing image file"][0]
    summary = report.summary()
    assert "wrote 2 samples" in summary and "1 undecodable image, e.g. pairs.jsonl:4 truncated.jpg" in summary


def test_folder_without_caption_sidecar_is_counted(tmp_path):
    src = _write_folder(tmp_path / "src", _pairs(4))
    (src / "00000" / "000000001.txt").unlink()
    report, written = _converted(src, tmp_path / "out", workers=1)
    assert len(written) == 3 and report.skipped == {"missing caption file": 1}


def test_same_order_for_any_worker_count(tmp_path, monkeypatch):
    pairs = _pairs(80)
    src = _write_folder(tmp_path / "src", pairs)
    # Small blocks, so that two workers really interleave blocks.
    monkeypatch.setattr(writer, "ENTRIES_PER_BLOCK", 3)
    _, one = _converted(src, tmp_path / "one", workers=1)
    report, two = _converted(src, tmp_path / "two", workers=2, shard_size_mb=1)
    assert one == two == pairs
    assert report.shards == 27 and len({p.parent.parent.name for p in (tmp_path / "two").rglob("*.mds")}) == 2


def test_existing_output_refused_then_replaced(tmp_path):
    src = _write_folder(tmp_path / "src", _pairs(3))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match=r"--overwrite"):
        convert(src, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    _converted(src, out, overwrite=True)
    assert not (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temporary left beside it
    with pytest.raises(UserError, match=r"holds the source"):
        convert(out / "..", tmp_path, overwrite=True)


def test_unknown_source_lists_supported_ones(tmp_path):
    (tmp_path / "data.xlsx").write_bytes(b"PK")
    with pytest.raises(UserError, match=r"not a supported source.*folder of images.*\.jsonl.*\.tar.*parquet"):
        convert(tmp_path / "data.xlsx", tmp_path / "out")
    (tmp_path / "data.parquet").write_bytes(b"PAR1")
    with pytest.raises(UserError, match=r"cannot be read as parquet"):
        convert(tmp_path / "data.parquet", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"not a supported source"):
        convert(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(UserError, match=r"no such file"):
        convert(tmp_path / "nothing", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_failures_leave_no_partial_dataset(tmp_path, monkeypatch):
    src = _write_folder(tmp_path / "src", _pairs(3))
    for caption in (src / "00000").glob("*.txt"):
        caption.write_text("")
    with pytest.raises(UserError, match=r"no usable image-caption pair.*3 empty caption"):
        convert(src, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]

    for caption in (src / "00000").glob("*.txt"):
        caption.write_text("fixed")
    make_sample = samples.make_sample

    def crash(pair, rules):
        if pair.name.endswith("2.webp"):  # the third pair, in block 1
            raise RuntimeError("disk on fire")
        return make_sample(pair, rules)
    monkeypatch.setattr(writer, "ENTRIES_PER_BLOCK", 2)
    monkeypatch.setattr(samples, "make_sample", crash)
    with pytest.raises(RuntimeError, match="disk on fire"):
        convert(src, tmp_path / "out", workers=1)
    # No dataset; the work so far (block 0) is kept beside it for a rerun to resume.
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.converting", "src"]
    monkeypatch.setattr(samples, "make_sample", make_sample)
    report = convert(src, tmp_path / "out", workers=1, log=lambda line: None)
    assert (report.resumed_blocks, report.blocks, report.written) == (1, 2, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_launcher_copies_classes_and_reports_errors(tmp_path, capsys):
    src = _write_folder(tmp_path / "src", _pairs(3))
    classes = {"classnames": ["noise"], "templates": ["a photo of {}."]}
    (tmp_path / "classes.json").write_text(json.dumps(classes))
    assert convert_main([str(src), str(tmp_path / "out"), "--classes", str(tmp_path / "classes.json")]) == 0
    assert "wrote 3 samples" in capsys.readouterr().out
    assert describe_mds(str(tmp_path / "out")).classes == classes

    (tmp_path / "bad.json").write_text('{"classnames": []}')
    assert convert_main([str(src), str(tmp_path / "other"), "--classes", str(tmp_path / "bad.json")]) == 2
    assert capsys.readouterr().err.startswith("error: --classes")
    assert convert_main([str(tmp_path / "classes.json"), str(tmp_path / "other")]) == 2
    assert "not a supported source" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
