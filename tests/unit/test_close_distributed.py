"""engine.dist.close_distributed: a rank that finished its work exits cleanly.

Left to the interpreter's exit, a gloo process group can abort a rank that succeeded: its worker
threads still hold the last collectives' tensors and free them while Python is being torn down
("terminate called without an active exception", SIGABRT). It hit the rank that exits first,
in about half of such exits on this machine; a run or a test then fails after its work is done.
"""
import os
import time

import torch
import torch.multiprocessing as mp

from engine.dist import free_port

ROUNDS = 3  # a rank left to exit with its group aborted in about half of the exits here


def _rank(rank: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from engine import dist

    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    for _ in range(20):  # asynchronous collectives, as ZeRO issues them
        tensors = [torch.ones(1 << 14) for _ in range(4)]
        for work in [torch.distributed.all_reduce(tensor, async_op=True) for tensor in tensors]:
            work.wait()
        assert all(tensor[0].item() == 2 for tensor in tensors)  # one from each rank
    if rank == 0:
        time.sleep(0.3)  # rank 1 leaves first, as a rank with less to write does
    dist.close_distributed()
    assert not torch.distributed.is_initialized()


def test_ranks_leave_without_aborting_after_their_collectives():
    for _ in range(ROUNDS):
        mp.spawn(_rank, args=(free_port(),), nprocs=2)  # raises if a rank died by a signal
