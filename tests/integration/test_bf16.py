"""bf16 on the CPU through the real launcher (DeepSpeed's bf16 mode, its CPU accelerator, gloo):
every method trains at a ZeRO stage of its own, with and without GradCache, and writes DeepSpeed's
bf16 checkpoint layout (without ZeRO: fp32 weights under autocast, an fp32 checkpoint); a rank killed with SIGKILL and the same command again end at the losses of
a run that was never killed. Resharding bf16 states is tests/unit/test_reshard.py's."""
import json
import subprocess

import pytest
import torch

from engine.dist import free_port
from engine.train.reshard import saved_weight_dtype
from launching import (REFERENCE_DIALS, ROOT, check, command, launch, losses, rank_process, read_metrics,
                       tensorboard_scalars, wait_for)

# (method, ZeRO stage, micro-batch of the 8 pairs per rank: 4 is GradCache over 2 micro-batches).
# Stage 0 is fp32 weights with the towers under bf16 autocast (engine/plan/precision.py).
CASES = [("clip", 1, 4), ("declip", 3, 4), ("clip-lite", 2, 8), ("siglip", 0, 4)]


@pytest.mark.parametrize("method, stage, micro", CASES, ids=[f"{m}-zero{s}" for m, s, _ in CASES])
def test_every_method_trains_in_bf16(method, stage, micro, tmp_path, cache_env):
    out = tmp_path / "run"
    check(launch(["--method", method, "--precision", "bf16", "--zero-stage", str(stage), "--micro-batch", str(micro),
                  "--steps", "4", "--global-batch", "16", "--log-every", "1", "--eval-every", "4",
                  "--out", str(out)], cache_env, ranks=2))
    plan = json.loads((out / "plan.json").read_text())
    assert (plan["precision"], plan["zero_stage"], plan["accumulation"]) == (
        "bf16", stage, "gradcache" if micro == 4 else "plain")
    assert plan["grad_dtype"] == "fp32"
    assert plan["loss_input_dtype"] == ("fp32" if stage == 0 else "bf16")
    ds_config = json.loads((out / "ds_config.json").read_text())
    if stage:   # DeepSpeed's bf16 mode, gradients accumulated and reduced in fp32
        assert ds_config["bf16"] == {"enabled": True}
        assert ds_config["data_types"] == {"grad_accum_dtype": "fp32"} and ds_config["communication_data_type"] == "fp32"
    else:       # an fp32 engine: the towers cast under autocast themselves
        assert not {"bf16", "data_types", "communication_data_type"} & set(ds_config)
    rows = [r for r in read_metrics(out) if "loss" in r]
    assert len(rows) == 4 and torch.isfinite(torch.tensor([r["loss"] for r in rows])).all()
    assert all(r["skipped_steps"] == 0 for r in rows)
    assert "eval/heldout/zeroshot_top1" in tensorboard_scalars(out)
    saved = out / "checkpoints" / "step00000004"
    shards = sorted(p.name for p in saved.glob("*optim_states.pt"))
    assert shards == ([] if stage == 0 else [f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)])
    assert saved_weight_dtype(saved) == (torch.float32 if stage == 0 else torch.bfloat16)


BF16_DIALS = [*REFERENCE_DIALS, "--precision", "bf16", "--collective-timeout", "30"]


def test_kill_9_and_the_same_command_end_at_the_uninterrupted_losses(tmp_path, cache_env):
    whole = tmp_path / "whole"
    check(launch([*BF16_DIALS, "--out", str(whole)], cache_env, ranks=2))
    out, port, log = tmp_path / "killed", free_port(), tmp_path / "first.log"
    job = subprocess.Popen(command([*BF16_DIALS, "--out", str(out)], ranks=2, port=port, launcher="deepspeed"),
                           cwd=ROOT, env=cache_env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    wait_for(lambda: (out / "metrics.jsonl").exists() and len(losses(out)) >= 6, 180, "six steps", log)
    rank_process(out, 1).kill()
    assert job.wait(timeout=90) != 0
    resumed = launch([*BF16_DIALS, "--out", str(out)], cache_env, ranks=2, port=port, launcher="deepspeed")
    check(resumed)
    assert "resuming from step 4 " in resumed.stdout, resumed.stdout[-3000:]
    expected, got = losses(whole), losses(out)
    assert sorted(got) == sorted(expected) == list(range(1, 17))
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), f"step {step}"
