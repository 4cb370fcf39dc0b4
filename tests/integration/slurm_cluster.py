"""A real single-node SLURM cluster (munged + slurmctld + slurmd) for one pytest session.

Import the fixture into a conftest (`from slurm_cluster import slurm_cluster`) and request
`slurm_cluster` in a test. Needs root and Debian's `slurm-wlm` and `munge` (`.ci/system-packages`
installs them); without them the tests that use it are skipped, saying what is missing.

Choices, and why:
- Everything lives in a fresh `/tmp/clipzero-slurm-XXXX` directory, not pytest's tmp_path:
  pytest's directories are mode 0700 (the munge user could not reach its socket there) and
  their paths can exceed the 108-byte limit of a unix socket path.
- We run our own munged on our own socket (`AuthInfo=socket=...`) instead of reusing or
  replacing the one on /run/munge/munge.socket.2: we then never depend on, stop or confuse a
  munged somebody else started (any munged encodes and decodes with its own key, so a foreign
  one "works" only until its owner stops it mid-session), and two sessions can run side by side.
- Daemons run in the foreground (-F/-D) as our children, so we hold their exact pids. Every
  process we start, and every job submitted through `env`, carries CLIPZERO_SLURM_DIR=<dir> in
  its environment; teardown, and the sweep of a crashed earlier run, kill by that marker,
  never by a name or a possibly stale pid file (pids get reused). munged gets the munge user
  from Popen(user=...) rather than `runuser -u munge`, which would stay on as its parent and
  leave us holding runuser's pid instead of munged's.
- `AuthInfo=cred_expire=5`: a requeued job may not start before the credentials of its last
  run expire (default 120 s, then Reason=BeginTime); 5 s makes it eligible again after ~6 s.
  It then still waits for a scheduler pass: the main loop runs every 60 s and backfill every
  30 s by default (seen: eligible at +6 s, started at +27 s), hence sched_interval=1 and
  bf_interval=1 (cheap with a handful of jobs).
- MinJobAge=600: no accounting storage is configured, so `scontrol show job` is the only
  record of a finished job; it keeps it for MinJobAge seconds.
"""
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from loud_skip import skip_loudly

PREFIX = "clipzero-slurm-"
MARK = "CLIPZERO_SLURM_DIR"
MUNGE_KEY = Path("/etc/munge/munge.key")
COMMANDS = ["munged", "munge", "unmunge", "slurmctld", "slurmd", "sbatch", "srun", "squeue",
            "scontrol", "scancel", "sinfo"]
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
INSTALL_HINT = "run .ci/system-packages as root (apt-get install slurm-wlm munge)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"({e})"


