"""Converter options: label columns -> `cls` + classes.json, --max-side, --compression, the report file."""
import csv
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from streaming import LocalDataset

from engine.data.convert import convert
from engine.data.mds import describe_mds
from engine.errors import UserError
from launchers.convert import main as convert_main
from launchers.convert import parse_args


def _image(seed: int, size=(24, 32), fmt="JPEG", mode="RGB") -> bytes:
    channels = {"RGB": 3, "RGBA": 4}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, channels), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode).save(buffer, format=fmt)
    return buffer.getvalue()


def _csv(tmp_path, rows: list[dict], name="pairs.csv"):
    with open(tmp_path / name, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return tmp_path / name


def _images(tmp_path, n, **kwargs) -> list[bytes]:
    encoded = [_image(i, **kwargs) for i in range(n)]
    for i, data in enumerate(encoded):
        (tmp_path / f"{i}.jpg").write_bytes(data)
    return encoded


def _read(out) -> list[dict]:
    dataset = LocalDataset(local=str(out))
    return [dataset[i] for i in range(len(dataset))]


def test_label_column_writes_cls_and_classes_json(tmp_path):
    labels = ["dog", "cat", "dog", "bird", " cat ", ""]
    encoded = _images(tmp_path, len(labels))
    source = _csv(tmp_path, [{"image": f"{i}.jpg", "caption": f"c{i}", "species": label}
                             for i, label in enumerate(labels)])
    report = convert(source, tmp_path / "out", label_column="species", log=lambda line: None)
    info = describe_mds(str(tmp_path / "out"))  # the training reader accepts the extra column
    assert info.columns == {"jpg": "bytes", "txt": "str", "cls": "int"}
    assert info.classes == {"classnames": ["bird", "cat", "dog"], "templates": ["a photo of a {}."]}
    samples = _read(tmp_path / "out")
    assert [(s["jpg"], s["txt"], s["cls"]) for s in samples] == [
        (encoded[0], "c0", 2), (encoded[1], "c1", 1), (encoded[2], "c2", 2), (encoded[3], "c3", 0),
        (encoded[4], "c4", 1)]
    assert report.skipped == {"missing label": 1} and report.classes == 3
    assert "labels: 3 class(es)" in report.summary()


def test_integer_labels_sort_by_value_in_jsonl_and_parquet(tmp_path):
    labels = [10, 2, 0, 2, 10, 1]
    encoded = _images(tmp_path, len(labels))
    lines = [json.dumps({"image": f"{i}.jpg", "text": f"t{i}", "y": label}) for i, label in enumerate(labels)]
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines))
    convert(tmp_path / "pairs.jsonl", tmp_path / "jsonl", label_column="y", log=lambda line: None)
    pq.write_table(pa.table({"image": encoded, "text": [f"t{i}" for i in range(6)], "y": labels}),
                   tmp_path / "pairs.parquet")
    convert(tmp_path / "pairs.parquet", tmp_path / "parquet", label_column="y", log=lambda line: None)
    for out in ("jsonl", "parquet"):
        assert describe_mds(str(tmp_path / out)).classes["classnames"] == ["0", "1", "2", "10"]
        assert [s["cls"] for s in _read(tmp_path / out)] == [3, 2, 0, 2, 3, 1]


def test_classes_file_orders_labels_and_skips_others(tmp_path):
    _images(tmp_path, 4)
    source = _csv(tmp_path, [{"image": f"{i}.jpg", "caption": "x", "label": label}
                             for i, label in enumerate(["cat", "dog", "fish", "cat"])])
    classes = {"classnames": ["dog", "cat"], "templates": ["a {} photo."]}
    (tmp_path / "classes.json").write_text(json.dumps(classes))
    report = convert(source, tmp_path / "out", label_column="label", classes=tmp_path / "classes.json",
                     log=lambda line: None)
    assert [s["cls"] for s in _read(tmp_path / "out")] == [1, 0, 1]
    assert report.skipped == {"label not in --classes": 1} and "fish" in report.examples["label not in --classes"][0]
    assert describe_mds(str(tmp_path / "out")).classes == classes


