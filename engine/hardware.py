"""What a run has to work with: the accelerator, its memory, the ranks and the CPU cores.

`probe()` reads torch and the launcher's environment. The planner takes a `Hardware`
value, so tests and `--dry-run` can plan for machines that are not here.
"""
import math
import os
from dataclasses import dataclass

import torch

from engine.errors import UserError


@dataclass(frozen=True)
class Hardware:
    accelerator: str                            # "cuda" or "cpu"
    device_name: str                            # e.g. "NVIDIA H100 80GB HBM3", or "cpu"
    device_memory_bytes: int                    # per device; for cpu: usable RAM / local ranks
    compute_capability: tuple[int, int] | None
    bf16: bool                                  # cuda: sm_80+; cpu: False (we train fp32 on CPU)
    world_size: int
    local_world_size: int                       # ranks per node
    nodes: int
    cpus_per_node: int


def probe() -> Hardware:
    """This process's view of the job: device properties from torch, ranks from the launcher."""
    world_size, local_world_size, nodes = _ranks_from_env(os.environ)
    cpus_per_node = _cpus_per_node(os.environ)
    if torch.cuda.is_available():
        local_rank = _env_int(os.environ, "LOCAL_RANK", 0, minimum=0)
        props = torch.cuda.get_device_properties(local_rank % torch.cuda.device_count())
        capability = (props.major, props.minor)
        return Hardware(
            accelerator="cuda", device_name=props.name,
            device_memory_bytes=int(props.total_memory), compute_capability=capability,
            bf16=capability >= (8, 0),   # bf16 tensor cores arrived with Ampere (sm_80)
            world_size=world_size, local_world_size=local_world_size, nodes=nodes,
            cpus_per_node=cpus_per_node,
        )
    return Hardware(
        accelerator="cpu", device_name="cpu",
        device_memory_bytes=_usable_ram_bytes() // local_world_size, compute_capability=None,
        bf16=False, world_size=world_size, local_world_size=local_world_size, nodes=nodes,
        cpus_per_node=cpus_per_node,
    )


def _env_int(env, name: str, default: int, minimum: int = 1) -> int:
    value = env.get(name)
    if value in (None, ""):
        return default
    try:
        number = int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer: "
                        "unset it or fix the launcher command") from None
    if number < minimum:
        raise UserError(f"environment variable {name}={value!r} must be at least {minimum}")
    return number


def _ranks_from_env(env) -> tuple[int, int, int]:
    """(world size, ranks per node, nodes), from torchrun/deepspeed variables, else SLURM's.

    torchrun sets WORLD_SIZE and LOCAL_WORLD_SIZE; the deepspeed launcher sets WORLD_SIZE and
    LOCAL_SIZE. Inside `srun` without a launcher, SLURM's task counts say the same.
    """
    if env.get("WORLD_SIZE"):
        world_size = _env_int(env, "WORLD_SIZE", 1)
        local = _env_int(env, "LOCAL_WORLD_SIZE", 0) or _env_int(env, "LOCAL_SIZE", 0) or world_size
        return world_size, local, math.ceil(world_size / local)
    if env.get("SLURM_NTASKS"):
        world_size = _env_int(env, "SLURM_NTASKS", 1)
        nodes = _env_int(env, "SLURM_NNODES", 1)
        local = _env_int(env, "SLURM_NTASKS_PER_NODE", 0) or math.ceil(world_size / nodes)
        return world_size, local, nodes
    return 1, 1, 1


def _cpus_per_node(env) -> int:
    """Cores this node may use. Under SLURM a task's affinity can be just its own share,
    so SLURM_CPUS_ON_NODE (the node's whole allocation) is preferred when it is set."""
    return _env_int(env, "SLURM_CPUS_ON_NODE", 0) or len(os.sched_getaffinity(0))


def _usable_ram_bytes() -> int:
    """Physical RAM, lowered to the container's cgroup limit when one is set."""
    usable = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for limit_file in ("/sys/fs/cgroup/memory.max",                     # cgroup v2
                       "/sys/fs/cgroup/memory/memory.limit_in_bytes"):  # cgroup v1
        try:
            with open(limit_file) as f:
                limit = f.read().strip()
        except OSError:
            continue
        if limit.isdigit():
            usable = min(usable, int(limit))
    return usable
