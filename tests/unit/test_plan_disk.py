"""The disk a run's checkpoints need (engine/plan/disk.py): one checkpoint's size from the
parameters, precision and ZeRO stage; how many are on disk at once; and the warning, or the
refusal, when the file system under the run directory (a real small tmpfs here) cannot hold them."""
import dataclasses
import json
import subprocess
import tempfile
from pathlib import Path

import pytest

from engine.errors import UserError
from engine.objectives.method import lookup
from engine.plan.disk import (MB, KEEP_LAST, check_room, checkpoint_bytes_per_param, checkpoints_at_once,
                              free_bytes, staging_decision)
from engine.plan.resolve import RunPlan
from engine.plan.resume import check_resumable
from tests.unit.test_plan import CPU_ONLY, H100_X8, plan_for, reason


# Measured on this project's runs: the debug model (3,588,303 parameters) wrote 43,192,035 bytes on
# one rank in fp32 without ZeRO (12.04 per parameter), 57,512,116 on two ranks at ZeRO-1 (16.03).
@pytest.mark.parametrize("precision, stage, per_param", [
    ("fp32", 0, 12),   # fp32 weights stepped in place, Adam's two moments
    ("bf16", 0, 12),   # autocast: the weights stay fp32
    ("fp32", 1, 16),   # ZeRO's fp32 master copy beside the fp32 weights
    ("bf16", 1, 14), ("fp16", 2, 14), ("fp16", 0, 14),  # 16-bit weights, fp32 master
])
def test_bytes_per_parameter(precision, stage, per_param):
    assert checkpoint_bytes_per_param(precision, stage) == per_param


@pytest.mark.parametrize("total, every, at_once", [(110, 22, KEEP_LAST + 1), (16, 4, 3), (8, 4, 2), (4, 4, 1),
                                                   (5, 4, 2), (3, 4, 1)])
def test_checkpoints_on_disk_at_once(total, every, at_once):
    assert checkpoints_at_once(total, every) == at_once


def test_the_plan_states_the_size_and_why():
    plan = plan_for(CPU_ONLY)
    assert plan.checkpoint_bytes == plan.n_params * 12 and plan.checkpoints_on_disk == 3
    assert "12 bytes per parameter, fp32 weights plus two optimizer states" in reason(plan, "checkpoint_bytes")
    big = plan_for(H100_X8, n_params=150_000_000)
    assert (big.precision, big.zero_stage, big.checkpoint_bytes) == ("bf16", 1, 150_000_000 * 14)
    assert "2.1 GB: 14 bytes per parameter, 16-bit weights plus an fp32 master copy" in reason(big, "checkpoint_bytes")
    assert "6.3 GB at most: the last 2 complete checkpoints and the one being written" in reason(
        big, "checkpoints_on_disk")


def test_a_run_written_before_the_estimate_still_resumes(tmp_path):
    """Neither field must match: a plan.json without them (older runs) resumes."""
    plan = plan_for(CPU_ONLY, global_batch=64)
    fields = {f.name: f for f in dataclasses.fields(RunPlan)}
    assert "resume" not in fields["checkpoint_bytes"].metadata
    assert "resume" not in fields["checkpoints_on_disk"].metadata
    saved = {k: v for k, v in plan.to_dict().items() if k not in ("checkpoint_bytes", "checkpoints_on_disk")}
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step00000020")
    (tmp_path / "plan.json").write_text(json.dumps(saved))
    assert check_resumable(tmp_path, plan, lookup(plan.method, plan.model)) == json.loads(json.dumps(saved))


@pytest.fixture
def disk(tmp_path):
    """A real 8 MB file system, unmounted at the end whatever happens."""
    folder = tmp_path / "disk"
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8M", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"a real small filesystem is needed and mounting a tmpfs is not permitted here: "
                    f"{done.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_room_for_every_checkpoint_says_nothing(disk):
    assert free_bytes(disk / "run" / "not" / "made") == free_bytes(disk) == 8 * 2**20
    assert check_room(disk / "run", 2 * MB, 3) is None


def test_room_for_some_warns_with_the_numbers_and_the_fix(disk):
    warning = check_room(disk / "run", 3 * MB, 3)
    assert warning == (f"warning: the file system of {disk / 'run'} has 8.4 MB free; this run needs 9.0 MB for 3 "
                       "more checkpoint(s) of 3.0 MB on disk at once (checkpoints_on_disk in the plan). It will "
                       "stop with a message at the first checkpoint that does not fit: free space there, or "
                       "give --out on a larger disk")


def test_no_room_for_one_is_refused(disk):
    with pytest.raises(UserError, match=rf"the file system of {disk / 'run'} has 8.4 MB free, less than one "
                                        r"checkpoint of this run \(9.0 MB.*nothing\. Free space there, or give --out on a larger disk\.$"):
        check_room(disk / "run", 9 * MB, 3)


def test_a_resumed_run_counts_the_checkpoints_it_has(disk):
    for tag in ("step00000004", "step00000008"):
        (disk / "run" / "checkpoints" / tag).mkdir(parents=True)
    assert check_room(disk / "run", 3 * MB, 3) is None  # one more at a time: 3 of 8.4 MB
    with pytest.raises(UserError, match="then run the same command again: it resumes from its last checkpoint.$"):
        check_room(disk / "run", 9 * MB, 3)


def test_a_run_in_an_object_store_is_staged_in_the_nodes_temporary_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    tempfile.tempdir = None  # read TMPDIR again
    try:
        folder, reason = staging_decision("s3://bucket/team/run 1", None)
    finally:
        tempfile.tempdir = None
    assert folder == str(tmp_path / "clipzero-staging" / "bucket-team-run-1")
    assert "TMPDIR" in reason and "--staging" in reason and "s3://bucket/team/run 1" in reason
    assert staging_decision("s3://bucket/run", "scratch")[0] == str(Path("scratch").absolute())
    assert staging_decision("runs/local", None)[0] is None and staging_decision(None, None)[0] is None
    with pytest.raises(UserError, match="--staging /scratch is for a run whose --out is an object store URL"):
        staging_decision("runs/local", "/scratch")
