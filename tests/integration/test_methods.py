"""DeCLIP and CLIP-Lite through the real launcher: every term logged, ZeRO stages, resume.

ZeRO-1 with one rank is covered by the resume test; SGD + Lookahead (CLIP-Lite's paper recipe,
not its smoke run) at every ZeRO stage by tests/unit/test_lookahead.py (through DeepSpeed,
without the launcher)."""
import json

import pytest
import torch

from launching import check, launch, read_metrics, tensorboard_scalars

# 8 pairs per rank as 2 micro-batches: GradCache accumulation.
SHORT = ["--steps", "4", "--global-batch", "16", "--micro-batch", "4", "--log-every", "1",
         "--eval-every", "4"]
TERMS = {"declip": ("loss/clip", "loss/simsiam", "loss/mlm", "loss/nn"),
         "clip-lite": ("loss/jsd", "loss/prior")}


@pytest.mark.parametrize("method, stage, extra", [
    ("declip", 3, []),
    ("clip-lite", 2, ["--negatives", "global", "--prior", "adversarial"]),
])
def test_two_ranks_log_every_term(method, stage, extra, tmp_path, cache_env):
    out = tmp_path / f"{method}-zero{stage}"
    check(launch([*SHORT, "--method", method, "--zero-stage", str(stage), *extra, "--out", str(out)],
                 cache_env, ranks=2))
    plan = json.loads((out / "plan.json").read_text())
    assert (plan["method"], plan["zero_stage"], plan["world_size"]) == (method, stage, 2)
    assert (plan["grad_accum"], plan["accumulation"]) == (2, "gradcache")
    rows = [r for r in read_metrics(out) if "loss" in r]
    assert len(rows) == 4
    for row in rows:
        terms = torch.tensor([row[name] for name in TERMS[method]])
        assert torch.isfinite(terms).all(), row
    scalars = tensorboard_scalars(out)
    assert {f"train/{term}" for term in TERMS[method]} <= set(scalars) and "eval/heldout/zeroshot_top1" in scalars
    assert "perf/tflops_per_s" in scalars and "perf/mfu" not in scalars  # no peak known for a CPU
    if method == "clip-lite":  # the smoke recipe trains with AdamW (engine/objectives/clip_lite.py)
        assert plan["optimizer"] == "torch_fused" and plan["group_lrs"] == []
    _check_charts(out, image_views=2 if method == "declip" else 1, micro_batch=4)


def _check_charts(out, image_views, micro_batch):
    """Beyond scalars (engine/observe/charts.py): the plan, the first batch's views, and at the
    evaluation (step 4, every rank running the probe's forwards under ZeRO) the held-out heatmap
    and embedding norms; the logit scale at every log."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    from engine.observe.visuals import CELL, GAP, HEATMAP_CELL

    events = ea.EventAccumulator(str(out / "tensorboard"), size_guidance={ea.IMAGES: 0, ea.HISTOGRAMS: 0,
                                                                          ea.TENSORS: 0})
    events.Reload()
    [plan] = [e.tensor_proto.string_val[0].decode() for e in events.Tensors("plan/text_summary")]
    assert "zero_stage" in plan and "model FLOPs per training sample" in plan
    [views] = events.Images("train/views")
    assert (views.step, views.width, views.height) == (
        1, image_views * CELL + (image_views + 1) * GAP, micro_batch * CELL + (micro_batch + 1) * GAP)
    [heatmap] = events.Images("eval/heldout/similarity")  # "heldout/similarity" in metrics.jsonl
    assert (heatmap.step, heatmap.width, heatmap.height) == (4, 16 * HEATMAP_CELL, 16 * HEATMAP_CELL)
    for tag in ("eval/heldout/image_embedding_norm", "eval/heldout/text_embedding_norm"):
        assert [(e.step, e.histogram_value.num) for e in events.Histograms(tag)] == [(4, 16)]
    assert [e.step for e in events.Histograms("train/logit_scale")] == [1, 2, 3, 4]
    [record] = [r for r in read_metrics(out) if r.get("tag") == "train/views"]
    assert len(record["samples"]) == micro_batch and (out / record["path"]).is_file()
    assert all(("text_aug" in sample) == (image_views == 2) for sample in record["samples"])


def _rows_by_step(run_dir):
    last = {}
    for row in read_metrics(run_dir):
        if "loss" in row:
            last[row["step"]] = row  # a resumed run appends: the later line wins
    return last


def test_declip_resume_restores_the_queue_and_continues_exactly(tmp_path, cache_env):
    # Two micro-batches per step: the queue is filled once per step, from the embeddings GradCache keeps.
    common = ["--method", "declip", "--steps", "6", "--global-batch", "16", "--micro-batch", "8",
              "--log-every", "1",
              "--checkpoint-every", "3", "--eval-every", "6", "--queue-size", "40", "--seed", "5"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    check(launch([*common, "--out", str(whole)], cache_env, ranks=1))
    check(launch([*common, "--out", str(split), "--stop-at-step", "3"], cache_env, ranks=1))
    resumed = launch([*common, "--out", str(split)], cache_env, ranks=1)
    check(resumed)
    assert "resuming from step 3" in resumed.stdout
    a, b = _rows_by_step(whole), _rows_by_step(split)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    # The nn term reads the queue: a queue lost or reset at the restart would change it.
    for step in range(1, 7):
        for name in ("loss", *TERMS["declip"]):
            assert abs(a[step][name] - b[step][name]) < 1e-5, (step, name, a[step][name], b[step][name])
    saved = torch.load(split / "checkpoints" / "step00000006" / "rank0.pt", weights_only=False)
    queue = saved["state"]["task"]["queue"]
    assert queue.shape[0] == 40 and torch.allclose(queue.norm(dim=1), torch.ones(40), atol=1e-5)
