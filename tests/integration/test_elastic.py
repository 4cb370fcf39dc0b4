"""The same --out resumes on another number of ranks with the same global batch: the states are
resharded, the micro-batch is re-planned, the epoch goes on with every remaining sample seen
exactly once (the very samples of each step that an uninterrupted run sees), and the loss
continues where it left off. (Exactly equal losses are not expected: the debug towers'
BatchNorm normalises over each rank's share of the batch, which the number of ranks changes.)"""
import json

import pytest

from launching import REFERENCE_DIALS, check, launch, losses, samples_by_step

GLOBAL_BATCH, STOP = 32, 6


def _resume_on_another_world(tmp_path, cache_env, first: int | None, then: int | None, extra=()):
    """First `first` ranks (None: one plain process) to step STOP, then `then` ranks to the end,
    both logging their samples; returns (run dir, the second run's output)."""
    out = tmp_path / "run"
    env = {**cache_env, "CLIPZERO_SAMPLE_LOG": str(out / "samples")}
    check(launch([*REFERENCE_DIALS, *extra, "--stop-at-step", str(STOP), "--out", str(out)], env, ranks=first))
    plan_before = json.loads((out / "plan.json").read_text())
    second = launch([*REFERENCE_DIALS, *extra, "--out", str(out)], env, ranks=then)
    check(second)
    plan_after = json.loads((out / "plan.json").read_text())
    assert plan_before["world_size"] == (first or 1) and plan_after["world_size"] == (then or 1)
    assert plan_after["micro_batch"] == GLOBAL_BATCH // plan_after["world_size"]  # re-planned
    assert f"resuming from step {STOP} " in second.stdout
    assert "resuming on another layout" in second.stdout and "resharding" in second.stdout
    return out


def _check_samples_and_losses(out, sample_reference, loss_reference) -> None:
    """Samples: each step took the very samples of the uninterrupted 2-rank run's step, none
    twice. Losses: equal to an uninterrupted run on the first number of ranks up to the stop,
    then within a few percent of it (BatchNorm over other shares of the batch)."""
    got, want = (samples_by_step(out / "samples", GLOBAL_BATCH),
                 samples_by_step(sample_reference / "samples", GLOBAL_BATCH))
    seen = [i for ids in got.values() for i in ids]
    assert len(seen) == len(set(seen)) == 16 * GLOBAL_BATCH  # no sample twice within the epoch
    assert sorted(got) == sorted(want)
    for step in want:
        assert sorted(got[step]) == sorted(want[step]), f"step {step} took other samples"
    got_losses, want_losses = losses(out), losses(loss_reference)
    assert sorted(got_losses) == sorted(want_losses) == list(range(1, 17))
    for step, loss in want_losses.items():
        tolerance = 1e-5 if step <= STOP else 0.03
        assert got_losses[step] == pytest.approx(loss, rel=tolerance), f"step {step}"


@pytest.fixture(scope="module")
def one_rank_zero3_reference(tmp_path_factory, cache_env):
    out = tmp_path_factory.mktemp("elastic") / "one-rank"
    check(launch([*REFERENCE_DIALS, "--zero-stage", "3", "--out", str(out)], cache_env))
    return out


def test_two_ranks_resume_on_one(tmp_path, cache_env, two_rank_reference):
    out = _resume_on_another_world(tmp_path, cache_env, first=2, then=None)
    _check_samples_and_losses(out, two_rank_reference, two_rank_reference)


def test_one_rank_resumes_on_two_at_zero_stage_3(tmp_path, cache_env, two_rank_reference,
                                                  one_rank_zero3_reference):
    out = _resume_on_another_world(tmp_path, cache_env, first=None, then=2, extra=["--zero-stage", "3"])
    _check_samples_and_losses(out, two_rank_reference, one_rank_zero3_reference)
