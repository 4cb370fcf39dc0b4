"""Resuming a run directory with dials that would misread its checkpoint is refused up front."""
import dataclasses
import json

import pytest

from engine.errors import UserError
from engine.objectives.method import lookup
from engine.plan.dials import Dials
from engine.plan.resolve import resolve
from engine.plan.resume import check_resumable, continue_sample_order, describe_reshape
from tests.unit.test_plan import CPU_ONLY, NO_FUSED, plan_for
from tests.unit.test_plan_data import GB, _facts, _stream


def resumable(run_dir, plan):
    return check_resumable(run_dir, plan, lookup(plan.method, plan.model))


def _run_dir_with_checkpoint(tmp_path, plan):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step00000020")
    (tmp_path / "plan.json").write_text(json.dumps(plan.to_dict()))
    return tmp_path


def test_same_dials_resume(tmp_path):
    plan = plan_for(CPU_ONLY, global_batch=64)
    resumable(_run_dir_with_checkpoint(tmp_path, plan), plan_for(CPU_ONLY, global_batch=64))


@pytest.mark.parametrize("changed", [dict(global_batch=32), dict(seed=1), dict(steps=50)])
def test_changed_dials_name_the_value_and_the_way_out(tmp_path, changed):
    run_dir = _run_dir_with_checkpoint(tmp_path, plan_for(CPU_ONLY, global_batch=64, steps=40))
    dials = dict(global_batch=64, steps=40) | changed
    with pytest.raises(UserError, match="new --out"):
        resumable(run_dir, plan_for(CPU_ONLY, **dials))


def test_a_directory_without_checkpoint_starts_afresh(tmp_path):
    (tmp_path / "plan.json").write_text(json.dumps(plan_for(CPU_ONLY, global_batch=64).to_dict()))
    resumable(tmp_path, plan_for(CPU_ONLY, global_batch=32))


def test_another_number_of_ranks_or_split_of_the_same_global_batch_resumes(tmp_path):
    two_ranks = dataclasses.replace(CPU_ONLY, world_size=2, local_world_size=2)
    saved = plan_for(two_ranks, global_batch=64)
    run_dir = _run_dir_with_checkpoint(tmp_path, saved)
    one_rank = plan_for(CPU_ONLY, global_batch=64)
    assert resumable(run_dir, one_rank)["world_size"] == 2
    assert "2 rank(s) x micro-batch 32 x 1 accumulated, this one 1 x 64 x 1" in describe_reshape(saved.to_dict(), one_rank)
    # GradCache over 4 micro-batches train the same loss as one micro-batch of 64.
    resumable(run_dir, plan_for(CPU_ONLY, global_batch=64, micro_batch=16))
    assert describe_reshape(saved.to_dict(), saved) is None


def test_plain_accumulation_cannot_take_over_a_whole_batch_run(tmp_path):
    run_dir = _run_dir_with_checkpoint(tmp_path, plan_for(CPU_ONLY, global_batch=64))
    with pytest.raises(UserError, match="--accumulation plain"):
        resumable(run_dir, plan_for(CPU_ONLY, global_batch=64, micro_batch=16, accumulation="plain"))


def _changed(value):
    if isinstance(value, bool) or value is None:
        return "changed"
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "-changed"
    if isinstance(value, dict):
        return {**value, "queue_size": 1} if value else {"changed": 1}
    if value and all(isinstance(row, list) for row in value):   # e.g. data_streams: (path, proportion, samples)
        return [[*row[:-1], row[-1] + 1] for row in value]
    return [*value, "changed"]


def test_a_saved_plan_differing_in_a_marked_field_is_refused_and_in_another_is_not(tmp_path):
    plan = plan_for(CPU_ONLY, global_batch=64, method="declip")
    marked = [f.name for f in dataclasses.fields(plan) if "resume" in f.metadata]
    assert {"method", "seed", "global_batch", "total_steps", "dataset_size", "objective_options"} <= set(marked)
    for field in dataclasses.fields(plan):
        if field.name in ("decisions", "accumulation", "grad_accum"):   # the span of a step's loss: tested above
            continue
        saved = plan.to_dict()
        saved[field.name] = _changed(saved[field.name])
        (tmp_path / field.name).mkdir()
        run_dir = _run_dir_with_checkpoint(tmp_path / field.name, plan)
        (run_dir / "plan.json").write_text(json.dumps(saved))
        if field.name in marked:
            with pytest.raises(UserError, match="new --out"):
                resumable(run_dir, plan)
        else:
            assert resumable(run_dir, plan)[field.name] == saved[field.name]


