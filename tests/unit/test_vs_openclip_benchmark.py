"""benchmarks/vs_openclip.py's settings of ours: each --ours variant's dials parsed by the dials'
own kinds and carried into the plan that variant runs, so that a lever measured on and off is
the planner's decision with one dial changed."""
import pytest

from benchmarks import vs_openclip as bench


def test_a_label_alone_is_the_plans_own_choices():
    assert bench.parse_variant("plan") == ("plan", {})


def test_dials_are_parsed_by_their_declared_kinds():
    label, overrides = bench.parse_variant("zero1-foreach:zero_stage=1,optimizer=torch")
    assert label == "zero1-foreach" and overrides == {"zero_stage": 1, "optimizer": "torch"}


@pytest.mark.parametrize("text", ["x:stage=1", "x:zero_stage", "x:zero_stage="])
def test_an_unknown_dial_or_a_missing_value_is_refused(text):
    with pytest.raises(SystemExit, match="is not dial=value"):
        bench.parse_variant(text)


def test_the_overrides_reach_the_plan():
    plain, _, _ = bench.plan_for("vit-debug", 8, 1, None)
    changed, _, _ = bench.plan_for("vit-debug", 8, 1, None, {"zero_stage": 1, "optimizer": "torch"})
    assert (changed.zero_stage, changed.optimizer) == (1, "torch")
    assert (plain.zero_stage, plain.optimizer) != (1, "torch")  # one CPU rank: no ZeRO, fused AdamW


def test_the_one_rank_all_reduce_switch_is_the_benchmarks_own():
    assert bench.parse_variant("reduce:keep_one_rank_allreduce=true,zero_stage=0")[1] == {
        bench.ONE_RANK_ALLREDUCE: True, "zero_stage": 0}


def test_flops_counted_on_the_meta_device_are_those_the_committed_run_counted_on_real_weights():
    """forward_flops builds both sides on the meta device (ViT-H/14 is never allocated to be
    counted); the committed CPU run counted the same towers with real weights on the CPU."""
    import json
    from pathlib import Path

    pytest.importorskip("open_clip")
    rows = json.loads((Path(bench.ROOT) / "benchmarks/results/vs_openclip_cpu.json").read_text())["rows"]
    for row in rows:
        assert bench.forward_flops(row["case"].split(":")[0]) == row["forward_flops_per_sample"], row["case"]


def test_every_preset_of_the_map_builds_on_the_meta_device():
    for preset in bench.OPEN_CLIP_MODEL:
        model = bench.build_open_clip(preset, device="meta")
        assert all(p.is_meta for p in model.parameters()), preset
