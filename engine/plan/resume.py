"""Whether a run directory's checkpoint can continue under this command's plan.

The RunPlan fields a resumed run must share with the run it continues are marked where they
are declared (`must_match` in engine/plan/resolve.py); this module compares them against the
plan.json the run wrote, and refuses what the checkpoint cannot continue before any heavy work.
"""
import dataclasses
import json
from pathlib import Path
from typing import Callable

from engine.data.streams import CANONICAL_NODES, keeps_sample_order, node_counts_keeping_order
from engine.errors import UserError
from engine.objectives.method import Method


@dataclasses.dataclass(frozen=True)
class ResumeRule:
    """`seen(plan, method)` is the part of a plan (as plan.json holds it) that must be equal,
    shown as `label` (`method`: this command's, which the saved run must share); `hint(saved)`
    says which dials continue the saved run."""
    seen: Callable[[dict, Method], object]
    label: str | None = None
    hint: Callable[[dict], str] = lambda saved: "resume with the same dials"


def must_match(rule: ResumeRule | None = None) -> dataclasses.Field:
    """Marks a RunPlan field that a resumed run must share (by `rule`, else its whole value)."""
    return dataclasses.field(metadata={"resume": rule})


def _batch_semantics(plan: dict) -> str:
    """What one optimizer step's loss spans: the whole global batch (one micro-batch, or
    GradCache), or each micro-batch on its own (plain accumulation over k)."""
    if plan["grad_accum"] == 1 or plan["accumulation"] != "plain":
        return "the whole global batch"
    return f"each of {plan['grad_accum']} micro-batches on its own (--accumulation plain)"


same_batch_semantics = ResumeRule(
    lambda plan, method: _batch_semantics(plan), label="each step's loss over",
    hint=lambda saved: f"give --accumulation {saved['accumulation']} and --micro-batch {saved['micro_batch']}")

same_stream_shares = ResumeRule(
    lambda plan, method: [tuple(stream[1:]) for stream in plan.get("data_streams", [])],
    label="data drawn as (proportion, samples per epoch)", hint=lambda saved: "resume with the same --data weights")


def _dialled_options(plan: dict, method: Method) -> dict:
    # Only what the user dialled: a decision such as WordNet's presence may change between runs.
    # (The method itself must match too, so this command's declares the saved run's options.)
    return {name: value for name, value in (plan.get("objective_options") or {}).items()
            if name in method.dialled_options}


same_dialled_options = ResumeRule(_dialled_options, label="objective options")


def check_resumable(run_dir: Path, plan, method: Method) -> dict | None:
    """The saved plan of the run `run_dir` holds, when this command (`plan`, a RunPlan, of
    `method`) would resume it; refuses dials that the checkpoint cannot continue."""
    saved_path = run_dir / "plan.json"
    if not (run_dir / "checkpoints" / "latest").exists() or not saved_path.exists():
        return None
    saved, now = json.loads(saved_path.read_text()), plan.to_dict()
    for field in dataclasses.fields(plan):
        if "resume" not in field.metadata:
            continue
        rule = field.metadata["resume"] or ResumeRule(lambda p, method, name=field.name: p.get(name))
        before, after = rule.seen(saved, method), rule.seen(now, method)
        if before != after:
            label = rule.label or field.name
            raise UserError(f"{run_dir} holds a run with {label} {before!r} but this command gives "
                            f"{after!r}: {rule.hint(saved)}, or choose a new --out")
    return saved


def continue_sample_order(run_dir: Path, saved: dict | None, plan):
    """`plan` (a RunPlan), taking the canonical node count of the run it continues (`saved`, its
    plan.json), which sets the sample order. A node count that keeps that order (one that divides
    it or that it divides, engine/data/streams.py) resumes exactly; any other is refused, not run
    with another order: the steps already taken would then not be the first steps of the order
    the run goes on with, so samples would repeat and others be skipped within the epoch."""
    if saved is None:
        return plan
    kept = saved.get("canonical_nodes", CANONICAL_NODES)  # a plan.json without it was planned with one
    if kept == plan.canonical_nodes:
        return plan
    if not keeps_sample_order(kept, plan.nodes):
        raise UserError(
            f"{run_dir} holds a run whose sample order was set for {kept} canonical nodes (it began on {kept} "
            f"nodes of remote data) and {plan.nodes} nodes cannot take that order: resume on "
            f"{node_counts_keeping_order(kept, plan.nodes)} nodes, or choose a new --out")
    share = min(kept, plan.nodes)  # each node reads one group of the smaller count (streams.py)
    relation = "a divisor" if kept % plan.nodes == 0 else "a multiple"
    reason = (f"kept from the run this one resumes, whose sample order it sets: exact on {plan.nodes} node(s), "
              f"{relation} of {kept}; each node reads " + ("all of the shards" if share == 1 else f"1/{share} of them")
              + f" (a new --out would plan {plan.canonical_nodes})")
    decisions = tuple(dataclasses.replace(d, value=kept, reason=reason) if d.name == "canonical_nodes" else d
                      for d in plan.decisions)
    return dataclasses.replace(plan, canonical_nodes=kept, decisions=decisions)


def describe_reshape(saved: dict | None, plan) -> str | None:
    """A line for the log when this run resumes on another layout than the one it continues."""
    if saved is None:
        return None
    before = (saved["world_size"], saved["micro_batch"], saved["grad_accum"])
    after = (plan.world_size, plan.micro_batch, plan.grad_accum)
    if before == after:
        return None
    return (f"resuming on another layout: the checkpoint's run had {before[0]} rank(s) x micro-batch "
            f"{before[1]} x {before[2]} accumulated, this one {after[0]} x {after[1]} x {after[2]} "
            f"(re-planned for {plan.world_size} rank(s), see micro_batch and grad_accum above); "
            f"the global batch stays {plan.global_batch}")
