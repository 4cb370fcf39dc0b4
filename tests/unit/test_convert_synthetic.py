"""--synthetic: deterministic coloured-shape pairs whose captions say what the image shows."""
import io
import json
import re

import numpy as np
from PIL import Image
from streaming import LocalDataset

from engine.data.convert import convert, synthetic, writer
from engine.data.mds import describe_mds
from launchers.convert import main as convert_main

CAPTION = re.compile(r"(an?) (\w+) (\w+) (on the left|on the right|at the top|at the bottom|in the centre)")


def _read(out) -> list[dict]:
    dataset = LocalDataset(local=str(out))
    return [dataset[i] for i in range(len(dataset))]


def _nearest_colour(pixel: np.ndarray) -> str:
    return min(synthetic.COLOURS, key=lambda name: np.sum((np.array(synthetic.COLOURS[name]) - pixel) ** 2))


def test_synthetic_is_deterministic_for_any_worker_count(tmp_path, monkeypatch):
    monkeypatch.setattr(writer, "ENTRIES_PER_BLOCK", 16)
    one = convert(None, tmp_path / "one", synthetic=60, seed=3, workers=1, log=lambda line: None)
    convert(None, tmp_path / "two", synthetic=60, seed=3, workers=2, log=lambda line: None)
    convert(None, tmp_path / "other", synthetic=60, seed=4, workers=1, log=lambda line: None)
    first, second, other = _read(tmp_path / "one"), _read(tmp_path / "two"), _read(tmp_path / "other")
    assert one.written == 60 and first == second
    assert [s["txt"] for s in first] != [s["txt"] for s in other]
    assert len({s["jpg"] for s in first}) == 60  # no two images alike


def test_captions_say_what_the_images_show(tmp_path):
    convert(None, tmp_path / "out", synthetic=80, seed=0, synthetic_size=64, workers=1, log=lambda line: None)
    info = describe_mds(str(tmp_path / "out"))
    assert info.columns == {"jpg": "bytes", "txt": "str", "cls": "int"}
    assert info.classes["classnames"] == synthetic.classnames() and len(info.classes["classnames"]) == 24
    shape_counts, noisy = set(), 0
    for sample in _read(tmp_path / "out"):
        with Image.open(io.BytesIO(sample["jpg"])) as image:
            assert (image.format, image.size) == ("JPEG", (64, 64))
            pixels = np.asarray(image.convert("RGB")).astype(float)
        mentions = CAPTION.findall(sample["txt"])
        assert mentions and " and ".join(" ".join(mention) for mention in mentions) in sample["txt"]
        shape_counts.add(len(mentions))
        noisy += sample["txt"].endswith("on a noisy background")
        for article, colour, shape, phrase in mentions:
            assert article == ("an" if colour == "orange" else "a")
            place = next(name for name, text in synthetic.PHRASES.items() if text == phrase)
            fx, fy = synthetic.PLACES[place]
            x, y = int(fx * 64), int(fy * 64)
            centre = np.median(pixels[y - 1:y + 2, x - 1:x + 2].reshape(-1, 3), axis=0)
            assert _nearest_colour(centre) == colour, (sample["txt"], place, centre)
            assert np.abs(centre - np.array(synthetic.COLOURS[colour])).max() < 50
        first = f"{mentions[0][1]} {mentions[0][2]}"
        assert info.classes["classnames"][sample["cls"]] == first
    assert shape_counts == {1, 2} and 10 < noisy < 70


def test_synthetic_from_the_launcher(tmp_path, capsys):
    assert convert_main(["--synthetic", "12", str(tmp_path / "shapes"), "--seed", "7", "--synthetic-size", "32",
                         "--workers", "2"]) == 0
    assert "wrote 12 samples" in capsys.readouterr().out
    report = json.loads((tmp_path / "shapes" / "convert_report.json").read_text())
    assert report["source"] == "synthetic" and report["options"]["synthetic"] == 12
    assert report["options"]["seed"] == 7 and report["classes"] == 24
    with Image.open(io.BytesIO(_read(tmp_path / "shapes")[0]["jpg"])) as image:
        assert image.size == (32, 32)
    assert convert_main(["--synthetic", "0", str(tmp_path / "none")]) == 2
    assert "--synthetic 0" in capsys.readouterr().err
    assert convert_main(["--synthetic", "3", str(tmp_path / "none"), "--label-column", "y"]) == 2
    assert "--synthetic draws its pairs: drop --label-column" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
