"""A run that lives in an object store (`--out s3://...`) on two "hosts" whose local disks are
separate: two network namespaces (two_hosts.py), one rank in each, each rank's command in a mount
namespace of its own with a private folder bind-mounted over one and the same directory (its
staging folder, its dataset cache and its TMPDIR all lie on it). The store is a real S3-API
server (moto's) inside the first host's namespace, reached by both across the link, as
test_node_share.py starts it.

The run stops at step STOP; every checkpoint file reaches the store from the one host that
holds it (the other host's disk never sees it) and the manifest lists both hosts' files. Then
the run resumes from the URL alone on fresh disks, on the same two hosts (the losses of an
uninterrupted 2-rank run on one host, step for step) and on one host with one rank (another
world size: equal up to the stop, within a few percent after, as test_elastic.py's resume).
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from launching import LAUNCHER, REFERENCE_DIALS, ROOT, TORCHRUN, losses, rank_environment, samples_by_step
from loud_skip import skip_loudly
from s3_server import BUCKET, CREDENTIALS, moto_server_command

PORT = 9010                                # moto's, inside the first host's namespace
MASTER_PORTS = {"stopped": 29760, "two": 29761, "one": 29762}
GLOBAL_BATCH, STOP, STEPS = 32, 8, 16
STEP = "step{:08d}".format
TIMEOUT_S = 300

# Inside the first host (nothing else reaches the server): its bucket, a server-side copy of
# one run's prefix to another, a whole prefix downloaded to a folder.
STORE_TOOL = textwrap.dedent("""
    import sys
    from pathlib import Path
    import boto3
    endpoint, bucket, action, *args = sys.argv[1:]
    client = boto3.client("s3", endpoint_url=endpoint)
    def keys(prefix):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
            for item in page.get("Contents", []):
                yield item["Key"]
    if action == "bucket":
        client.create_bucket(Bucket=bucket)
    elif action == "copy":
        source, target = args
        for key in keys(source):
            client.copy_object(Bucket=bucket, Key=target + key[len(source):],
                               CopySource={"Bucket": bucket, "Key": key})
    elif action == "get":
        prefix, folder = args
        for key in keys(prefix):
            path = Path(folder) / key[len(prefix) + 1:]
            path.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, key, str(path))
""")


class Store:
    """The S3-API server in host 0's namespace and the tool that reads it from there."""

    def __init__(self, hosts, tool: Path):
        self.hosts, self.tool = hosts, tool
        self.endpoint = f"http://{hosts.addresses[0]}:{PORT}"

    def url(self, prefix: str) -> str:
        return f"s3://{BUCKET}/{prefix}"

    def call(self, *args) -> subprocess.CompletedProcess:
        return self.hosts.run(0, [sys.executable, self.tool, self.endpoint, BUCKET, *map(str, args)],
                              env={**CREDENTIALS, "PATH": "/usr/bin:/bin"})

    def do(self, *args) -> None:
        result = self.call(*args)
        assert result.returncode == 0, result.stderr[-3000:]

    def download(self, prefix: str, folder: Path) -> Path:
        """The run at `prefix` as the store holds it, in `folder`."""
        self.do("get", prefix, folder)
        return folder


@pytest.fixture(scope="module")
def store(two_hosts, tmp_path_factory):
    command = moto_server_command()
    if command is None:
        skip_loudly("moto_server not found: install the test extra (pip install -e '.[test]')")
    tmp = tmp_path_factory.mktemp("store_server")
    (tmp / "tool.py").write_text(STORE_TOOL)
    log = tmp / "moto.log"
    server = two_hosts.popen(0, [command, "-H", two_hosts.addresses[0], "-p", str(PORT)], env=None,
                             stdout=log.open("w"), stderr=subprocess.STDOUT)
    served = Store(two_hosts, tmp / "tool.py")
    deadline = time.monotonic() + 60
    try:
        while (made := served.call("bucket")).returncode != 0:
            assert server.poll() is None and time.monotonic() < deadline, made.stderr[-2000:] + log.read_text()[-2000:]
            time.sleep(0.5)
        yield served
    finally:
        server.terminate()
        server.wait(timeout=10)


