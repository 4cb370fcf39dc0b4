"""The process group: DeepSpeed's init with a stated timeout, rank and world, and the one
collective the objectives need, all-gather with gradient. (engine/launcher_env.py says where the
ranks come from.)"""
import errno
import os
import socket
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from engine.errors import UserError


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def local_rank() -> int:
    """Set by deepspeed/torchrun as LOCAL_RANK, by srun as SLURM_LOCALID."""
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))


def local_device(rank_on_node: int | None = None) -> torch.device:
    """This process's device: GPU `rank_on_node` (default: local_rank()), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    index = local_rank() if rank_on_node is None else rank_on_node
    return torch.device("cuda", gpu_index(index, torch.cuda.device_count()))


def gpu_index(rank_on_node: int, visible: int) -> int:
    """GPU `rank_on_node` of the `visible` ones, or a UserError saying how to launch.

    DeepSpeed picks a rank's GPU by LOCAL_RANK alone (set_device(LOCAL_RANK) in its engine, and
    init_process_group's device_id), so local rank k needs GPU k to be visible. One GPU bound per
    task (srun --gpus-per-task 1, --gpu-bind) shows local rank 3 a single GPU, numbered 0; more
    ranks than GPUs would put two ranks on one GPU, which NCCL refuses."""
    if rank_on_node < visible:
        return rank_on_node
    visible_list = os.environ.get("CUDA_VISIBLE_DEVICES")
    shown = f" (CUDA_VISIBLE_DEVICES={visible_list})" if visible_list is not None else ""
    raise UserError(f"local rank {rank_on_node} sees {visible} GPU(s){shown}, and DeepSpeed gives local rank k "
                    "GPU k: start at most one rank per GPU, each seeing all of its node's GPUs (under SLURM "
                    "drop --gpus-per-task and --gpu-bind; with deepspeed, --num_gpus at most the GPU count)")


def skip_reduction_alone(engine) -> None:
    """One rank without ZeRO: DeepSpeed would still copy every gradient into buckets, all-reduce
    them over a group of one and copy them back, each step. Its own switch for a gradient
    reduction done elsewhere turns that off; the gradients are already the reduced ones."""
    if world_size() == 1 and engine.zero_optimization_stage() == 0:
        engine.enable_backward_allreduce = False


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's [n, D] block; backward sums the gradients all ranks computed
    for this rank's block (each rank's loss touches every column) and returns that slice.

    all_reduce + slice rather than reduce_scatter because gloo (the CPU backend) has no
    reduce_scatter.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # Summed in fp32 (or wider) whatever the embeddings' dtype (bf16 training): as DeepSpeed
        # reduces the parameters' gradients (engine/plan/precision.py).
        summed = grad.to(torch.promote_types(grad.dtype, torch.float32)).contiguous()
        dist.all_reduce(summed)
        return summed[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n].to(grad.dtype)


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """[n, D] per rank -> [world * n, D], rank r's block at rows r*n ... (r+1)*n - 1.

    Every rank must pass the same n (data-parallel micro-batches are equal by construction).
    """
    if world_size() == 1:
        return x
    return _AllGatherWithGrad.apply(x)


def init_distributed(timeout_s: float) -> None:
    """deepspeed.init_distributed with `timeout_s` on every collective, minus the shared memory
    it leaks on the CPU.

    The timeout is what ends a job whose rank died without closing its connections (a lost
    node): every other rank fails its next collective after that long, instead of waiting for
    NCCL's 30-minute default.

    When every rank is on this host, DeepSpeed's CPU accelerator gives each rank a 64 MiB
    all-reduce workspace in POSIX shared memory and never unlinks it (deepspeed 0.19,
    csrc/cpu/comm/shm.cpp): every run would leave 64 MiB x ranks of RAM in /dev/shm until the
    machine reboots. Each rank maps every peer's workspace inside init, so once all ranks are
    past init (the barrier) the names are no longer needed: unlinking them now keeps the
    mappings working and frees the memory when the processes exit, however they exit.
    """
    # deferred: DeepSpeed is slow to import, and the evaluator and exporter load this module
    # (through eval/shard.py and train/checkpoint.py) without ever starting a process group.
    import deepspeed.accelerator

    timeout = timedelta(seconds=timeout_s)
    # Groups made later with new_group() and no timeout (DeepSpeed's data-parallel clone of the
    # world, which ZeRO's gradient all-reduces use) take torch's module defaults, 30 minutes,
    # not the world group's: seen as a rank waiting forever for a lost peer. Set them too.
    c10d = torch.distributed.distributed_c10d
    c10d.default_pg_timeout = timeout
    if hasattr(c10d, "default_pg_nccl_timeout"):
        c10d.default_pg_nccl_timeout = timeout
    if int(os.environ.get("RANK", "0")) == 0:  # rank() says 0 on every rank until init
        check_rendezvous_port()
    deepspeed.init_distributed(verbose=False, timeout=timeout)
    if deepspeed.accelerator.get_accelerator().device_name() != "cpu":
        return
    if world_size() > 1:
        dist.barrier()
    cpu_allreduce_workspace(os.environ["MASTER_PORT"], rank()).unlink(missing_ok=True)


def close_distributed(wait_for_peers: bool = True) -> None:
    """Destroy the process group while the interpreter is still whole, after meeting the other
    ranks (`wait_for_peers`: once every rank is done with its collectives). Left to the exit,
    gloo's worker threads can still hold the last collectives' tensors and free them during
    interpreter finalization, which aborts the process (SIGABRT) after a run that succeeded, or
    turns a clean error exit into a crash (seen as an occasional failed rank in the tests; see
    pytorch/pytorch PR 179291). On an error path, leave without waiting: a peer may never come,
    and a peer still waiting in a collective then fails at once instead of at its timeout."""
    if not dist.is_initialized():
        return
    if wait_for_peers and world_size() > 1:
        dist.barrier()
    dist.destroy_process_group()


def check_rendezvous_port() -> None:
    """On rank 0, before torch listens on MASTER_PORT: a port another process holds (another job,
    a run left behind) is refused with the flag to change, rather than torch's traceback.

    Not under torchrun's agent, which listens there itself and lends its store to the ranks."""
    port = os.environ.get("MASTER_PORT")
    if not port or os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":
        return
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed run's TIME_WAIT is no owner
        try:
            probe.bind(("", int(port)))
        except OSError as error:
            if error.errno != errno.EADDRINUSE:
                raise
            raise UserError(f"port {port} (MASTER_PORT, where rank 0 meets the others) is in use on this machine, "
                            f"by another job or a run left behind: start with another, e.g. "
                            f"`deepspeed --master_port {free_port()} launchers/pretrain.py ...`") from error


def cpu_allreduce_workspace(port: str | int, rank: int) -> Path:
    """Where DeepSpeed's CPU all-reduce workspace of `rank` lives for a run on `port`."""
    address = os.environ.get("MASTER_ADDR", "127.0.0.1")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{address}_{port}_{rank}"


def free_port() -> int:
    """A TCP port on this host that nothing listens on now (for a single-host rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def broadcast_from_rank0(value):
    """Rank 0's value on every rank (e.g. a run name containing the time)."""
    if world_size() == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if world_size() > 1:
        torch.distributed.barrier()


def gather_to_all(value) -> list:
    """Every rank's value, in rank order, on every rank (small picklable values)."""
    if world_size() == 1:
        return [value]
    values = [None] * world_size()
    torch.distributed.all_gather_object(values, value)
    return values


def average_buffers(module: torch.nn.Module) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over ranks.

    DeepSpeed, unlike torch DDP, never synchronises buffers, so each rank's running
    statistics drift apart on its own data shard, and a checkpoint keeps only rank 0's. Calling
    this before evaluating and before saving makes every rank evaluate the same model and
    makes a resumed run identical to an uninterrupted one.
    """
    if world_size() == 1:
        return
    for buffer in module.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer.div_(world_size())
