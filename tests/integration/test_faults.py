"""Faults on a 2-rank CPU run (deepspeed launcher, gloo): a rank killed with SIGKILL at
several points ends the job within the stated collective timeout and leaves no process behind;
the same command then resumes on the same port and ends at the same step with the same losses
as a run that was never killed. Non-finite steps are skipped and counted; too many in a row stop
the run with its last good checkpoint."""
import json
import subprocess
import time
from pathlib import Path

import pytest

from engine.dist import free_port
from launching import (REFERENCE_DIALS, ROOT, check, check_shared_memory_given_back, command, launch,
                       losses, processes_of, rank_process, read_metrics, wait_for)

TIMEOUT_S = 30
DIALS = [*REFERENCE_DIALS, "--collective-timeout", str(TIMEOUT_S)]


@pytest.fixture(scope="module")
def uninterrupted(two_rank_reference):
    return losses(two_rank_reference)


def start(out: Path, env: dict, port: int, log: Path, drill: str = "") -> subprocess.Popen:
    env = {**env, "CLIPZERO_DRILL": drill}
    return subprocess.Popen(command([*DIALS, "--out", str(out)], ranks=2, port=port, launcher="deepspeed"), cwd=ROOT,
                            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def ended_cleanly_after_kill(job: subprocess.Popen, killed_at: float, out: Path, port: int, log: Path) -> None:
    """The job ends within the collective timeout, non-zero, and nothing of it survives."""
    try:
        code = job.wait(timeout=TIMEOUT_S + 15)
    except subprocess.TimeoutExpired:
        job.kill()
        pytest.fail(f"the job still ran {TIMEOUT_S + 15} s after a rank was killed:\n{log.read_text()[-3000:]}")
    elapsed = time.monotonic() - killed_at
    assert code != 0 and elapsed < TIMEOUT_S + 5, (code, elapsed)
    deadline = time.monotonic() + 10  # the kernel needs a moment to deliver PDEATHSIG
    while processes_of(out) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not processes_of(out), f"processes of the killed run outlived it: {processes_of(out)}"
    check_shared_memory_given_back(port)


def rerun_matches(out: Path, env: dict, port: int, uninterrupted: dict[int, float], resumed_from: int) -> None:
    """The same command, on the same port, resumes and ends like the uninterrupted run."""
    result = launch([*DIALS, "--out", str(out)], env, ranks=2, port=port, launcher="deepspeed")
    check(result)
    if resumed_from:
        assert f"resuming from step {resumed_from} " in result.stdout, result.stdout[-3000:]
    else:
        assert "resuming from" not in result.stdout
    got = losses(out)
    assert sorted(got) == sorted(uninterrupted) == list(range(1, 17))
    for step, loss in uninterrupted.items():
        assert got[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), f"step {step}"


def test_rank_killed_mid_training(tmp_path, cache_env, uninterrupted):
    out, port, log = tmp_path / "run", free_port(), tmp_path / "first.log"
    job = start(out, cache_env, port, log)
    wait_for(lambda: (out / "metrics.jsonl").exists() and len(losses(out)) >= 6, 180, "six steps", log)
    rank_process(out, 1).kill()
    ended_cleanly_after_kill(job, time.monotonic(), out, port, log)
    rerun_matches(out, cache_env, port, uninterrupted, resumed_from=4)


def test_rank_killed_while_writing_a_checkpoint(tmp_path, cache_env, uninterrupted):
    out, port, log = tmp_path / "run", free_port(), tmp_path / "first.log"
    job = start(out, cache_env, port, log, drill="kill_in_checkpoint:8:1")
    wait_for(lambda: job.poll() is not None or (out / "checkpoints" / "step00000008").exists(),
             180, "the checkpoint of step 8", log)
    ended_cleanly_after_kill(job, time.monotonic(), out, port, log)
    assert (out / "checkpoints" / "latest").read_text() == "step00000004"
    assert not (out / "checkpoints" / "step00000008" / "manifest.json").exists()
    rerun_matches(out, cache_env, port, uninterrupted, resumed_from=4)


def test_rank0_killed_during_evaluation(tmp_path, cache_env, uninterrupted):
    out, port, log = tmp_path / "run", free_port(), tmp_path / "first.log"
    job = start(out, cache_env, port, log, drill="pause_eval:8")
    wait_for(lambda: "evaluation after step 8 waits" in log.read_text(), 180, "the evaluation of step 8", log)
    rank_process(out, 0).kill()
    ended_cleanly_after_kill(job, time.monotonic(), out, port, log)
    rerun_matches(out, cache_env, port, uninterrupted, resumed_from=4)


def _skips_step_3(out, env, *dials) -> dict:
    check(launch(["--global-batch", "32", "--steps", "8", "--log-every", "1", "--out", str(out), *dials],
                 {**env, "CLIPZERO_DRILL": "nonfinite:3"}))
    rows = [r for r in read_metrics(out) if "skipped_steps" in r]
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1, 1, 1, 1, 1]
    assert "loss" not in rows[2] and all("loss" in r for i, r in enumerate(rows) if i != 2)
    return json.loads((out / "plan.json").read_text())


def test_non_finite_steps_are_skipped_and_counted_then_too_many_stop_the_run(tmp_path, cache_env):
    _skips_step_3(tmp_path / "one", cache_env)

    many = tmp_path / "many"
    env = {**cache_env, "CLIPZERO_DRILL": "nonfinite:5-12"}
    result = launch(["--global-batch", "32", "--steps", "16", "--checkpoint-every", "4", "--out", str(many)], env)
    assert result.returncode == 4, result.stderr[-3000:]
    assert "steps 5..9 all had a non-finite loss or gradient" in result.stderr
    assert "lower --lr" in result.stderr
    assert (many / "checkpoints" / "latest").read_text() == "step00000004"
    plan = json.loads((many / "plan.json").read_text())
    assert plan["max_skipped_in_a_row"] == 5


def test_a_non_finite_step_is_skipped_in_bf16_without_zero(tmp_path, cache_env):
    """One rank in bf16 runs fp32 weights under autocast without ZeRO, where DeepSpeed checks
    nothing: engine/train/nonfinite.py skips the step, as in fp32."""
    plan = _skips_step_3(tmp_path / "bf16", cache_env, "--precision", "bf16")
    assert (plan["precision"], plan["zero_stage"]) == ("bf16", 0)
