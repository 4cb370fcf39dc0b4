"""Where the ranks of a run come from: one process, the deepspeed launcher or torchrun, or srun.

`from_environment()` reads what the launcher set and returns a `Launch`: rank, world size,
ranks per node, nodes, the rendezvous address and port and the SLURM job, with the variable
each came from (the plan prints them). `setup()` then exports the variables that
torch.distributed, DeepSpeed and streaming read, so the rest of the engine sees one convention
whichever launcher started it.

On SLURM, `launchers/slurm/pretrain.sbatch` starts one task per GPU with srun, not the
deepspeed launcher from a generated hostfile: srun needs no ssh/pdsh between nodes (many
clusters forbid it), SLURM itself delivers the time-limit signal and a requeue to every rank,
binds GPUs and CPUs per task, and `--kill-on-bad-exit` ends every rank when one dies.
"""
import os
from dataclasses import dataclass, field

from engine.dist import free_port
from engine.errors import UserError

# The rendezvous port of a SLURM job: fixed by its id, so a requeued job (same id) meets on the
# port it used before and two jobs sharing a node almost never collide. Below Linux's
# ephemeral range (32768+), where an outgoing connection could hold the port.
JOB_PORT_BASE, JOB_PORT_SPAN = 15000, 10000


@dataclass(frozen=True)
class Launch:
    launcher: str                # "srun", "deepspeed launcher or torchrun", "one process"
    rank: int
    local_rank: int
    world_size: int
    ranks_per_node: int
    nodes: int
    master_addr: str
    master_port: int | None      # None: one process picks a free port in setup()
    job_id: str | None = None    # the SLURM job ("<array job>_<task>" for an array task)
    restarts: int = 0            # SLURM_RESTART_COUNT: how often this job was requeued
    source: dict[str, str] = field(default_factory=dict)  # value -> where it came from

    def describe_ranks(self) -> str:
        """Where the rank counts came from: 'from srun (SLURM_STEP_NUM_TASKS, ...)'."""
        names = ", ".join(dict.fromkeys(self.source[k] for k in ("world_size", "ranks_per_node", "nodes")
                                        if k in self.source))
        return f"from {self.launcher}" + (f" ({names})" if names else "")

    def describe_rendezvous(self) -> str:
        return ", ".join(f"{k} from {self.source[k]}" for k in ("master_addr", "master_port")
                         if k in self.source)


