"""Resuming a run directory with dials that would misread its checkpoint is refused up front."""
import dataclasses
import json

import pytest

from engine.errors import UserError
from engine.objectives.method import lookup
from engine.plan.resume import check_resumable, describe_reshape
from tests.unit.test_plan import CPU_ONLY, plan_for


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
