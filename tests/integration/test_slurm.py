"""`sbatch launchers/slurm/pretrain.sbatch` on a real SLURM cluster (tests/integration/
slurm_cluster.py): two srun ranks train and finish; a job told to stop by SLURM's time-limit
warning (SIGUSR1), mid-run or during evaluation, checkpoints, requeues itself, resumes and ends
at the planned step with the same losses as a job that was never signalled."""
import json
import re
import sys
import time
from pathlib import Path

import pytest

from launching import REFERENCE_DIALS, ROOT, losses, read_metrics

SBATCH = ROOT / "launchers" / "slurm" / "pretrain.sbatch"
DIALS = [*REFERENCE_DIALS, "--collective-timeout", "60"]


def submit(cluster, workdir: Path, cache_env: dict, drill: str = "") -> tuple[str, Path]:
    """Submit from `workdir` as a user would from the repository root; returns (job id, log)."""
    workdir.mkdir(parents=True, exist_ok=True)
    env = {"CLIPZERO_CACHE": cache_env["CLIPZERO_CACHE"], "CLIPZERO_ROOT": str(ROOT),
           "CLIPZERO_PYTHON": sys.executable, "CLIPZERO_DRILL": drill}
    job_id = cluster.submit(SBATCH, DIALS, ["--nodes=1", "--ntasks-per-node=2", f"--chdir={workdir}",
                                            f"--output={workdir}/slurm-%j.out"], env=env)
    return job_id, workdir / f"slurm-{job_id}.out"


def run_dir(workdir: Path, job_id: str) -> Path:
    return workdir / "runs" / f"clip-debug-job{job_id}"


def wait_for(check, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            tail = log.read_text()[-3000:] if log.exists() else "(no job output yet)"
            pytest.fail(f"{what} did not happen within {timeout} s; job output:\n{tail}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster, tmp_path_factory, cache_env):
    workdir = tmp_path_factory.mktemp("slurm-plain")
    job_id, log = submit(slurm_cluster, workdir, cache_env)
    slurm_cluster.wait_until(job_id, "COMPLETED", timeout=240)
    return job_id, run_dir(workdir, job_id), log


def test_two_srun_ranks_train_and_finish_in_a_run_dir_keyed_by_the_job(slurm_cluster, uninterrupted):
    job_id, run, log = uninterrupted
    assert slurm_cluster.restarts(job_id) == 0
    plan = json.loads((run / "plan.json").read_text())
    reasons = {d["name"]: d["reason"] for d in plan["decisions"]}
    assert plan["world_size"] == 2 and plan["nodes"] == 1
    assert reasons["world_size"].startswith("1 node(s) x 2 rank(s) per node, from srun (SLURM_STEP_NUM_TASKS")
    assert plan["rendezvous"] == f"{slurm_cluster.host}:{15000 + int(job_id) % 10000}"
    assert "first host of SLURM_STEP_NODELIST" in reasons["rendezvous"]
    assert plan["collective_timeout_s"] == 60
    assert sorted(losses(run)) == list(range(1, 17))
    assert (run / "checkpoints" / "latest").read_text() == "step00000016"
    assert "trained steps 0..16" in log.read_text()


def _signal_when(slurm_cluster, job_id, log: Path, ready, what: str) -> None:
    slurm_cluster.wait_until(job_id, "RUNNING", timeout=120)
    wait_for(ready, 180, what, log)
    slurm_cluster.signal(job_id, "USR1")


def _check_requeued_and_resumed(slurm_cluster, job_id, log: Path, run: Path, reference: Path) -> int:
    slurm_cluster.wait_until(job_id, lambda job: job.get("JobState") == "COMPLETED"
                             and job.get("Restarts") == "1", timeout=300)
    text = log.read_text()
    stopped = re.search(r"stopped at step (\d+) of 16 with a checkpoint: requeued SLURM job", text)
    assert stopped, text[-3000:]
    step = int(stopped.group(1))
    assert 1 <= step < 16
    assert f"resuming from step {step} " in text and "requeued 1 times" in text
    got, want = losses(run), losses(reference)
    assert sorted(got) == list(range(1, 17))  # every step once: the count went on from the stop
    for s in range(1, 17):
        assert got[s] == pytest.approx(want[s], rel=1e-5, abs=1e-6), f"step {s}"
    return step


def test_usr1_mid_run_checkpoints_requeues_and_resumes_to_the_same_losses(
        slurm_cluster, tmp_path, cache_env, uninterrupted):
    job_id, log = submit(slurm_cluster, tmp_path, cache_env)
    run = run_dir(tmp_path, job_id)
    _signal_when(slurm_cluster, job_id, log,
                 lambda: (run / "metrics.jsonl").exists() and len(losses(run)) >= 3,
                 "three logged steps")
    step = _check_requeued_and_resumed(slurm_cluster, job_id, log, run, uninterrupted[1])
    assert step < 16


def test_usr1_during_evaluation_leaves_it_for_the_resumed_run(
        slurm_cluster, tmp_path, cache_env, uninterrupted):
    job_id, log = submit(slurm_cluster, tmp_path, cache_env, drill="pause_eval:8")
    run = run_dir(tmp_path, job_id)
    _signal_when(slurm_cluster, job_id, log,
                 lambda: log.exists() and "evaluation after step 8 waits" in log.read_text(),
                 "the evaluation of step 8")
    step = _check_requeued_and_resumed(slurm_cluster, job_id, log, run, uninterrupted[1])
    text = log.read_text()
    assert step == 8 and "evaluation left for the resumed run" in text
    assert "resuming from step 8 " in text and "its evaluation first" in text
    evals = [r["step"] for r in read_metrics(run) if "zeroshot_top1" in r]
    assert evals == [8, 16]  # the cut evaluation ran once, in the resumed job
