"""The SLURM cluster and two-host fixtures are real: jobs run, signals and requeues arrive, two
namespaces rendezvous over their veth link. Fast (seconds each); skipped without root."""
import subprocess
import sys
import textwrap
import time
from pathlib import Path



def script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return path


def wait_for(check, timeout: float, what: str, details=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s\n{details()}"
        time.sleep(0.1)


def test_two_tasks_run_with_their_ranks(slurm_cluster, tmp_path):
    job = script(tmp_path / "ranks.sh", """\
        srun bash -c 'echo "$SLURM_PROCID $SLURM_LOCALID $SLURM_NTASKS $SLURM_JOB_NODELIST \\
          $SLURM_TASKS_PER_NODE" > "$1/rank-$SLURM_PROCID"' _ "$1"
        """)
    job_id = slurm_cluster.submit(job, [tmp_path], ["--ntasks=2", f"--output={tmp_path}/out.txt"])
    slurm_cluster.wait_until(job_id, "COMPLETED", timeout=30)
    ranks = {}
    for rank in (0, 1):
        procid, localid, ntasks, nodelist, per_node = (tmp_path / f"rank-{rank}").read_text().split()
        ranks[rank] = procid, localid, ntasks, nodelist, per_node
    host = slurm_cluster.host
    assert ranks == {0: ("0", "0", "2", host, "2"), 1: ("1", "1", "2", host, "2")}
    assert slurm_cluster.restarts(job_id) == 0


def test_usr1_reaches_tasks_and_their_children_not_the_batch_shell(slurm_cluster, tmp_path):
    # The task forks two children that trap USR1: one in the task's process group, one in a
    # session of its own (setsid; still the task's child). proctrack/linuxproc signals the
    # step's whole process tree, so both get it; a double-forked orphan (reparented to init)
    # would not. The batch shell traps USR1 too.
    loop = 'while [ ! -e "$d/stop" ]; do sleep 0.1; done'
    task = script(tmp_path / "task.sh", f"""\
        d=$1
        trap 'echo task >> "$d/usr1"' USR1
        bash -c 'd=$0; trap "echo child >> $d/usr1" USR1; touch $d/child-ready; {loop}' "$d" &
        setsid bash -c 'd=$0; trap "echo setsid >> $d/usr1" USR1; touch $d/setsid-ready; {loop}' "$d" &
        touch "$d/task-ready"
        {loop}
        wait
        """)
    job = script(tmp_path / "batch.sh", """\
        trap 'echo batch >> "$1/usr1"' USR1
        srun --ntasks=1 "$2" "$1"
        """)
    job_id = slurm_cluster.submit(job, [tmp_path, task], [f"--output={tmp_path}/out.txt"])
    ready = [tmp_path / f"{who}-ready" for who in ("task", "child", "setsid")]
    wait_for(lambda: all(p.exists() for p in ready), 30, "task and children ready",
             lambda: slurm_cluster.diagnostics(job_id))
    slurm_cluster.signal(job_id, "USR1")
    got = tmp_path / "usr1"
    expected = {"task", "child", "setsid"}
    wait_for(lambda: got.exists() and set(got.read_text().split()) >= expected, 10,
             f"USR1 reaching {expected}", lambda: got.exists() and got.read_text())
    (tmp_path / "stop").touch()
    slurm_cluster.wait_until(job_id, "COMPLETED", timeout=30)
    # Without --full, scancel --signal leaves the batch shell alone (it would have run its
    # trap once srun returned).
    assert sorted(got.read_text().split()) == sorted(expected)


def test_requeue_from_inside_runs_again_soon(slurm_cluster, tmp_path):
    job = script(tmp_path / "requeue.sh", """\
        echo "restart=${SLURM_RESTART_COUNT:-0}" >> "$1/runs"
        if [ "${SLURM_RESTART_COUNT:-0}" -eq 0 ]; then
            scontrol requeue "$SLURM_JOB_ID"
            sleep 120  # the requeue kills this run
            exit 1
        fi
        """)
    start = time.monotonic()
    job_id = slurm_cluster.submit(job, [tmp_path], [f"--output={tmp_path}/out.txt",
                                                     "--open-mode=append"])
    slurm_cluster.wait_until(job_id, "COMPLETED", timeout=90)
    took = time.monotonic() - start
    assert (tmp_path / "runs").read_text().split() == ["restart=0", "restart=1"]
    assert slurm_cluster.restarts(job_id) == 1
    assert took < 60, f"a requeue round trip took {took:.0f} s (AuthInfo=cred_expire not applied?)"


GLOO_RANK = """\
import subprocess
import sys
from datetime import timedelta
import torch
import torch.distributed as dist
rank = int(sys.argv[1])
dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
t = torch.tensor([10.0 ** rank])
dist.all_reduce(t)
print(f"rank {rank} sum {t.item():g}", flush=True)
dist.destroy_process_group()
"""


def test_two_namespaces_all_reduce_over_veth(two_hosts, tmp_path):
    for host in (0, 1):  # each sees its own address only
        addrs = two_hosts.run(host, ["ip", "-o", "-4", "addr", "show"]).stdout
        assert two_hosts.addresses[host] in addrs and two_hosts.addresses[1 - host] not in addrs
    rank_py = tmp_path / "rank.py"
    rank_py.write_text(GLOO_RANK)
    env = {"PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1"}
    procs = [two_hosts.popen(host, [sys.executable, rank_py, host], env={**env, **two_hosts.env(host)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for host in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    for host, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {host} exited {p.returncode}\n{out}\n{err[-3000:]}"
        assert out.strip() == f"rank {host} sum 11", out
