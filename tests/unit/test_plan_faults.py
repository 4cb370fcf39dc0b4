"""The planner's fault decisions (engine/plan/faults.py): where the ranks meet, the collective
timeout, the requeue cap and the non-finite steps allowed in a row, each with its reason."""
import dataclasses

import pytest

from engine.errors import UserError
from engine.launcher_env import from_environment
from engine.plan.dials import Dials
from engine.plan.resolve import resolve
from engine.objectives.method import lookup
from tests.unit.test_launch import SRUN_2X4
from tests.unit.test_plan import CPU_ONLY, H100_X8, NO_FUSED, V100_X1, plan_for, reason


def test_defaults_and_their_reasons():
    plan = plan_for(CPU_ONLY)
    assert (plan.rendezvous, plan.collective_timeout_s, plan.max_requeues, plan.max_skipped_in_a_row) == (
        "none", 300, 10, 5)
    assert "300 s" in reason(plan, "collective_timeout_s")


def test_the_timeout_grows_with_the_checkpoint():
    small = plan_for(H100_X8, n_params=150_000_000)
    huge = plan_for(H100_X8, n_params=3_000_000_000)  # 48 GB of states: 3 x 480 s at 100 MB/s
    assert small.collective_timeout_s == 300
    assert huge.collective_timeout_s == 1440 and "3x writing the 48 GB checkpoint" in reason(huge, "collective_timeout_s")


def test_fp16_allows_its_loss_scale_search():
    plan = plan_for(V100_X1)
    assert plan.precision == "fp16" and plan.max_skipped_in_a_row == 5 + 32
    assert "loss scale" in reason(plan, "max_skipped_in_a_row")


@pytest.mark.parametrize("dials, fix", [(dict(collective_timeout=5), "--collective-timeout"),
                                        (dict(max_requeues=-1), "--max-requeues")])
def test_bad_fault_dials_are_refused(dials, fix):
    with pytest.raises(UserError, match=fix):
        plan_for(CPU_ONLY, **dials)


def test_given_values_win():
    plan = plan_for(CPU_ONLY, collective_timeout=45, max_requeues=0)
    assert (plan.collective_timeout_s, plan.max_requeues) == (45, 0)
    assert reason(plan, "collective_timeout_s") == "--collective-timeout given"


def test_an_srun_launch_states_its_rendezvous_and_requeues():
    launch = from_environment(SRUN_2X4)
    hw = dataclasses.replace(CPU_ONLY, world_size=8, local_world_size=4, nodes=2,
                             ranks_from=launch.describe_ranks())
    plan = resolve(Dials(model="debug", global_batch=128), hw, lookup("clip", "debug"), n_params=500_000,
                   dataset_size=1_500, optimizer_support=NO_FUSED, image_size=32, launch=launch)
    assert plan.rendezvous == "gpu017:18456"
    assert reason(plan, "world_size") == ("2 node(s) x 4 rank(s) per node, from srun (SLURM_STEP_NUM_TASKS, "
                                          "SLURM_STEP_TASKS_PER_NODE, SLURM_STEP_NUM_NODES)")
    assert "SLURM job 123456 has been requeued 2 time(s)" in reason(plan, "max_requeues")