# ---- the sample order: canonical nodes ------------------------------------------------------------------------------

def _remote_plan(nodes: int):
    """A plan on `nodes` nodes of one rank each, of remote data (its canonical nodes: `nodes`)."""
    facts = _facts(_stream("s3://bucket/pairs", shards=2), free=100 * GB)
    hw = dataclasses.replace(CPU_ONLY, world_size=nodes, nodes=nodes)
    return resolve(Dials(model="debug", data="s3://bucket/pairs", global_batch=120), hw, lookup("clip", "debug"),
                   n_params=500_000, dataset_size=facts.epoch_size, optimizer_support=NO_FUSED, image_size=32,
                   data=facts)


def _continued(run_dir, plan):
    return continue_sample_order(run_dir, resumable(run_dir, plan), plan)


def test_a_resume_keeps_the_canonical_nodes_on_the_node_counts_that_keep_its_order(tmp_path):
    run_dir = _run_dir_with_checkpoint(tmp_path, _remote_plan(4))
    assert _continued(run_dir, _remote_plan(4)) == _remote_plan(4)
    for nodes, share in ((2, "1/2 of them"), (1, "all of the shards"), (8, "1/4 of them")):
        plan = _continued(run_dir, _remote_plan(nodes))
        assert plan.canonical_nodes == 4 and plan.loader_settings().canonical_nodes == 4
        row = next(d for d in plan.decisions if d.name == "canonical_nodes")
        assert row.value == 4 and f"exact on {nodes} node(s)" in row.reason and share in row.reason
        assert f"(a new --out would plan {nodes})" in row.reason and "| 4 " in plan.table()
    for nodes in (3, 6):
        with pytest.raises(UserError, match=rf"set for 4 canonical nodes .* {nodes} nodes cannot take that order: "
                                            r"resume on 1, 2, 4 or a multiple of 4 \(8, 12, \.\.\.\) nodes, or "
                                            r"choose a new --out"):
            _continued(run_dir, _remote_plan(nodes))


def test_runs_planned_with_one_canonical_node_resume_on_any_node_count_as_before(tmp_path):
    saved = _remote_plan(1).to_dict()
    assert saved["canonical_nodes"] == 1
    run_dir = _run_dir_with_checkpoint(tmp_path, _remote_plan(1))
    older = tmp_path / "older"  # a plan.json written before the row existed: one canonical node
    older.mkdir()
    _run_dir_with_checkpoint(older, _remote_plan(1))
    (older / "plan.json").write_text(json.dumps({k: v for k, v in saved.items() if k != "canonical_nodes"}))
    for directory in (run_dir, older):
        for nodes in (2, 3, 5):
            plan = _continued(directory, _remote_plan(nodes))
            assert plan.canonical_nodes == 1 and "each node reads all of the shards" in plan.table()
    assert continue_sample_order(run_dir, None, _remote_plan(3)).canonical_nodes == 3  # nothing to resume


def test_the_run_prints_and_records_the_kept_count_and_refuses_before_any_work(tmp_path, digits, capsys):
    """What training_run does with the rule: a dry run (no process group, no engine) resuming a run
    directory whose plan.json holds two canonical nodes."""
    from engine.launcher_env import Launch
    from engine.training_run import _run, prepare

    def dry_run(nodes):
        launch = Launch("srun", rank=0, local_rank=0, world_size=nodes, ranks_per_node=1, nodes=nodes,
                        master_addr="127.0.0.1", master_port=None)
        prepared = prepare(Dials(data=str(digits.train), global_batch=48, steps=20), None, launch)
        _run(prepared, None, out=str(tmp_path), dry_run=True, stop_at_step=None)
        return json.loads((tmp_path / "plan.json").read_text())

    saved = dry_run(2)
    (tmp_path / "plan.json").write_text(json.dumps({**saved, "canonical_nodes": 2}))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step00000010")
    with pytest.raises(UserError, match=r"3 nodes cannot take that order: resume on 1, 2 or a multiple of 2"):
        dry_run(3)
    capsys.readouterr()
    assert dry_run(4)["canonical_nodes"] == 2
    assert "kept from the run this one resumes, whose sample order it sets: exact on 4 node(s)" in capsys.readouterr().out
