"""engine.dist.close_distributed: a rank that finished its work, or ends on an error every rank
met, exits cleanly with its own status.

Left to the interpreter's exit, a gloo process group can abort a rank: its worker threads still
hold the last collectives' tensors and free them while Python is being torn down ("terminate
called without an active exception", SIGABRT). On this machine it hit the rank that exits first
in about half of the successful exits, and in about a third of the exits on an error the ranks
agreed on; a run (or a test) then fails, or exits with -6 instead of its status 2 or 4.
"""
import os
import sys
import time

import torch
import torch.multiprocessing as mp

from engine.dist import free_port

ROUNDS = 3
ERROR_EXIT = 2  # as the launcher exits on bad input


def _collectives() -> None:
    for _ in range(20):  # asynchronous collectives, as ZeRO issues them
        tensors = [torch.ones(1 << 14) for _ in range(4)]
        for work in [torch.distributed.all_reduce(tensor, async_op=True) for tensor in tensors]:
            work.wait()
        assert all(tensor[0].item() == 2 for tensor in tensors)  # one from each rank


def _rank(rank: int, port: int, agreed_error: bool) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from engine import dist

    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    _collectives()
    if rank == 0:
        time.sleep(0.3)  # rank 1 leaves first, as a rank with less to write does
    if agreed_error:  # every rank stops here, as on a full disk or too many non-finite steps
        dist.close_distributed(wait_for_peers=False)
        sys.exit(ERROR_EXIT)
    dist.close_distributed()
    assert not torch.distributed.is_initialized()


def test_ranks_leave_without_aborting_after_their_collectives():
    for _ in range(ROUNDS):
        mp.spawn(_rank, args=(free_port(), False), nprocs=2)  # raises if a rank died by a signal


def test_ranks_ending_on_an_error_they_all_met_exit_with_its_status():
    for _ in range(ROUNDS):
        ranks = mp.start_processes(_rank, args=(free_port(), True), nprocs=2, join=False, start_method="spawn")
        for process in ranks.processes:
            process.join(120)
        assert [process.exitcode for process in ranks.processes] == [ERROR_EXIT] * 2  # -6: aborted
