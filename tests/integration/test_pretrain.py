"""The launcher end to end: real DeepSpeed (CPU accelerator, gloo), real streaming + DALI."""
import json

import pytest
import torch

from launching import check, launch, read_metrics, tensorboard_scalars
from wandb_offline import offline_runs

SHORT = ["--steps", "6", "--global-batch", "32", "--log-every", "1", "--eval-every", "6"]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_ranks_train_at_each_zero_stage(stage, tmp_path, cache_env):
    out = tmp_path / f"zero{stage}"
    profile = ["--profile", "2"] if stage == 2 else []   # one case also traces two steps on each rank
    result = launch([*SHORT, *profile, "--zero-stage", str(stage), "--out", str(out)], cache_env, ranks=2,
                    launcher="deepspeed")   # the README's command
    check(result)
    if profile:
        for rank in (0, 1):
            trace = json.loads((out / "profile" / f"rank{rank}-steps3-4.json").read_text())
            steps = [e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("ProfilerStep#")]
            assert steps == ["ProfilerStep#2", "ProfilerStep#3"], steps   # the profiler counts from 0
            assert "aten::mm" in (out / "profile" / f"rank{rank}-steps3-4.txt").read_text()
        assert "profile of 2 step(s)" in result.stdout
    plan = json.loads((out / "plan.json").read_text())
    assert plan["zero_stage"] == stage and plan["world_size"] == 2
    ds_config = json.loads((out / "ds_config.json").read_text())
    assert ds_config["zero_optimization"]["stage"] == stage
    rows = read_metrics(out)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert {"lr", "samples_per_s", "loss/clip", "logit_scale"} <= set(next(r for r in rows if "loss" in r))
    assert any("zeroshot_top1" in r and "retrieval_i2t_r1" in r for r in rows)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000006"
    scalars = tensorboard_scalars(out)
    assert scalars["train/loss"] == pytest.approx(losses)  # TensorBoard's sections (engine/observe/metrics.py)
    assert {"train/loss/clip", "train/lr", "train/logit_scale", "perf/samples_per_s",
            "eval/heldout/zeroshot_top1"} <= set(scalars)


def _losses_by_step(run_dir):
    last = {}
    for row in read_metrics(run_dir):
        if "loss" in row:
            last[row["step"]] = row["loss"]  # a resumed run appends: the later line wins
    return last


def test_resume_continues_the_same_data_and_loss(tmp_path, cache_env):
    common = ["--steps", "40", "--global-batch", "32", "--log-every", "1",
              "--checkpoint-every", "20", "--eval-every", "40", "--seed", "3"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    check(launch([*common, "--out", str(whole)], cache_env, ranks=2))
    # The split run also logs to W&B, offline: both halves into one W&B run. wandb's own logs
    # and settings stay in tmp_path, out of the home directory.
    wandb = ["--wandb", "clipzero-tests"]
    wandb_env = {**cache_env, "WANDB_MODE": "offline", **{f"WANDB_{name}_DIR": str(tmp_path / "wandb-home")
                                                          for name in ("CACHE", "CONFIG", "DATA")}}
    check(launch([*common, *wandb, "--out", str(split), "--stop-at-step", "20"], wandb_env, ranks=2))
    assert (split / "checkpoints" / "latest").read_text().strip() == "step00000020"
    resumed = launch([*common, *wandb, "--out", str(split)], wandb_env, ranks=2)
    check(resumed)
    assert "resuming from step 20" in resumed.stdout

    a, b = _losses_by_step(whole), _losses_by_step(split)
    assert sorted(a) == sorted(b) == list(range(1, 41))
    for step in range(1, 41):
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])
    # The loader's position (which samples come next, per rank) is the same at both checkpoints.
    for tag in ("step00000020", "step00000040"):
        for rank in (0, 1):
            state_a = torch.load(whole / "checkpoints" / tag / f"rank{rank}.pt", weights_only=False)
            state_b = torch.load(split / "checkpoints" / tag / f"rank{rank}.pt", weights_only=False)
            assert state_a["state"]["loader"] == state_b["state"]["loader"]
    _check_wandb_copy(split, project="clipzero-tests")


def _check_wandb_copy(run_dir, project):
    """W&B holds what metrics.jsonl holds: each step's scalars, under the same names, in one W&B
    run that the resumed half continued from the step after its checkpoint; the plan as config."""
    first, resumed = offline_runs(run_dir)
    assert first.run_id == resumed.run_id == (run_dir / "wandb_run_id").read_text().strip()
    assert first.project == resumed.project == project
    assert sorted(first.history) == list(range(1, 21)) and sorted(resumed.history) == list(range(21, 41))
    scalars = {}
    for row in read_metrics(run_dir):
        if "kind" not in row:
            scalars.setdefault(row.pop("step"), {}).update(row)
    assert {**first.history, **resumed.history} == scalars
    plan = json.loads((run_dir / "plan.json").read_text())   # the resumed half's
    assert resumed.config == plan and plan["wandb_project"] == project
    launch_specific = ("rendezvous", "decisions")   # each half's port, and the reasons that name it
    assert {k: v for k, v in first.config.items() if k not in launch_specific} == \
        {k: v for k, v in plan.items() if k not in launch_specific}


def test_accumulated_clip_keeps_the_global_batch_loss(tmp_path, cache_env):
    # 32 pairs as 4 micro-batches of 8 on one rank: the embeddings are cached and the loss spans
    # all 32 (tests/unit/test_gradcache.py checks the gradients equal one 32-pair step's).
    out = tmp_path / "gradcache"
    check(launch(["--steps", "3", "--global-batch", "32", "--micro-batch", "8", "--log-every", "1",
                  "--eval-every", "100", "--out", str(out)], cache_env))
    plan = json.loads((out / "plan.json").read_text())
    assert (plan["grad_accum"], plan["accumulation"]) == (4, "gradcache")
    rows = [r for r in read_metrics(out) if "loss" in r]
    assert len(rows) == 3 and all(torch.isfinite(torch.tensor([r["loss"] for r in rows])))
    assert all(r["loss"] == pytest.approx(r["loss/clip"]) for r in rows)
