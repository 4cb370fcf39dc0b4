"""A conversion split into parts (`--part I/N`) and merged (`--merge`) equals a whole conversion."""
import json
import shutil

import pytest
from streaming import StreamingDataset

from engine.data.convert import convert, merge, samples, writer
from engine.errors import UserError
from launchers.convert import main as convert_main
from tests.unit.test_convert_parallel import _crash_after, _samples, _write_folder

quiet = dict(log=lambda line: None)


def _shards(out) -> list[tuple[dict, bytes]]:
    """Each shard's index entry without its path, and its bytes, in index order."""
    shards = []
    for shard in json.loads((out / "index.json").read_text())["shards"]:
        path = shard["raw_data"]["basename"]
        shards.append(({**shard, "raw_data": {**shard["raw_data"], "basename": path.rsplit("/", 1)[1]}},
                       (out / path).read_bytes()))
    return shards


def test_parts_merged_equal_a_whole_conversion_and_reruns_convert_only_what_is_missing(tmp_path, monkeypatch):
    pairs = _write_folder(tmp_path / "src", 50)
    (tmp_path / "src" / "00000" / "000007.jpg").write_bytes(b"not a jpeg")  # skipped, and counted, in both
    del pairs[7]
    monkeypatch.setattr(writer, "ENTRIES_PER_BLOCK", 4)  # 13 blocks
    whole = convert(tmp_path / "src", tmp_path / "whole", workers=2, **quiet)

    out = tmp_path / "split"
    convert(tmp_path / "src", out, part=(0, 3), workers=2, **quiet)
    with pytest.raises(UserError, match=r"2 of 3 parts are missing or unfinished \(part\(s\) 1, 2\); run "
                                        r"`launchers/convert.py SOURCE .*split --part 1/3`"):
        merge(out)
    make_sample = _crash_after(monkeypatch, 10)  # part 1 (blocks 1, 4, 7, 10) dies in its third block
    with pytest.raises(RuntimeError, match="power cut"):
        convert(tmp_path / "src", out, part=(1, 3), workers=1, **quiet)
    with pytest.raises(UserError, match=r"part\(s\) 1, 2\)"):  # a crashed part is not done
        merge(out)
    seen = []
    monkeypatch.setattr(samples, "make_sample", lambda pair, rules: seen.append(pair.name) or make_sample(pair, rules))
    part = convert(tmp_path / "src", out, part=(1, 3), workers=1, **quiet)  # in this process: `seen` counts
    assert (part.resumed_blocks, part.processed, len(seen)) == (2, 8, 8)  # blocks 7 and 10 only
    with pytest.raises(UserError, match="holds parts of a split conversion of .*split: convert the missing ones"):
        convert(tmp_path / "src", out, **quiet)  # a whole conversion would mix with the parts: refused
    convert(tmp_path / "src", out, part=(2, 3), workers=3, **quiet)
    assert not out.exists()  # no part publishes

    report = merge(out)
    assert _samples(out) == _samples(tmp_path / "whole") == pairs
    assert _shards(out) == _shards(tmp_path / "whole")  # same shard files and index entries, other folders
    index = json.loads((out / "index.json").read_text())
    assert index["shards"][1]["raw_data"]["basename"].startswith("split-00001-of-00003/part-00000/block-000001/")
    assert (report.written, report.blocks, report.skipped) == (49, 13, whole.skipped)
    assert sum(whole.skipped.values()) == 1
    streamed = StreamingDataset(local=str(out), batch_size=1, shuffle=False)
    assert [s["txt"] for s in streamed] == [c for _, c in pairs]
    assert not writer.work_dir(out).exists() and not list(out.rglob(writer.RECORD)) and not list(out.rglob(writer.DONE))


def test_refusals_and_the_command_line(tmp_path, monkeypatch, capsys):
    _write_folder(tmp_path / "src", 10)
    monkeypatch.setattr(writer, "ENTRIES_PER_BLOCK", 4)  # 3 blocks: part 3 of 4 has none
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"nothing to merge into .*out: .*does not exist; convert the parts first"):
        merge(out)
    assert convert_main([str(tmp_path / "src"), str(out), "--part", "4/4"]) == 2
    assert "--part 4/4: give I/N with 0 <= I < N" in capsys.readouterr().err
    for i in (0, 1, 3):
        assert convert_main([str(tmp_path / "src"), str(out), "--part", f"{i}/4", "--workers", "1"]) == 0
    assert "once all 4 are, publish" in capsys.readouterr().err
    convert(tmp_path / "src", out, part=(2, 4), max_side=8, **quiet)  # another option than the others
    with pytest.raises(UserError, match=r"part\(s\) 2 converted with another max_side than part 0; rerun them"):
        merge(out)
    convert(tmp_path / "src", out, part=(2, 4), overwrite=True, **quiet)
    convert(tmp_path / "src", out, part=(0, 2), **quiet)  # a stray second split
    with pytest.raises(UserError, match=r"splits into 2, 4 parts; keep one"):
        merge(out)
    for stray in writer.work_dir(out).glob("split-*-of-00002"):
        shutil.rmtree(stray)
    assert convert_main(["--merge", str(out)]) == 0
    assert "wrote 10 samples" in capsys.readouterr().out
    assert [s for _, s in _samples(out)] == [f"caption {i}" for i in range(10)]
    assert convert_main(["--merge", str(out)]) == 2  # merged already: nothing left to merge
    assert "nothing to merge" in capsys.readouterr().err
    # A URL is never taken for a folder named `s3:`; what the store cannot take is refused before any request.
    monkeypatch.chdir(tmp_path)  # where a URL taken for a relative path would have made its folders
    assert convert_main(["s3://bucket/pairs", str(tmp_path / "o"), "--part", "0/2"]) == 2
    assert "a conversion from the object store writes to the object store" in capsys.readouterr().err
    assert convert_main([str(tmp_path / "src"), "s3://bucket/mds"]) == 2  # images + .txt files, not tars
    assert "read as a folder source: only webdataset .tar and .parquet" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob("*s3*"))