def _host_env(hosts, host: int, disk: Path, store: Store, master_port: int) -> dict:
    """A rank's environment on `host`: the store's endpoint, and the dataset cache and TMPDIR on
    the host's own disk (`disk`, the directory its private folder is mounted over)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "MASTER_", "RANK", "WORLD_SIZE", "LOCAL_", "AWS_", "CLIPZERO_"))}
    env.update(CREDENTIALS, **hosts.env(host, master_port), S3_ENDPOINT_URL=store.endpoint,
               CLIPZERO_CACHE=str(disk / "cache"), TMPDIR=str(disk / "tmp"))
    return rank_environment(env, "torchrun")


def run_on_hosts(hosts, store: Store, prefix: str, phase: str, base: Path, host_count: int,
                 extra: list[str]) -> dict[int, tuple[Path, str]]:
    """REFERENCE_DIALS with --out the store's `prefix` on `host_count` hosts, one rank each
    (torchrun, one node per host), every host on a fresh disk of its own (base/host<N>) mounted
    over one directory; each rank's samples logged to base/samples (the test's own record,
    beside the disks). Returns host -> (its disk's folder, its output), once every host has ended."""
    # A short path: TMPDIR lies on the disk, and a data worker's socket there must fit AF_UNIX's 108 bytes.
    target = Path(tempfile.mkdtemp(prefix="czdisk", dir="/tmp"))
    started = {}
    try:
        for host in range(host_count):
            own = base / f"host{host}"
            for sub in ("cache", "tmp", "staging"):
                (own / sub).mkdir(parents=True)
            env = {**_host_env(hosts, host, target, store, MASTER_PORTS[phase]),
                   "CLIPZERO_SAMPLE_LOG": str(base / "samples")}
            cmd = [TORCHRUN, "--nnodes", str(host_count), "--node-rank", str(host), "--nproc-per-node", "1",
                   "--master-addr", hosts.addresses[0], "--master-port", str(MASTER_PORTS[phase]),
                   LAUNCHER, *REFERENCE_DIALS, *extra, "--out", store.url(prefix), "--staging", target / "staging"]
            log = base / f"host{host}.log"
            started[host] = (own, log, hosts.popen(host, cmd, env=env, disks={target: own}, cwd=ROOT,
                                                   stdout=log.open("w"), stderr=subprocess.STDOUT))
        for host, (_, log, process) in started.items():
            try:
                process.wait(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{phase}: host {host} did not end within {TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
        outputs = {host: (own, log.read_text()) for host, (own, log, _) in started.items()}
        assert [p.returncode for _, _, p in started.values()] == [0] * host_count, \
            "".join(f"\n--- host {h}:\n{out[-3000:]}" for h, (_, out) in outputs.items())
        # The hosts' disks were theirs alone: nothing landed in the machine's own directory.
        assert list(target.iterdir()) == []
        return outputs
    finally:
        for _, _, process in started.values():  # torchrun and its rank, if a host did not end
            if process.poll() is None:
                for child in psutil.Process(process.pid).children(recursive=True):
                    child.kill()
                process.kill()
                process.wait(timeout=10)
        shutil.rmtree(target)  # empty, unless a host's files escaped its disk (then a failure above)


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def stopped(two_hosts, store, tmp_path_factory):
    """The run on two hosts, stopped at step STOP: its prefix in the store, and what each host's
    disk held at the end."""
    base = tmp_path_factory.mktemp("stopped")
    outputs = run_on_hosts(two_hosts, store, "stopped", "stopped", base, 2, ["--stop-at-step", str(STOP)])
    return base, {host: own for host, (own, _) in outputs.items()}


def _samples(*folders: Path) -> dict[tuple[int, int], list[int]]:
    steps: dict[tuple[int, int], list[int]] = {}
    for folder in folders:
        for step, ids in samples_by_step(folder, GLOBAL_BATCH).items():
            steps.setdefault(step, []).extend(ids)
    return steps


def _check_run(got: Path, samples: dict, reference: Path, after_stop: float) -> None:
    """The whole run's samples are the reference's, step for step; its losses equal them up
    to the stop and within `after_stop` (relative) after it."""
    want = samples_by_step(reference / "samples", GLOBAL_BATCH)
    assert sorted(samples) == sorted(want)
    for step in want:
        assert sorted(samples[step]) == sorted(want[step]), f"step {step} took other samples"
    got_losses, want_losses = losses(got), losses(reference)
    assert sorted(got_losses) == sorted(want_losses) == list(range(1, STEPS + 1))
    for step, loss in want_losses.items():
        if step <= STOP or after_stop <= 1e-5:
            assert got_losses[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), f"step {step}"
        else:
            assert got_losses[step] == pytest.approx(loss, rel=after_stop), f"step {step}"


def test_each_host_copies_its_own_checkpoint_files_and_fresh_disks_resume_from_the_url(
        two_hosts, store, stopped, tmp_path, two_rank_reference):
    base, disks = stopped
    run = store.download("stopped", tmp_path / "stopped")
    assert json.loads((run / "plan.json").read_text())["nodes"] == 2
    assert max(losses(run)) == STOP
    # Each host's disk holds the checkpoint files of its own rank only; the store holds both
    # hosts' files, and the manifest (rank 0's, written on host 0) lists them all.
    tag = STEP(STOP)
    own = [_files(disks[host] / "staging" / "checkpoints" / tag) for host in (0, 1)]
    in_store = _files(run / "checkpoints" / tag)
    manifest = set(json.loads((run / "checkpoints" / tag / "manifest.json").read_text())["files"])
    assert "rank0.pt" in own[0] and "rank1.pt" in own[1], own
    assert "rank0.pt" not in own[1] and "rank1.pt" not in own[0], own
    assert "manifest.json" in own[0] and "manifest.json" not in own[1], own
    assert not (disks[1] / "staging" / "metrics.jsonl").exists()  # rank 0's run files: host 0 only
    assert manifest == (own[0] | own[1]) - {"manifest.json"}
    assert in_store == manifest | {"manifest.json"}

    # The stopped run, copied to another prefix in the store (the stopped one stays for the
    # other test), resumed on both hosts with fresh disks: they hold nothing of it but the URL.
    store.do("copy", "stopped", "two")
    outputs = run_on_hosts(two_hosts, store, "two", "two", tmp_path / "resumed", 2, [])
    assert f"resuming from step {STOP} " in outputs[0][1] and store.url("two") in outputs[0][1], outputs[0][1][-3000:]
    resumed = store.download("two", tmp_path / "two")
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir())[-1] == STEP(STEPS)
    _check_run(resumed, _samples(base / "samples", tmp_path / "resumed" / "samples"), two_rank_reference, 1e-5)


def test_one_host_with_one_rank_resumes_the_two_hosts_run_from_the_url(
        two_hosts, store, stopped, tmp_path, two_rank_reference):
    base, _ = stopped
    store.do("copy", "stopped", "one")
    outputs = run_on_hosts(two_hosts, store, "one", "one", tmp_path / "resumed", 1, [])
    out = outputs[0][1]
    assert f"resuming from step {STOP} " in out and "resharding" in out, out[-3000:]
    resumed = store.download("one", tmp_path / "one")
    assert json.loads((resumed / "plan.json").read_text())["world_size"] == 1
    assert json.loads((resumed / "plan.json").read_text())["micro_batch"] == GLOBAL_BATCH
    # BatchNorm over the whole batch instead of each rank's half: within a few percent after the stop.
    _check_run(resumed, _samples(base / "samples", tmp_path / "resumed" / "samples"), two_rank_reference, 0.03)
