"""What a run has to work with: the accelerator, its memory, the ranks and the CPU cores.

`probe()` reads torch and the launcher's environment, and on a GPU runs one image through
DALI's GPU decoding. The planner takes a `Hardware` value, so tests and `--dry-run` can plan
for machines that are not here.
"""
import os
from dataclasses import dataclass

import torch

from engine.data.gpu_decode_probe import gpu_decode_failure
from engine.dist import local_device
from engine.launcher_env import Launch, env_int, from_environment


@dataclass(frozen=True)
class Hardware:
    accelerator: str                            # "cuda" or "cpu"
    device_name: str                            # e.g. "NVIDIA H100 80GB HBM3", or "cpu"
    device_memory_bytes: int                    # per device; for cpu: usable RAM / local ranks
    compute_capability: tuple[int, int] | None
    bf16: bool                                  # cuda: sm_80+; cpu: True (torch and DeepSpeed's CPU accelerator run it)
    world_size: int
    local_world_size: int                       # ranks per node
    nodes: int
    cpus_per_node: int
    ranks_from: str = "as simulated"            # where the rank counts came from (the plan says)
    # cuda: why a one-image DALI GPU pipeline failed here (None: it ran, or was not tried)
    gpu_decode_error: str | None = None
    # cpu: the instructions that compute bf16 natively ("AMX", "AVX512-BF16"); None: bf16 is
    # emulated through fp32 there, slower than fp32 itself
    cpu_bf16: str | None = None


def probe(launch: Launch | None = None, *, try_gpu_decode: bool = True) -> Hardware:
    """This process's view of the job: device properties from torch, ranks from the launcher
    (`launch`, else read from the environment), and on a GPU whether DALI decodes there
    (`try_gpu_decode`; False when --decode-device cpu was given: nothing to decide, and a
    decoder that would crash the process is never started)."""
    launch = launch or from_environment(os.environ)
    world_size, local_world_size, nodes = launch.world_size, launch.ranks_per_node, launch.nodes
    ranks_from = launch.describe_ranks()
    cpus_per_node = _cpus_per_node(os.environ)
    if torch.cuda.is_available():
        device = local_device(launch.local_rank)
        props = torch.cuda.get_device_properties(device)
        capability = (props.major, props.minor)
        return Hardware(
            accelerator="cuda", device_name=props.name,
            device_memory_bytes=int(props.total_memory), compute_capability=capability,
            bf16=capability >= (8, 0),   # bf16 tensor cores arrived with Ampere (sm_80)
            world_size=world_size, local_world_size=local_world_size, nodes=nodes,
            cpus_per_node=cpus_per_node, ranks_from=ranks_from,
            gpu_decode_error=gpu_decode_failure(device.index) if try_gpu_decode else None,
        )
    return Hardware(
        accelerator="cpu", device_name="cpu",
        device_memory_bytes=_usable_ram_bytes() // local_world_size, compute_capability=None,
        bf16=True, world_size=world_size, local_world_size=local_world_size, nodes=nodes,
        cpus_per_node=cpus_per_node, ranks_from=ranks_from, cpu_bf16=native_cpu_bf16(_cpu_flags()),
    )


# CPU flags (/proc/cpuinfo) of the units that compute bf16 natively, fastest first: AMX's tile
# matrix multiply (Xeon since Sapphire Rapids) and AVX512-BF16's dot products (Cooper Lake,
# AMD Zen 4). oneDNN, which torch's CPU matmuls run on, uses them when present.
_NATIVE_BF16 = (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16"))


def native_cpu_bf16(flags: set[str]) -> str | None:
    """The fastest native bf16 unit among a CPU's `flags`, or None."""
    return next((name for flag, name in _NATIVE_BF16 if flag in flags), None)


def _cpu_flags() -> set[str]:
    """This machine's CPU flags (x86 Linux); empty where /proc/cpuinfo does not list them."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def _cpus_per_node(env) -> int:
    """Cores this node may use. Under SLURM a task's affinity can be just its own share,
    so SLURM_CPUS_ON_NODE (the node's whole allocation) is preferred when it is set."""
    return env_int(env, "SLURM_CPUS_ON_NODE", minimum=1, default=0) or len(os.sched_getaffinity(0))


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