def test_label_column_needs_a_table_source(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.jpg").write_bytes(_image(0))
    (tmp_path / "src" / "a.txt").write_text("a")
    with pytest.raises(UserError, match=r"--label-column names a column of a CSV/TSV/JSONL or parquet source"):
        convert(tmp_path / "src", tmp_path / "out", label_column="label")
    source = _csv(tmp_path, [{"image": "src/a.jpg", "caption": "x"}])
    with pytest.raises(UserError, match=r"no column 'label' \(given by --label-column\)"):
        convert(source, tmp_path / "out", label_column="label")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.csv", "src"]


def test_max_side_reencodes_only_large_images(tmp_path):
    small = _image(0, size=(40, 60))
    wide = _image(1, size=(100, 200), fmt="PNG", mode="RGBA")   # alpha: composited onto white
    tall = _image(2, size=(300, 90))
    edge = _image(3, size=(64, 64), fmt="PNG")                 # exactly the limit: kept
    for name, data in (("small.jpg", small), ("wide.png", wide), ("tall.jpg", tall), ("edge.png", edge)):
        (tmp_path / name).write_bytes(data)
    source = _csv(tmp_path, [{"image": name, "caption": name} for name in ("small.jpg", "wide.png", "tall.jpg",
                                                                          "edge.png")])
    report = convert(source, tmp_path / "out", max_side=64, log=lambda line: None)
    stored = {s["txt"]: s["jpg"] for s in _read(tmp_path / "out")}
    assert stored["small.jpg"] == small and stored["edge.png"] == edge
    for name, size in (("wide.png", (64, 32)), ("tall.jpg", (19, 64))):
        with Image.open(io.BytesIO(stored[name])) as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", size)
    assert report.reencoded == 2 and "re-encoded 2 image(s) larger than 64 px" in report.summary()

    clear = io.BytesIO()
    Image.new("RGBA", (128, 128), (255, 0, 0, 0)).save(clear, format="PNG")  # red, but fully transparent
    (tmp_path / "clear.png").write_bytes(clear.getvalue())
    convert(_csv(tmp_path, [{"image": "clear.png", "caption": "c"}], "clear.csv"), tmp_path / "clear",
            max_side=32, log=lambda line: None)
    with Image.open(io.BytesIO(_read(tmp_path / "clear")[0]["jpg"])) as image:
        assert np.asarray(image).min() > 245  # white, not the hidden red


def _dali_decode(encoded: bytes) -> np.ndarray:
    """The image as the training loader's DALI decoder (CPU) gives it."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def decode():
        return fn.decoders.image(fn.external_source(name="encoded"), device="cpu", output_type=types.RGB)

    pipe = decode()
    pipe.build()
    pipe.feed_input("encoded", [np.frombuffer(encoded, np.uint8)])
    return np.array(pipe.run()[0][0])


def test_16_bit_grey_is_scaled_to_8_bits_as_the_loader_decodes_it(tmp_path):
    ramp = io.BytesIO()  # black to white across 256 columns, in 16-bit grey
    Image.fromarray(np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (32, 1))).save(ramp, format="PNG")
    (tmp_path / "ramp.png").write_bytes(ramp.getvalue())
    source = _csv(tmp_path, [{"image": "ramp.png", "caption": "a grey ramp"}])
    convert(source, tmp_path / "kept", log=lambda line: None)
    convert(source, tmp_path / "shrunk", max_side=128, log=lambda line: None)

    kept = _read(tmp_path / "kept")[0]["jpg"]
    assert kept == ramp.getvalue()  # small enough: stored as is, and DALI scales 16 bits to 8 itself
    assert np.abs(_dali_decode(kept)[16, :, 0].astype(int) - np.linspace(0, 255, 256)).max() <= 1
    with Image.open(io.BytesIO(_read(tmp_path / "shrunk")[0]["jpg"])) as image:
        assert (image.format, image.size) == ("JPEG", (128, 16))
        row = np.asarray(image.convert("L"))[8].astype(int)
    # the same ramp, not clipped to white: re-encoded, it looks to the loader as the original does
    assert np.all(np.diff(row) >= 0) and row[0] <= 2 and row[-1] >= 253
    assert np.abs(row - np.linspace(0, 255, 128)).max() <= 3


def test_compressed_shards_read_back_through_streaming(tmp_path):
    from streaming import StreamingDataset

    encoded = _images(tmp_path, 5)
    source = _csv(tmp_path, [{"image": f"{i}.jpg", "caption": f"c{i}"} for i in range(5)])
    convert(source, tmp_path / "out", compression="zstd:7", log=lambda line: None)
    assert [p.name for p in (tmp_path / "out").rglob("shard.*")] == ["shard.00000.mds.zstd"]
    assert describe_mds(str(tmp_path / "out")).num_samples == 5
    dataset = StreamingDataset(local=str(tmp_path / "out"), batch_size=1, shuffle=False)
    assert [(s["jpg"], s["txt"]) for s in dataset] == [(e, f"c{i}") for i, e in enumerate(encoded)]

    with pytest.raises(UserError, match=r"--compression zip: MDS shards take one of br, bz2, gz, snappy, zstd"):
        convert(source, tmp_path / "bad", compression="zip")
    with pytest.raises(UserError, match=r"--compression zstd:99"):
        convert(source, tmp_path / "bad", compression="zstd:99")


def test_report_file_and_launcher_options(tmp_path, capsys):
    _images(tmp_path, 3)
    source = _csv(tmp_path, [{"image": name, "caption": "a cat"} for name in ("0.jpg", "gone.jpg", "2.jpg")])
    assert convert_main([str(source), str(tmp_path / "out"), "--shard-size-mb", "2", "--workers", "1"]) == 0
    assert "wrote 2 samples" in capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "convert_report.json").read_text())
    assert report["written"] == 2 and report["skipped_total"] == 1 and report["workers"] == 1
    assert report["skipped"] == {"missing image file": {"count": 1, "examples": [
        f"pairs.csv:3 gone.jpg ({tmp_path / 'gone.jpg'})"]}}
    assert report["options"]["shard_size_mb"] == 2 and report["source"] == str(source.resolve())
    assert report["reencoded"] == 0 and report["pairs_per_s"] > 0 and report["seconds"] > 0
    assert report["shards"] == 1 and report["bytes"] > 0 and report["resumed_blocks"] == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["convert_report.json", "index.json", "part-00000"]

    assert parse_args(["a", "b", "--shard-size", "7"]).shard_size_mb == 7
    assert parse_args(["--synthetic", "5", "out"]).out == "out"
    with pytest.raises(SystemExit):
        parse_args(["--synthetic", "5", "src", "out"])
    capsys.readouterr()
    assert convert_main([str(source), str(tmp_path / "o2"), "--shard-size", "0"]) == 2
    assert "--shard-size 0: give 1 to 4095 MiB" in capsys.readouterr().err


def test_progress_bar_on_a_terminal_and_lines_otherwise(monkeypatch):
    from engine.data.convert import report as report_module

    lines = []
    monkeypatch.setattr(report_module, "PROGRESS_EVERY_S", 0.0)
    quiet = report_module.Progress(lines.append, stream=io.StringIO())
    quiet.add(10, 8)
    assert len(lines) == 1 and lines[0].startswith("  10 pairs handled (8 written, 2 skipped), ")

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    terminal = Terminal()
    bar = report_module.Progress(lines.append, total=20, stream=terminal)
    bar.add(20, 19)
    bar.close()
    assert "20/20" in terminal.getvalue() and "pair/s" in terminal.getvalue() and "skipped=1" in terminal.getvalue()
    assert len(lines) == 1


def test_what_the_training_loader_would_replace_is_left_out_when_converting(tmp_path):
    # 1x1 images and 30 kB captions decode and read fine, but the loader's record check
    # (engine/data/records.py) would replace them: the converter leaves them out instead.
    from engine.data.records import LONG_CAPTION, TOO_SMALL

    folder = tmp_path / "pairs"
    folder.mkdir()
    rows = []
    for index, (side, caption) in enumerate([(24, "a fine pair"), (1, "a dot"), (24, "page text " * 3_000)]):
        buffer = io.BytesIO()
        Image.fromarray(np.full((side, side, 3), 40 * index, dtype=np.uint8)).save(buffer, format="PNG")
        (folder / f"{index}.png").write_bytes(buffer.getvalue())
        rows.append({"image": f"{index}.png", "caption": caption})
    listing = folder / "pairs.jsonl"
    listing.write_text("".join(json.dumps(row) + "\n" for row in rows))
    report = convert(listing, tmp_path / "out", workers=1, log=lambda line: None)
    assert report.written == 1
    assert report.skipped == {TOO_SMALL: 1, LONG_CAPTION: 1}
