"""`sbatch --array 0-1 launchers/slurm/convert.sbatch SRC DST` on the real SLURM of the test suite
(tests/integration/slurm_cluster.py): two tasks convert a part each, a dependent job merges;
when a part fails the merge names it, and resubmitting that part alone publishes the dataset,
the same as a conversion in one process; and the same from an s3:// source to an s3:// DST."""
import json
import re
import sys
import time
from pathlib import Path

import pytest

from launching import ROOT
from engine.data.convert import convert, writer
from tests.unit.test_convert_parallel import _samples, _write_folder
from tests.unit.test_convert_split import _shards
from s3_server import BUCKET, s3_server  # noqa: F401  (the session fixture)
from test_convert_store import _streamed, _tars

SBATCH = ROOT / "launchers" / "slurm" / "convert.sbatch"


def _merge_job(log: Path, timeout: float = 60) -> str:
    """The merge job the array's first task submitted, read from its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"clipzero: job (\d+) merges", log.read_text()) if log.exists() else None
        if found:
            return found[1]
        time.sleep(0.2)
    pytest.fail(f"no merge job announced in {log} within {timeout} s: "
                f"{log.read_text()[-2000:] if log.exists() else '(no log)'}")


def test_array_job_converts_parts_and_a_dependent_job_merges_them(slurm_cluster, tmp_path):
    pairs = _write_folder(tmp_path / "src", 1100, side=8)  # 2 blocks of 1,024 listed pairs: one per task
    convert(tmp_path / "src", tmp_path / "whole", workers=1, log=lambda line: None)
    dst = tmp_path / "dst"
    # Part 1 meets work of another converter version: it refuses (exit 2) until run with --overwrite.
    stale = writer.work_dir(dst) / "split-00001-of-00002"
    stale.mkdir(parents=True)
    (stale / writer.JOB).write_text(json.dumps({"format": -1}))

    env = {"CLIPZERO_ROOT": str(ROOT), "CLIPZERO_PYTHON": sys.executable}
    options = [f"--chdir={tmp_path}", f"--output={tmp_path}/convert-%A_%a.out"]
    args = [tmp_path / "src", dst, "--workers", "1"]
    array = slurm_cluster.submit(SBATCH, args, ["--array=0-1", *options], env=env)
    merge = _merge_job(tmp_path / f"convert-{array}_0.out")
    slurm_cluster.wait_until(merge, "FAILED", timeout=120)  # afterany: it ran although part 1 failed
    merge_log = (tmp_path / f"convert-{array}_merge.out").read_text()
    assert re.search(r"1 of 2 parts are missing or unfinished \(part\(s\) 1\); run .*--part 1/2", merge_log), merge_log
    assert "written by another version of the converter" in (tmp_path / f"convert-{array}_1.out").read_text()
    assert not dst.exists()

    # Part 1 again, alone: CLIPZERO_PARTS says how many parts there are.
    again = slurm_cluster.submit(SBATCH, [*args, "--overwrite"], ["--array=1", *options],
                                 env={**env, "CLIPZERO_PARTS": "2"})
    log = tmp_path / f"convert-{again}_1.out"
    merge = _merge_job(log)
    slurm_cluster.wait_until(merge, "COMPLETED", timeout=120)
    assert "converts part 1 of 2" in log.read_text()
    assert "wrote 1,100 samples" in (tmp_path / f"convert-{again}_merge.out").read_text()
    assert _samples(dst) == _samples(tmp_path / "whole") == pairs
    assert _shards(dst) == _shards(tmp_path / "whole")


def test_array_job_from_and_to_the_object_store(slurm_cluster, s3_server, tmp_path, monkeypatch):  # noqa: F811
    """The same array job with s3:// SOURCE and DST (moto's server, s3_server.py): no shared disk
    is used; the merge job publishes a dataset that streams back as a local conversion's samples."""
    pairs = _tars(tmp_path / "src", [12, 9, 5])
    convert(tmp_path / "src", tmp_path / "whole", workers=1, log=lambda line: None)
    source, dst = s3_server.upload(tmp_path / "src", "slurm-src"), f"s3://{BUCKET}/slurm-dst"
    env = {"CLIPZERO_ROOT": str(ROOT), "CLIPZERO_PYTHON": sys.executable, **s3_server.env}
    options = [f"--chdir={tmp_path}", f"--output={tmp_path}/convert-%A_%a.out"]
    array = slurm_cluster.submit(SBATCH, [source, dst, "--workers", "1", "--staging", tmp_path / "staging"],
                                 ["--array=0-1", *options], env=env)
    merge = _merge_job(tmp_path / f"convert-{array}_0.out")
    slurm_cluster.wait_until(merge, "COMPLETED", timeout=120)
    assert "wrote 22 samples to s3://" in (tmp_path / f"convert-{array}_merge.out").read_text()
    assert "converting 2 of 3 source file(s)" in (tmp_path / f"convert-{array}_0.out").read_text()
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    assert _streamed(dst, tmp_path / "cache") == _samples(tmp_path / "whole") == pairs
