"""A full disk under --out (issue 30, bad input), on a real small file system: the run warns at
the start, stops at the checkpoint that does not fit with a message that says so (exit status 2,
no traceback, no rank left behind), keeps its last complete checkpoint, and once the disk has
room the same command resumes from it and ends as a run that never stopped."""
import json
import subprocess

import pytest

from engine.dist import free_port
from launching import REFERENCE_DIALS, check, launch, losses
from tests.small_disk import mount_tmpfs


def test_full_disk_stops_with_the_fix_and_the_same_command_resumes(tmp_path, cache_env, two_rank_reference):
    # REFERENCE_DIALS on 2 ranks write 57 MB checkpoints (ZeRO-1, fp32) at steps 4, 8, 12 and 16:
    # two fit on 130 MB beside the run's logs, the third does not (pruning follows a complete save).
    disk = tmp_path / "disk"
    mount_tmpfs(disk, "size=130M")
    try:
        out, port = disk / "run", free_port()
        args = [*REFERENCE_DIALS, "--out", str(out)]
        first = launch(args, cache_env, ranks=2, port=port, launcher="deepspeed", timeout=300)
        said = first.stdout + first.stderr
        assert first.returncode == 2, said[-4000:]
        assert "Traceback" not in said, said[-4000:]
        assert f"warning: the file system of {out} has " in first.stdout, first.stdout[-4000:]
        errors = [line for line in first.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, said[-4000:]
        message = errors[0]
        checkpoints = out / "checkpoints"
        for part in (f"no space left for the checkpoint of step 12 (about 57.5 MB) under {checkpoints}: ",
                     "MB free once the partial checkpoint is removed",
                     "the last complete checkpoint, of step 8, is kept",
                     "Free space there, or move the run directory to a larger disk and give that as --out",
                     "run the same command again: it resumes"):
            assert part in message, message
        assert (checkpoints / "latest").read_text() == "step00000008"
        assert not (checkpoints / "step00000012").exists()  # the partial one gave its space back

        # The plan's estimate against the checkpoint written (its manifest lists every file).
        written = sum(json.loads((checkpoints / "step00000008" / "manifest.json").read_text())["files"].values())
        estimate = json.loads((out / "plan.json").read_text())["checkpoint_bytes"]
        assert abs(written - estimate) < 0.01 * written, (written, estimate)

        # Room made on the same file system: the same command resumes from step 8.
        subprocess.run(["mount", "-o", "remount,size=256M", str(disk)], check=True)
        second = launch(args, cache_env, ranks=2, port=port, launcher="deepspeed", timeout=300)
        check(second)
        assert "resuming from step 8 " in second.stdout and "warning: the file system" not in second.stdout
        got, uninterrupted = losses(out), losses(two_rank_reference)
        assert sorted(got) == sorted(uninterrupted) == list(range(1, 17))
        for step, loss in uninterrupted.items():
            assert got[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), f"step {step}"
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
