"""A crash in the middle of a save leaves `latest` on the previous complete checkpoint; a
checkpoint damaged after it was written is set aside and the previous one loaded."""
import os
from pathlib import Path

import torch
import torch.multiprocessing as mp

from engine.dist import close_distributed, free_port


def _train_step(engine):
    loss = engine(torch.randn(4, 3)).pow(2).mean()
    engine.backward(loss)
    engine.step()


def _engine(port):
    # A fresh process: DeepSpeed's engine needs a process group of its own.
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import deepspeed

    deepspeed.init_distributed(verbose=False)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.1),
        config={"train_batch_size": 4, "zero_optimization": {"stage": 1}, "steps_per_print": 10**9})
    return engine, model


def _worker(_, port, ckpt_dir, out):
    from engine.train import checkpoint

    engine, model = _engine(port)
    ckpt_dir = Path(ckpt_dir)

    _train_step(engine)
    checkpoint.save(engine, ckpt_dir, 1, {"position": 1})
    weights_at_1 = model.weight.detach().clone()
    _train_step(engine)

    real_save = torch.save

    def crash_on_rank_file(obj, path, *args, **kwargs):
        if "rank0.pt" in str(path):
            raise OSError("disk full (simulated)")
        return real_save(obj, path, *args, **kwargs)

    torch.save = crash_on_rank_file
    try:
        checkpoint.save(engine, ckpt_dir, 2, {"position": 2})
        crashed = False
    except OSError:
        crashed = True
    finally:
        torch.save = real_save
    out["crashed"] = crashed
    out["latest_after_crash"] = checkpoint.latest_tag(ckpt_dir)
    restored = checkpoint.load(engine, ckpt_dir)
    out["restored"] = (restored.step, restored.rank_state, torch.equal(model.weight.detach(), weights_at_1))

    for step in (3, 4, 5):
        _train_step(engine)
        checkpoint.save(engine, ckpt_dir, step, {"position": step})
    out["kept"] = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir())
    out["latest_end"] = checkpoint.latest_tag(ckpt_dir)
    close_distributed()


def test_crash_mid_save_keeps_the_previous_checkpoint_and_old_ones_are_pruned(tmp_path):
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(free_port(), str(tmp_path / "ckpt"), out), nprocs=1)
    assert out["crashed"]
    assert out["latest_after_crash"] == "step00000001"
    assert out["restored"] == (1, {"position": 1}, True)
    # The last two complete checkpoints stay; the half-written step 2 and older ones go.
    assert out["kept"] == ["step00000004", "step00000005"]
    assert out["latest_end"] == "step00000005"


def _largest_entry_data_offset(path: Path) -> int:
    """Where the bytes of the largest record of a torch.save archive start."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as archive:
        entry = max(archive.infolist(), key=lambda e: e.file_size)
    header = path.read_bytes()[entry.header_offset:entry.header_offset + 30]
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return entry.header_offset + 30 + name_len + extra_len


def _damage_worker(_, port, ckpt_dir, out):
    from engine.train import checkpoint

    engine, model = _engine(port)
    ckpt_dir = Path(ckpt_dir)
    weights = {}
    for step in (1, 2):
        _train_step(engine)
        checkpoint.save(engine, ckpt_dir, step, {"position": step})
        weights[step] = model.weight.detach().clone()
    newest = ckpt_dir / "step00000002"
    out["files"] = sorted(p.name for p in newest.iterdir())
    # The model file of the newest checkpoint loses its second half (a copy cut short).
    model_file = next(newest.glob("mp_rank_*_model_states.pt"))
    model_file.write_bytes(model_file.read_bytes()[: model_file.stat().st_size // 2])
    out["problem"] = checkpoint.damage(newest, 0, 1)
    _train_step(engine)
    restored = checkpoint.load(engine, ckpt_dir)
    out["restored"] = (restored.step, restored.rank_state, torch.equal(model.weight.detach(), weights[1]))
    out["after"] = sorted(p.name for p in ckpt_dir.iterdir() if p.name.startswith(("step", "latest")))
    out["latest"] = checkpoint.latest_tag(ckpt_dir)

    # Same size, one byte flipped inside the optimizer states' tensor data: only CRCs tell.
    older = ckpt_dir / "step00000001"
    optim_file = next(older.glob("*optim_states.pt"))
    data = bytearray(optim_file.read_bytes())
    data[_largest_entry_data_offset(optim_file)] ^= 0xFF
    optim_file.write_bytes(bytes(data))
    out["flipped"] = checkpoint.damage(older, 0, 1)
    try:
        checkpoint.load(engine, ckpt_dir)
        out["none_left"] = None
    except RuntimeError as error:
        out["none_left"] = str(error)
    close_distributed()


def test_a_damaged_checkpoint_is_set_aside_and_the_one_before_it_loaded(tmp_path, capfd):
    out = mp.Manager().dict()
    mp.spawn(_damage_worker, args=(free_port(), str(tmp_path / "ckpt"), out), nprocs=1)
    assert "manifest.json" in out["files"] and "rank0.pt" in out["files"]
    assert "model_states.pt has" in out["problem"] and "bytes when written" not in out["problem"]
    assert out["restored"] == (1, {"position": 1}, True)
    assert out["after"] == ["latest", "step00000001", "step00000002.damaged"]
    assert out["latest"] == "step00000001"
    assert "fails its CRC" in out["flipped"] or "unreadable" in out["flipped"]
    assert "no intact checkpoint" in out["none_left"] and "step00000001" in out["none_left"]
    assert "checkpoint" in capfd.readouterr().out  # the warning names what was set aside


def test_each_file_of_a_checkpoint_is_copied_to_the_store_once_by_a_rank_that_sees_it():
    from engine.train.checkpoint import MANIFEST, uploads

    # Two nodes without a shared disk, two ranks each: a node's ranks see that node's files.
    node0 = {"mp_rank_00_model_states.pt": 9, "zero_pp_rank_0.pt": 5, "zero_pp_rank_1.pt": 5,
             "rank0.pt": 1, "rank1.pt": 1}
    node1 = {"zero_pp_rank_2.pt": 5, "zero_pp_rank_3.pt": 5, "rank2.pt": 1, "rank3.pt": 1}
    seen = [node0, node0, node1, node1]
    names = sorted({**node0, **node1})
    copied = [uploads(names, seen, "step00000004", rank) for rank in range(4)]
    flat = [f for files in copied for f in files if not f.endswith(MANIFEST)]
    assert sorted(flat) == [f"step00000004/{n}" for n in names]  # each file once
    for rank, files in enumerate(copied):
        assert all(f.split("/")[1] in seen[rank] for f in files if not f.endswith(MANIFEST))
        assert files and (files[-1] == f"step00000004/{MANIFEST}") == (rank == 0)  # the manifest last, by rank 0
    # A shared disk: every rank sees every file, and the copies are spread over all of them.
    shared = [uploads(names, [{**node0, **node1}] * 4, "t", rank) for rank in range(4)]
    assert [len(files) for files in shared] == [4, 2, 2, 2]  # 9 files, and rank 0's manifest
