"""Part of the planner: where the ranks meet, how long one waits for another, how often a
preempted SLURM job comes back, and how many non-finite steps in a row end a run.

The collective timeout is what ends a job whose rank died without a word (a lost node, a
hung driver): every other rank fails its next collective after that long. It must outlast
the longest wait a healthy job has, which is the barrier after a checkpoint write (every
rank waits for the slowest writer), so it grows with the model's states.
"""
import math

from engine.errors import UserError
from engine.launcher_env import Launch
from engine.plan.memory import GB

MIN_TIMEOUT_S = 300
# Bytes a checkpoint holds per parameter with AdamW: fp32 weights, two moments, and the
# low-precision copy DeepSpeed saves beside them under bf16/fp16, rounded up.
CHECKPOINT_BYTES_PER_PARAM = 16
SLOW_FILESYSTEM_BYTES_PER_S = 100e6  # a busy shared filesystem, per writer
DEFAULT_MAX_REQUEUES = 10
# Optimizer steps skipped in a row (non-finite loss or gradient) before the run stops. Under
# fp16, dynamic loss scaling overflows on purpose while it finds its scale: it starts at
# 2^initial_scale_power and halves after `hysteresis` overflows, so allow for that too.
MAX_SKIPPED_IN_A_ROW = 5


def fault_decisions(dials, launch: Launch | None, n_params: int, precision: str,
                    fp16_scale_search_steps: int) -> list[tuple[str, object, str]]:
    """(name, value, reason) of rendezvous, collective_timeout_s, max_requeues and
    max_skipped_in_a_row."""
    return [_rendezvous(launch), _collective_timeout(dials.collective_timeout, n_params),
            _max_requeues(dials.max_requeues, launch),
            _max_skipped(precision, fp16_scale_search_steps)]


def _max_skipped(precision: str, fp16_scale_search_steps: int) -> tuple[str, int, str]:
    if precision != "fp16":
        return "max_skipped_in_a_row", MAX_SKIPPED_IN_A_ROW, (
            "non-finite loss or gradient: each such step is skipped; this many in a row stop the run")
    return "max_skipped_in_a_row", MAX_SKIPPED_IN_A_ROW + fp16_scale_search_steps, (
        f"{MAX_SKIPPED_IN_A_ROW}, plus the {fp16_scale_search_steps} overflows fp16's loss scale "
        "may take to come down from its start")


def _rendezvous(launch: Launch | None) -> tuple[str, str, str]:
    if launch is None or launch.world_size == 1:
        return "rendezvous", "none", "one rank: nothing to meet"
    return "rendezvous", f"{launch.master_addr}:{launch.master_port}", launch.describe_rendezvous()


def _collective_timeout(given: int | None, n_params: int) -> tuple[str, int, str]:
    if given is not None:
        if given < 10:
            raise UserError(f"--collective-timeout {given} is too short for a rank to reach the "
                            "next collective: give at least 10 seconds")
        return "collective_timeout_s", given, "--collective-timeout given"
    checkpoint_bytes = n_params * CHECKPOINT_BYTES_PER_PARAM
    write_s = checkpoint_bytes / SLOW_FILESYSTEM_BYTES_PER_S
    timeout = max(MIN_TIMEOUT_S, math.ceil(3 * write_s))
    return "collective_timeout_s", timeout, (
        f"a rank silent this long ends the job: {MIN_TIMEOUT_S} s, or 3x writing the "
        f"{checkpoint_bytes / GB:.2g} GB checkpoint at 100 MB/s if longer")


def _max_requeues(given: int | None, launch: Launch | None) -> tuple[str, int, str]:
    if given is not None:
        if given < 0:
            raise UserError(f"--max-requeues {given} must be 0 (never requeue) or more")
        value, reason = given, "--max-requeues given"
    else:
        value, reason = DEFAULT_MAX_REQUEUES, "a job signalled more often stops with its checkpoint"
    if launch is not None and launch.job_id is not None:
        reason += f"; SLURM job {launch.job_id} has been requeued {launch.restarts} time(s)"
    return "max_requeues", value, reason