def from_environment(env) -> Launch:
    """The launch as the environment describes it. torchrun/deepspeed variables win over
    SLURM's (a launcher started inside an allocation knows its own ranks); srun is recognised
    by its step variables, which a batch script outside any `srun` does not have."""
    job_id, restarts = _job(env)
    if env.get("RANK") and env.get("WORLD_SIZE"):
        world = env_int(env, "WORLD_SIZE", minimum=1)
        local_name = "LOCAL_WORLD_SIZE" if env.get("LOCAL_WORLD_SIZE") else "LOCAL_SIZE"
        per_node = env_int(env, local_name, minimum=1) if env.get(local_name) else world
        source = {"world_size": "WORLD_SIZE", "ranks_per_node": local_name if env.get(local_name)
                  else "WORLD_SIZE: no LOCAL_WORLD_SIZE, all ranks on this node",
                  "master_addr": "MASTER_ADDR", "master_port": "MASTER_PORT"}
        return Launch("deepspeed launcher or torchrun", env_int(env, "RANK"),
                      env_int(env, "LOCAL_RANK") if env.get("LOCAL_RANK") else 0, world, per_node,
                      -(-world // per_node), env.get("MASTER_ADDR", "127.0.0.1"),
                      env_int(env, "MASTER_PORT", minimum=1) if env.get("MASTER_PORT") else None,
                      job_id, restarts, source)
    if env.get("SLURM_STEP_NUM_TASKS") and env.get("SLURM_PROCID"):
        return _from_srun(env, job_id, restarts)
    return Launch("one process", 0, 0, 1, 1, 1, "127.0.0.1", None, job_id, restarts,
                  {"world_size": "no launcher"})


def _from_srun(env, job_id: str | None, restarts: int) -> Launch:
    world = env_int(env, "SLURM_STEP_NUM_TASKS", minimum=1)
    nodes = env_int(env, "SLURM_STEP_NUM_NODES", minimum=1) if env.get("SLURM_STEP_NUM_NODES") else 1
    per_node = ranks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE") or str(world))
    if per_node * nodes != world:
        raise UserError(f"srun started {world} tasks on {nodes} node(s), not the same number on each "
                        "node: give sbatch --ntasks-per-node (one task per GPU)")
    source = {"world_size": "SLURM_STEP_NUM_TASKS", "ranks_per_node": "SLURM_STEP_TASKS_PER_NODE",
              "nodes": "SLURM_STEP_NUM_NODES"}
    if env.get("MASTER_ADDR"):
        addr, source["master_addr"] = env["MASTER_ADDR"], "MASTER_ADDR"
    else:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
        if not nodelist:
            raise UserError("srun set no SLURM_STEP_NODELIST: set MASTER_ADDR to the first node's address")
        addr, source["master_addr"] = first_host(nodelist), "first host of SLURM_STEP_NODELIST"
    if env.get("MASTER_PORT"):
        port, source["master_port"] = env_int(env, "MASTER_PORT", minimum=1), "MASTER_PORT"
    else:
        port = job_port(job_id or "0")
        source["master_port"] = (f"{JOB_PORT_BASE} + job id mod {JOB_PORT_SPAN} (job {job_id}): "
                                 "the same after a requeue")
    return Launch("srun", env_int(env, "SLURM_PROCID"), env_int(env, "SLURM_LOCALID"), world, per_node,
                  nodes, addr, port, job_id, restarts, source)


def _job(env) -> tuple[str | None, int]:
    """(job id, restarts) when this process runs inside a SLURM job, else (None, 0)."""
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        job_id = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    else:
        job_id = env.get("SLURM_JOB_ID") or None
    restarts = env_int(env, "SLURM_RESTART_COUNT") if env.get("SLURM_RESTART_COUNT") else 0
    return job_id, restarts


def job_port(job_id: str) -> int:
    digits = "".join(c for c in job_id if c.isdigit()) or "0"
    return JOB_PORT_BASE + int(digits) % JOB_PORT_SPAN


def first_host(nodelist: str) -> str:
    """The first host of a SLURM hostlist: 'gpu[007-009,012],cpu1' -> 'gpu007',
    'rack[2-3]-n[01-04]' -> 'rack2-n01' (each bracket contributes its first value, padding kept)."""
    host, i = [], 0
    while i < len(nodelist) and nodelist[i] != ",":
        if nodelist[i] == "[":
            close = nodelist.find("]", i)
            if close < 0:
                raise UserError(f"cannot read the SLURM hostlist {nodelist!r}: set MASTER_ADDR")
            host.append(nodelist[i + 1:close].split(",")[0].split("-")[0])
            i = close + 1
        else:
            host.append(nodelist[i])
            i += 1
    return "".join(host)


def ranks_per_node(tasks_per_node: str) -> int:
    """SLURM's task counts per node ('4(x2)', '2,2', '3,1') -> the one count every node has."""
    counts = set()
    for part in tasks_per_node.split(","):
        count = part.split("(")[0]
        if not count.isdigit():
            raise UserError(f"cannot read SLURM's tasks per node {tasks_per_node!r}")
        counts.add(int(count))
    if len(counts) != 1:
        raise UserError(f"SLURM placed an uneven number of tasks on the nodes ({tasks_per_node}): "
                        "give sbatch --ntasks-per-node so that every node runs as many ranks")
    return counts.pop()


def env_int(env, name: str, minimum: int = 0, default: int | None = None) -> int:
    """An integer environment variable; `default` when it is unset or empty (if given)."""
    value = env.get(name, "")
    if value == "" and default is not None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer: unset it or "
                        "fix the launcher command") from None
    if number < minimum:
        raise UserError(f"environment variable {name}={value!r} must be at least {minimum}")
    return number


def setup(env=None) -> Launch:
    """Read the launch and export RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE (streaming),
    LOCAL_SIZE (DeepSpeed's CPU shared memory), MASTER_ADDR and MASTER_PORT."""
    env = os.environ if env is None else env
    launch = from_environment(env)
    if launch.master_port is None:
        if launch.world_size > 1:
            raise UserError("MASTER_PORT is not set: start several ranks with the deepspeed "
                            "launcher, torchrun or srun, which set it")
        launch = Launch(**{**launch.__dict__, "master_port": free_port()})
    for name, value in (("RANK", launch.rank), ("WORLD_SIZE", launch.world_size),
                        ("LOCAL_RANK", launch.local_rank), ("LOCAL_WORLD_SIZE", launch.ranks_per_node),
                        ("LOCAL_SIZE", launch.ranks_per_node), ("MASTER_ADDR", launch.master_addr),
                        ("MASTER_PORT", launch.master_port)):
        env[name] = str(value)
    return launch
