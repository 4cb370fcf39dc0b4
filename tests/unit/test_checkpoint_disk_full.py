"""A checkpoint that does not fit on a real small file system: the save raises UserError naming the
directory, its free space, the checkpoint's size and the last complete step; `latest` stays on
that step and the partial checkpoint is removed, its space given back. With room, saving works."""
import errno
import os
import subprocess
from pathlib import Path

import torch
import torch.multiprocessing as mp

from engine.dist import close_distributed, free_port
from tests.small_disk import mount_tmpfs

SIDE = 500  # a Linear of 250,500 parameters: 4 MB checkpoints at ZeRO-1 in fp32 (16 bytes each)


def _worker(_, port, ckpt_dir, disk, out):
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import deepspeed

    from engine.errors import UserError
    from engine.plan.disk import checkpoint_bytes_per_param, free_bytes
    from engine.train import checkpoint

    deepspeed.init_distributed(verbose=False)
    model = torch.nn.Linear(SIDE, SIDE)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.1),
        config={"train_batch_size": 4, "zero_optimization": {"stage": 1}, "steps_per_print": 10**9})
    engine.backward(engine(torch.randn(4, SIDE)).pow(2).mean())
    engine.step()
    ckpt_dir = Path(ckpt_dir)
    n_params = sum(p.numel() for p in model.parameters())
    expected = n_params * checkpoint_bytes_per_param("fp32", 1)
    checkpoint.save(engine, ckpt_dir, 1, {}, expected_bytes=expected)
    out["estimate"], out["written"] = expected, checkpoint._size(ckpt_dir / "step00000001")
    try:
        checkpoint.save(engine, ckpt_dir, 2, {}, expected_bytes=expected)
    except UserError as error:
        out["error"] = str(error)
    out["latest"] = checkpoint.latest_tag(ckpt_dir)
    out["partial_left"] = (ckpt_dir / "step00000002").exists()
    out["free_after"] = free_bytes(ckpt_dir)
    subprocess.run(["mount", "-o", "remount,size=32M", disk], check=True)
    checkpoint.save(engine, ckpt_dir, 2, {}, expected_bytes=expected)
    out["latest_with_room"] = checkpoint.latest_tag(ckpt_dir)
    close_distributed()


def test_a_checkpoint_that_does_not_fit_names_the_fix_and_keeps_the_last(tmp_path):
    disk = tmp_path / "disk"
    mount_tmpfs(disk, "size=6M")
    try:
        out = mp.Manager().dict()
        mp.spawn(_worker, args=(free_port(), str(disk / "ckpt"), str(disk), out), nprocs=1)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
    assert abs(out["written"] - out["estimate"]) < 0.01 * out["written"], (out["written"], out["estimate"])
    assert out["error"].startswith(f"no space left for the checkpoint of step 2 (about 4.0 MB) under "
                                   f"{disk / 'ckpt'}: its file system has "), out["error"]
    assert "the last complete checkpoint, of step 1, is kept" in out["error"]
    assert "give that as --out, then run the same command again" in out["error"]
    assert out["latest"] == "step00000001" and not out["partial_left"]
    assert out["free_after"] > 1.5 * 2**20  # 6 MB less one 4 MB checkpoint: the partial one's space came back
    assert out["latest_with_room"] == "step00000002"


def _one_rank_fails_worker(rank, port, ckpt_dir, out):
    """Two ranks; rank 1 alone cannot write its ZeRO shard of step 2 (a disk of its own filling)."""
    from datetime import timedelta

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import deepspeed

    from engine.errors import UserError
    from engine.train import checkpoint

    # A short timeout: ranks that part at the failure fail this test in seconds, not minutes.
    deepspeed.init_distributed(verbose=False, timeout=timedelta(seconds=20))
    model = torch.nn.Linear(8, 8)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.1),
        config={"train_batch_size": 4, "zero_optimization": {"stage": 1}, "steps_per_print": 10**9})
    ckpt_dir = Path(ckpt_dir)
    checkpoint.save(engine, ckpt_dir, 1, {})
    real_save = torch.save

    def no_room_on_rank1(obj, path, *args, **kwargs):
        if rank == 1 and "zero_pp_rank_1" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(obj, path, *args, **kwargs)

    torch.save = no_room_on_rank1
    try:
        checkpoint.save(engine, ckpt_dir, 2, {})
        out[rank] = "saved"
    except UserError as error:
        out[rank] = str(error)
    finally:
        torch.save = real_save
    out[f"latest{rank}"] = checkpoint.latest_tag(ckpt_dir)


def test_a_write_failing_on_one_rank_ends_every_rank_together(tmp_path):
    """DeepSpeed's own barrier after its writes is skipped by the rank whose write raised: the
    save takes it for that rank, or the ranks would part and wait on each other."""
    out = mp.Manager().dict()
    mp.spawn(_one_rank_fails_worker, args=(free_port(), str(tmp_path / "ckpt"), out), nprocs=2, join=True)
    for rank in (0, 1):
        assert out[rank].startswith("no space left for the checkpoint of step 2"), out[rank]
        assert out[f"latest{rank}"] == "step00000001"
    assert not (tmp_path / "ckpt" / "step00000002").exists()


def test_only_a_failed_write_is_taken_for_one(tmp_path):
    from engine.train.checkpoint import _disk_full, _write_failed

    assert _write_failed(OSError(errno.ENOSPC, "No space left on device"))
    assert _write_failed(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"))
    wrapped = RuntimeError("outer")
    wrapped.__cause__ = OSError(errno.EDQUOT, "Disk quota exceeded")
    assert _write_failed(wrapped)
    # A lost peer or a device error is no write failure: the ranks must not wait on a barrier for it.
    assert not _write_failed(RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer"))
    assert not _write_failed(RuntimeError("CUDA error: an illegal memory access was encountered"))
    # torch's errno-less error is a full disk only while the disk has less room than the checkpoint.
    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert _disk_full(torch_error, tmp_path, expected_bytes=10**30)
    assert not _disk_full(torch_error, tmp_path, expected_bytes=1)
    assert not _disk_full(OSError(errno.EACCES, "Permission denied"), tmp_path, expected_bytes=10**30)
    assert _disk_full(OSError(errno.ENOSPC, "No space left on device"), tmp_path, expected_bytes=1)
