"""Failures from outside the input: a worker killed (as the OOM killer does), a full disk, a
read-only output. Each ends the conversion promptly with one line saying what to do, keeps the
finished blocks, and the same command run again resumes to what an uninterrupted run writes."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.data.convert import convert, writer
from engine.errors import UserError
from launchers.convert import main as convert_main
from tests.unit.test_convert_parallel import _samples, _write_folder
from tests.small_disk import mount_tmpfs

REPO = Path(__file__).resolve().parents[2]

# The launcher with each pair slowed down (to find the run mid-way) and, optionally, smaller blocks.
DRIVER = """
import sys, time
from engine.data.convert import samples, writer
pause, block = float(sys.argv[1]), int(sys.argv[2])
writer.ENTRIES_PER_BLOCK = block or writer.ENTRIES_PER_BLOCK
make_sample = samples.make_sample
def slowed(pair, rules):
    time.sleep(pause)
    return make_sample(pair, rules)
samples.make_sample = slowed
from launchers.convert import main
sys.exit(main(sys.argv[3:]))
"""


def _start(pause: float, block: int, args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", DRIVER, str(pause), str(block), *args], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen, within_s: float) -> tuple[int, str]:
    """The exit code and stderr of `process`, which must end within `within_s` seconds."""
    try:
        _, stderr = process.communicate(timeout=within_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the process and any worker it left
        _, stderr = process.communicate()
        pytest.fail(f"the conversion did not exit within {within_s} s after the failure; stderr:\n{stderr}")
    return process.returncode, stderr


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            pass  # a process that ended while we looked
    return sorted(found)


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_killed_worker_ends_the_run_with_a_message_and_a_rerun_resumes(tmp_path):
    # Six blocks of the default 1,024 pairs: a block pickled for a worker is larger than a pipe's
    # buffer, so a block queued for a dead worker blocks its feeder thread, as in a real run.
    pairs = _write_folder(tmp_path / "src", 5 * writer.ENTRIES_PER_BLOCK + 80, side=16)
    args = [str(tmp_path / "src"), str(tmp_path / "out"), "--workers", "2"]
    work = tmp_path / ".out.converting"
    run = _start(0.002, 0, args)  # about 2 s a block: time to catch both workers on their second block
    deadline = time.monotonic() + 120
    while len(list(work.glob("part-*/.staging-00000[23]"))) < 2:  # a third block now waits in each queue
        assert run.poll() is None and time.monotonic() < deadline, run.communicate()
        time.sleep(0.02)
    workers = _children(run.pid)
    assert len(workers) == 2, workers
    os.kill(workers[0], signal.SIGKILL)  # as the out-of-memory killer does

    code, stderr = _finish(run, within_s=60)
    assert code == 2 and "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: convert worker ") and "killed by signal SIGKILL" in last, stderr
    assert f"finished block(s) are kept in {work}" in last and "run the same command again" in last
    assert not any(_alive(pid) for pid in workers), "a worker outlived the failed conversion"
    finished = len(list(work.glob("part-*/block-*")))
    assert finished >= 2 and not (tmp_path / "out").exists()

    assert convert_main(args) == 0  # the same command again, here in this process
    report = json.loads((tmp_path / "out" / "convert_report.json").read_text())
    assert report["resumed_blocks"] == finished and report["blocks"] == 6 and report["written"] == len(pairs)
    convert(tmp_path / "src", tmp_path / "reference", workers=2, log=lambda line: None)
    assert _samples(tmp_path / "out") == _samples(tmp_path / "reference") == pairs


@pytest.fixture
def small_disk(tmp_path):
    """A real 3 MiB filesystem, unmounted at the end whatever happens."""
    disk = tmp_path / "disk"
    mount_tmpfs(disk, "size=3M")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.parametrize("workers", [1, 2])
def test_full_disk_says_what_to_do_and_the_rerun_resumes(tmp_path, small_disk, monkeypatch, workers):
    pairs = _write_folder(tmp_path / "src", 700, side=96)  # about 4 MiB of JPEGs onto 3 MiB
    out = small_disk / "out"
    args = [str(tmp_path / "src"), str(out), "--workers", str(workers)]
    code, stderr = _finish(_start(0, 64, args), within_s=120)
    assert code == 2 and "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: no space left on the filesystem of {out} "), stderr
    assert "free space there" in last and "run the same command again: it resumes" in last
    work = small_disk / ".out.converting"
    finished = len(list(work.glob("part-*/block-*")))
    assert finished >= 2 and not list(work.glob("part-*/.staging-*"))  # a cut-short block gave its room back

    # Space freed (the same filesystem, grown): the same command resumes and loses nothing.
    subprocess.run(["mount", "-o", "remount,size=64M", str(small_disk)], check=True)
    monkeypatch.setattr(writer, "ENTRIES_PER_BLOCK", 64)
    assert convert_main(args) == 0
    report = json.loads((out / "convert_report.json").read_text())
    assert report["resumed_blocks"] == finished and report["written"] == 700
    assert _samples(out) == pairs


def test_read_only_output_says_what_to_do(tmp_path):
    _write_folder(tmp_path / "src", 3, side=16)
    disk = tmp_path / "readonly"
    mount_tmpfs(disk, "size=1M,ro")
    try:
        with pytest.raises(UserError, match=rf"cannot write under {disk / 'out'} \(.*Read-only file system\): "
                                            rf"make {disk} writable"):
            convert(tmp_path / "src", disk / "out", workers=1, log=lambda line: None)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