def _stat(pid: int, field: int) -> str:
    """Field `field` (1-based, as in proc(5)) of /proc/pid/stat; "" when the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[field - 3]
    except (OSError, IndexError):
        return ""


def kill_marked(root: Path, sig: int = signal.SIGKILL, spare=frozenset()) -> list[int]:
    """Signal every process whose environment carries MARK=root, except the pids in `spare`
    and their children; returns the pids signalled."""
    needle = f"{MARK}={root}\0".encode()
    hit = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        pid = int(entry.name)
        if pid in spare or _stat(pid, 4) in {str(p) for p in spare}:  # 4: the parent's pid
            continue
        try:
            if needle in (entry / "environ").read_bytes() + b"\0":
                os.kill(pid, sig)
                hit.append(pid)
        except (OSError, ProcessLookupError):
            pass
    return hit


def sweep_stale() -> None:
    """Remove what a crashed earlier session left (daemons, jobs, directories); spare live ones."""
    for root in Path(tempfile.gettempdir()).glob(PREFIX + "*"):
        try:
            pid, start = (root / "owner").read_text().split()
            if _stat(int(pid), 22) == start:  # 22: start time; tells the owner from a reused pid
                continue  # its pytest is still running: a concurrent session, not a leftover
        except (OSError, ValueError):
            pass
        kill_marked(root)
        shutil.rmtree(root, ignore_errors=True)


def missing_prerequisites() -> list[str]:
    missing = [] if os.geteuid() == 0 else ["root (not running as root)"]
    missing += [f"`{c}`" for c in COMMANDS if shutil.which(c) is None]
    try:
        pwd.getpwnam("munge")
    except KeyError:
        missing.append("the `munge` user")
    return missing


@dataclass
class SlurmCluster:
    root: Path                  # /tmp/clipzero-slurm-XXXX: conf, state, spool, logs, munge socket
    conf: Path
    host: str                   # the node's (and controller's) name
    env: dict                   # merge into a subprocess's environment to reach this cluster
    daemons: dict = field(default_factory=dict)  # name -> Popen

    def clean_env(self, extra: dict | None = None) -> dict:
        """os.environ without SLURM_*/SBATCH_*/SRUN_* input variables (a CI job running inside
        SLURM would pass its own job's), plus `env` and `extra`."""
        base = {k: v for k, v in os.environ.items()
                if not re.match(r"(SLURM|SBATCH|SRUN|SALLOC|SQUEUE)_", k)}
        return {**base, **self.env, **(extra or {})}

    def run(self, *cmd: str, check: bool = True, env: dict | None = None,
            timeout: float = 30) -> subprocess.CompletedProcess:
        """A client command against this cluster; with check, a failure fails the test with
        the daemons' logs."""
        result = subprocess.run(cmd, env=self.clean_env(env), capture_output=True, text=True,
                                timeout=timeout)
        if check and result.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} exited {result.returncode}: {result.stderr.strip()}\n"
                        + self.diagnostics(), pytrace=False)
        return result

    def submit(self, script_path, args=(), sbatch_options=(), env=None) -> str:
        """sbatch --parsable; the job id. The job inherits clean_env(env): sbatch exports it all."""
        return self.run("sbatch", "--parsable", *sbatch_options, str(script_path),
                        *map(str, args), env=env).stdout.strip().split(";")[0]

    def job(self, job_id) -> dict:
        """`scontrol show job -o` as a dict ({} once the job is forgotten); values are the raw
        strings up to the next space (enough for JobState, Restarts, Reason, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id), check=False).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out.splitlines()[0])) if out.strip() else {}

    def state(self, job_id) -> str:
        """PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, ...; sacct once scontrol forgot it."""
        info = self.job(job_id)
        if info:
            return info.get("JobState", "UNKNOWN")
        if shutil.which("sacct"):  # only answers with accounting storage, which we do not configure
            out = self.run("sacct", "-n", "-X", "-P", "-o", "State", "-j", str(job_id), check=False)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.split()[0]
        return "UNKNOWN"

    def restarts(self, job_id) -> int:
        return int(self.job(job_id).get("Restarts", 0))

    def wait_until(self, job_id, until, timeout: float = 60, poll: float = 0.2) -> dict:
        """Poll until `until` holds: a state name, a set of them, or a predicate on job(job_id).
        Fails at once when the job ends in a state that cannot satisfy a wanted state set,
        and on timeout; either way with the job's record and the daemons' logs."""
        wanted = {until} if isinstance(until, str) else until
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            state = info.get("JobState", "UNKNOWN")
            if callable(wanted) and wanted(info) or not callable(wanted) and state in wanted:
                return info
            if not callable(wanted) and state in FINAL:
                pytest.fail(f"job {job_id} ended {state}, waited for {sorted(wanted)}\n"
                            + self.diagnostics(job_id), pytrace=False)
            if time.monotonic() > deadline:
                pytest.fail(f"job {job_id} still {state} after {timeout} s, waited for "
                            f"{wanted if callable(wanted) else sorted(wanted)}\n"
                            + self.diagnostics(job_id), pytrace=False)
            time.sleep(poll)

    def signal(self, job_id, sig: str = "USR1", full: bool = False) -> None:
        """scancel --signal: reaches the tasks of the job's steps (and, with full, the batch
        shell too; without it the batch script is not signalled)."""
        self.run("scancel", f"--signal={sig}", *(["--full"] if full else []), str(job_id))

    def cancel(self, job_id) -> None:
        """scancel; no error for a job that has already ended."""
        self.run("scancel", str(job_id), check=False)

    def diagnostics(self, job_id=None) -> str:
        parts = []
        if job_id is not None:
            parts.append("scontrol show job: " + self.run("scontrol", "show", "job", str(job_id),
                                                           check=False).stdout.strip())
            out = self.job(job_id).get("StdOut")
            if out:
                parts.append(f"--- job output {out} (tail) ---\n" + _tail(Path(out)))
        for name in ("slurmctld", "slurmd", "munged"):
            parts.append(f"--- {name} log (tail) ---\n" + _tail(self.root / "log" / f"{name}.log"))
        return "\n".join(parts)


def _wait(what: str, ok, cluster: SlurmCluster, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        dead = [f"{n} exited {p.returncode}" for n, p in cluster.daemons.items() if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            pytest.fail(f"SLURM test cluster: {what} did not happen within {timeout} s "
                        f"({', '.join(dead) or 'daemons alive'})\n" + cluster.diagnostics()
                        + "\n--- daemon stdout/stderr ---\n" + _tail(cluster.root / "log" / "daemons.out"),
                        pytrace=False)
        time.sleep(0.2)


def _ensure_munge_key() -> None:
    """Debian's munge package creates the key; create one only if it is missing."""
    if MUNGE_KEY.exists():
        return
    munge = pwd.getpwnam("munge")
    MUNGE_KEY.parent.mkdir(mode=0o700, exist_ok=True)
    os.chown(MUNGE_KEY.parent, munge.pw_uid, munge.pw_gid)
    fd = os.open(MUNGE_KEY, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
    with os.fdopen(fd, "wb") as f:
        f.write(os.urandom(1024))
    os.chown(MUNGE_KEY, munge.pw_uid, munge.pw_gid)


def _slurm_conf(root: Path, host: str, sock: Path) -> str:
    return f"""\
ClusterName=clipzerotest
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=5,socket={sock}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
JobRequeue=1
ReturnToService=2
KillWait=10
MinJobAge=600
MailProg=/bin/true
SchedulerParameters=sched_interval=1,bf_interval=1
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


def start_cluster() -> SlurmCluster:
    """Start munged, slurmctld and slurmd; return once the node is idle. Call stop_cluster() after."""
    missing = missing_prerequisites()
    if missing:
        skip_loudly(f"no SLURM test cluster: needs {', '.join(missing)}; {INSTALL_HINT}")
    sweep_stale()
    _ensure_munge_key()
    root = Path(tempfile.mkdtemp(prefix=PREFIX))
    root.chmod(0o755)
    (root / "owner").write_text(f"{os.getpid()} {_stat(os.getpid(), 22)}")  # see sweep_stale
    for sub in ("state", "spool", "log", "munge"):
        (root / sub).mkdir()
    munge = pwd.getpwnam("munge")
    os.chown(root / "munge", munge.pw_uid, munge.pw_gid)  # munged insists on owning its dirs
    sock = root / "munge" / "munge.socket"
    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, host, sock))
    cluster = SlurmCluster(root, conf, host, {"SLURM_CONF": str(conf), MARK: str(root)})
    log = open(root / "log" / "daemons.out", "ab")
    common = dict(env=cluster.clean_env(), stdout=log, stderr=subprocess.STDOUT,
                  stdin=subprocess.DEVNULL, start_new_session=True, cwd="/")
    try:
        m = root / "munge"
        cluster.daemons["munged"] = subprocess.Popen(
            ["munged", "-F", f"--socket={sock}", f"--pid-file={m}/munged.pid",
             f"--log-file={root}/log/munged.log", f"--seed-file={m}/munged.seed",
             f"--key-file={MUNGE_KEY}"],
            user=munge.pw_uid, group=munge.pw_gid, extra_groups=[], **common)
        _wait("munged answering `munge -n | unmunge`", lambda: subprocess.run(
            f"munge -n -S {sock} | unmunge -S {sock}", shell=True, capture_output=True).returncode == 0,
            cluster)
        cluster.daemons["slurmctld"] = subprocess.Popen(["slurmctld", "-D", "-f", str(conf)], **common)
        cluster.daemons["slurmd"] = subprocess.Popen(["slurmd", "-D", "-N", host, "-f", str(conf)],
                                                     **common)
        _wait(f"node {host} idle in sinfo", lambda: cluster.run(
            "sinfo", "-h", "-n", host, "-o", "%T", check=False).stdout.strip() == "idle", cluster)
    except BaseException:
        stop_cluster(cluster)
        raise
    finally:
        log.close()
    return cluster


def stop_cluster(cluster: SlurmCluster) -> None:
    """Cancel the jobs (5 s grace), kill what is left of them, stop slurmd, slurmctld and munged
    (that order), kill whatever still carries our marker, remove the directory."""
    if "slurmctld" in cluster.daemons and cluster.daemons["slurmctld"].poll() is None:
        jobs = cluster.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
        if jobs:
            cluster.run("scancel", *jobs, check=False)
            deadline = time.monotonic() + 5  # then kill_marked below ends what ignored SIGTERM
            while time.monotonic() < deadline and cluster.run(
                    "squeue", "-h", "-o", "%i", check=False).stdout.strip():  # live jobs only
                time.sleep(0.2)
    # Jobs that ignored SIGTERM would hold slurmd's shutdown for KillWait: end them first
    # (their slurmstepds and tasks; the daemons and slurmctld's slurmscriptd child are spared).
    kill_marked(cluster.root, spare={p.pid for p in cluster.daemons.values()})
    for name in ("slurmd", "slurmctld", "munged"):
        proc = cluster.daemons.get(name)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()  # and kill_marked below
    kill_marked(cluster.root)
    shutil.rmtree(cluster.root, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running single-node SLURM cluster for the whole session (see the module docstring)."""
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        stop_cluster(cluster)
