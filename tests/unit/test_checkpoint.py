"""A crash in the middle of a save leaves `latest` on the previous complete checkpoint."""
import os
from pathlib import Path

import torch
import torch.multiprocessing as mp

from engine.dist import free_port


def _train_step(engine):
    loss = engine(torch.randn(4, 3)).pow(2).mean()
    engine.backward(loss)
    engine.step()


def _worker(_, port, ckpt_dir, out):
    # A fresh process: DeepSpeed's engine needs a process group of its own.
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import deepspeed

    from engine.train import checkpoint

    deepspeed.init_distributed(verbose=False)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.1),
        config={"train_batch_size": 4, "zero_optimization": {"stage": 1}, "steps_per_print": 10**9})
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
    step, loader_state = checkpoint.load(engine, ckpt_dir)
    out["restored"] = (step, loader_state, torch.equal(model.weight.detach(), weights_at_1))

    for step in (3, 4, 5):
        _train_step(engine)
        checkpoint.save(engine, ckpt_dir, step, {"position": step})
    out["kept"] = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir())
    out["latest_end"] = checkpoint.latest_tag(ckpt_dir)


def test_crash_mid_save_keeps_the_previous_checkpoint_and_old_ones_are_pruned(tmp_path):
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(free_port(), str(tmp_path / "ckpt"), out), nprocs=1)
    assert out["crashed"]
    assert out["latest_after_crash"] == "step00000001"
    assert out["restored"] == (1, {"position": 1}, True)
    # The last two complete checkpoints stay; the half-written step 2 and older ones go.
    assert out["kept"] == ["step00000004", "step00000005"]
    assert out["latest_end"] == "step00000005"
