"""Parallel, resumable conversion: per-worker parts merged into one index; a killed run resumes exactly."""
import fcntl
import io
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from streaming import LocalDataset, StreamingDataset

from engine.data.convert import convert, samples, writer
from engine.data.mds import describe_mds
from engine.errors import UserError
from launchers.convert import main as convert_main

REPO = Path(__file__).resolve().parents[2]


def _write_folder(root, n, side: int = 16) -> list[tuple[bytes, str]]:
    """n noise JPEGs with their captions, 50 per sub-folder; returns the pairs in listing order."""
    pairs = []
    for i in range(n):
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buffer, "JPEG")
        folder = root / f"{i // 50:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:06d}.jpg").write_bytes(buffer.getvalue())
        (folder / f"{i:06d}.txt").write_text(f"caption {i}")
        pairs.append((buffer.getvalue(), f"caption {i}"))
    return pairs


def _samples(out) -> list[tuple[bytes, str]]:
    dataset = LocalDataset(local=str(out))
    return [(dataset[i]["jpg"], dataset[i]["txt"]) for i in range(len(dataset))]


def _files(out) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != "convert_report.json"}


def test_workers_write_parts_merged_in_listing_order(tmp_path, monkeypatch):
    pairs = _write_folder(tmp_path / "src", 50)
    monkeypatch.setattr(writer, "ENTRIES_PER_BLOCK", 4)
    report = convert(tmp_path / "src", tmp_path / "two", workers=2, log=lambda line: None)
    assert _samples(tmp_path / "two") == pairs and report.written == 50 and report.blocks == 13
    index = json.loads((tmp_path / "two" / "index.json").read_text())
    parts = [shard["raw_data"]["basename"].split("/")[0] for shard in index["shards"]]
    assert parts == ["part-00000", "part-00001"] * 6 + ["part-00000"]  # block b from worker b mod 2
    # each part reads as a dataset of its own: worker 0's blocks 0, 2, 4, ...
    part = LocalDataset(local=str(tmp_path / "two" / "part-00000"))
    assert [part[i]["txt"] for i in range(len(part))] == [c for i, (_, c) in enumerate(pairs) if i // 4 % 2 == 0]
    streamed = StreamingDataset(local=str(tmp_path / "two"), batch_size=1, shuffle=False)
    assert [(s["jpg"], s["txt"]) for s in streamed] == pairs

    # The same input gives the same files, for this and for any other number of workers.
    convert(tmp_path / "src", tmp_path / "again", workers=2, log=lambda line: None)
    convert(tmp_path / "src", tmp_path / "three", workers=3, log=lambda line: None)
    assert _files(tmp_path / "two") == _files(tmp_path / "again")
    assert _samples(tmp_path / "three") == pairs
    assert json.loads((tmp_path / "two" / "convert_report.json").read_text())["workers"] == 2


def _crash_after(monkeypatch, count: int):
    """Make the conversion fail at its `count`-th pair, as a crash would."""
    seen = []
    make_sample = samples.make_sample

    def crashing(pair, rules):
        seen.append(pair.name)
        if len(seen) == count:
            raise RuntimeError("power cut")
        return make_sample(pair, rules)
    monkeypatch.setattr(samples, "make_sample", crashing)
    return make_sample


def test_resume_with_other_workers_and_refusal_of_other_options(tmp_path, monkeypatch):
    pairs = _write_folder(tmp_path / "src", 30)
    monkeypatch.setattr(writer, "ENTRIES_PER_BLOCK", 4)
    make_sample = _crash_after(monkeypatch, 14)
    with pytest.raises(RuntimeError, match="power cut"):
        convert(tmp_path / "src", tmp_path / "out", workers=1, log=lambda line: None)
    work = tmp_path / ".out.converting"
    assert len(list(work.glob("part-*/block-*"))) == 3 and list(work.glob("part-*/.staging-*"))
    monkeypatch.setattr(samples, "make_sample", make_sample)

    with pytest.raises(UserError, match=r"interrupted conversion with another max_side: rerun that command "
                                         r"to resume it; pass --overwrite"):
        convert(tmp_path / "src", tmp_path / "out", max_side=64, log=lambda line: None)
    import engine.data.convert as converter
    with monkeypatch.context() as patched:  # a later converter, which writes its blocks otherwise
        patched.setattr(converter, "FORMAT_VERSION", converter.FORMAT_VERSION + 1)
        with pytest.raises(UserError, match=r"another format: it was written by another version of the converter "
                                             r"and cannot be resumed; pass --overwrite"):
            convert(tmp_path / "src", tmp_path / "out", log=lambda line: None)
    assert len(list(work.glob("part-*/block-*"))) == 3  # refused: the work is kept

    lines = []
    report = convert(tmp_path / "src", tmp_path / "out", workers=2, log=lines.append)
    assert (report.resumed_blocks, report.blocks, report.processed) == (3, 8, 18)
    assert "resuming" in lines[0] and "resumed: 3 of 8 block(s)" in report.summary()
    assert _samples(tmp_path / "out") == pairs and not work.exists()

    # Other options with --overwrite: the interrupted work is dropped and done again.
    _crash_after(monkeypatch, 6)
    with pytest.raises(RuntimeError):
        convert(tmp_path / "src", tmp_path / "new", workers=1, log=lambda line: None)
    monkeypatch.setattr(samples, "make_sample", make_sample)
    report = convert(tmp_path / "src", tmp_path / "new", max_side=8, overwrite=True, log=lambda line: None)
    assert report.resumed_blocks == 0 and report.reencoded == 30


def test_changed_source_is_not_resumed(tmp_path, monkeypatch):
    _write_folder(tmp_path / "src", 12)
    monkeypatch.setattr(writer, "ENTRIES_PER_BLOCK", 4)
    make_sample = _crash_after(monkeypatch, 10)
    with pytest.raises(RuntimeError):
        convert(tmp_path / "src", tmp_path / "out", workers=1, log=lambda line: None)
    monkeypatch.setattr(samples, "make_sample", make_sample)
    (tmp_path / "src" / "00000" / "000001.txt").unlink()  # a folder source has no file list to compare:
    with pytest.raises(UserError, match=r"source lists other pairs.*block 0"):  # the names' digest catches it
        convert(tmp_path / "src", tmp_path / "out", log=lambda line: None)
    assert (tmp_path / ".out.converting").is_dir()


DRIVER = """
import sys, time
from engine.data.convert import samples, writer
writer.ENTRIES_PER_BLOCK = 8
pause, make_sample = float(sys.argv[1]), samples.make_sample
def slowed(pair, rules):
    time.sleep(pause)
    return make_sample(pair, rules)
samples.make_sample = slowed
from launchers.convert import main
sys.exit(main(sys.argv[2:]))
"""


def _run(pause: float, args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", DRIVER, str(pause), *args], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_killed_conversion_resumes_without_duplicates_or_losses(tmp_path, monkeypatch):
    pairs = _write_folder(tmp_path / "src", 200)
    args = [str(tmp_path / "src"), str(tmp_path / "out"), "--workers", "2"]
    work = tmp_path / ".out.converting"
    killed = _run(0.02, args)  # about 2 s of work after start-up: time to kill it midway
    deadline = time.monotonic() + 60
    while len(list(work.glob("part-*/block-*"))) < 4:
        assert killed.poll() is None and time.monotonic() < deadline, killed.communicate()
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    finished = len(list(work.glob("part-*/block-*")))
    assert not (tmp_path / "out").exists() and 4 <= finished < 25

    # The workers die with the main process: the work folder's lock is soon free.
    fd = os.open(work, os.O_RDONLY)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                assert time.monotonic() < deadline, "a worker outlived the killed conversion"
                time.sleep(0.1)
    finally:
        os.close(fd)

    # The same command again (here in this process: a second interpreter start costs seconds).
    monkeypatch.setattr(writer, "ENTRIES_PER_BLOCK", 8)
    assert convert_main(args) == 0
    report = json.loads((tmp_path / "out" / "convert_report.json").read_text())
    assert report["resumed_blocks"] >= finished and report["blocks"] == 25 and report["written"] == 200
    assert _samples(tmp_path / "out") == pairs  # every pair once, in order: what a never-killed run writes
    convert(tmp_path / "src", tmp_path / "reference", workers=2, log=lambda line: None)
    assert _files(tmp_path / "out") == _files(tmp_path / "reference")
    assert describe_mds(str(tmp_path / "out")).num_samples == 200


def test_workers_are_capped_at_the_blocks_to_convert(tmp_path, monkeypatch):
    import engine.data.convert as package

    pairs = _write_folder(tmp_path / "src", 10)
    monkeypatch.setattr(writer, "ENTRIES_PER_BLOCK", 4)  # 3 blocks
    running = []

    class Counted(package.Progress):  # made once the workers run: counts them, then works as usual
        def __init__(self, *args, **kwargs):
            running.append(len(multiprocessing.active_children()))
            super().__init__(*args, **kwargs)
    monkeypatch.setattr(package, "Progress", Counted)
    asked = max(8, len(os.sched_getaffinity(0)) + 1)
    lines = []
    report = convert(tmp_path / "src", tmp_path / "out", workers=asked, log=lines.append)
    assert running == [3] and report.workers == 3 and _samples(tmp_path / "out") == pairs
    assert any(line.startswith(f"warning: --workers {asked} is more than the ") for line in lines)
    assert "3 worker(s) ran: only 3 block(s) of 4 pairs were left to convert" in lines
    convert(tmp_path / "src", tmp_path / "three", workers=3, log=lambda line: None)
    assert _files(tmp_path / "out") == _files(tmp_path / "three")  # block b still goes to part b mod workers
