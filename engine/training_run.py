"""From dials to a trained, evaluated model: the data flow of the design, in order.

prepare()  everything that can fail on bad input, before any heavy work or any file written
run()      distributed setup, run directory, DeepSpeed engine, loader, loop, final eval
"""
import json
import logging
import os
import random
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import numpy as np
import torch

from engine import dist
from engine.data.embedded import ensure_digits
from engine.data.loader import TrainLoader
from engine.data.mds import cache_root
from engine.data.streams import DataFacts, data_facts
from engine.data.subset import ensure_subset
from engine.data.text import ClipTokenizer, strip_punctuation
from engine.plan.deepspeed_config import apply_overrides, render
from engine.errors import UserError
from engine.files import write_atomic
from engine.host_memory import keep_freed_memory
from engine.init_weights import InitSource, check_source, find_source, load_source
from engine.eval.periodic import (PeriodicEval, TrainedModel, held_out_set, open_periodic_evals,
                                  run_periodic_evals)
from engine.eval.shard import Ranks, first_rows
from engine.plan.hardware import probe
from engine.launcher_env import Launch
from engine.data.wordnet import find_wordnet
from engine.data.workers import temp_dir_problem
from engine.models.locking import count_trainable, lock, unlock_problem
from engine.models.towers import with_patch_dropout
from engine.models.two_tower import TwoTower, count_parameters
from engine.objectives.method import Method, lookup
from engine.observe.bad_records import BadRecordTally
from engine.observe.charts import PROBE_PAIRS, Charts, HeldOutProbe
from engine.observe.flops import count_model_flops, views_encoded
from engine.observe.hooks import LoopHooks, MetricsLog
from engine.observe.metrics import MetricsWriter
from engine.observe.profile import StepProfiler
from engine.observe.progress import Progress
from engine.observe.throughput import Throughput
from engine.observe.wandb_log import WandbLog, import_wandb
from engine.plan.dials import Dials
from engine.plan.disk import check_room
from engine.plan.optimizer import probe_optimizer_support
from engine.plan.precision import towers_autocast
from engine.plan.resolve import RunPlan, resolve
from engine.plan.start import StartFacts
from engine.plan.resume import check_resumable, continue_sample_order, describe_reshape
from engine.model_with_loss import ModelWithLoss, align_buffer_dtypes, register_zero3_external_parameters
from engine.store import ObjectStore, is_url
from engine.train import checkpoint
from engine.train.run_store import (StoreUpload, agree_on_checkpoint, pull_checkpoint, pull_run_files,
                                    push_unfinished_checkpoint)
from engine.train.drills import Drills
from engine.train.nonfinite import NonFiniteSteps
from engine.train.stop_signals import StopSignals, requeue
from engine.train.loop import Cadence, train
from engine.train.unmasked_tuning import UnmaskedTuning
from engine.train.step import make_step
from engine.train.optim import optimizer_for_plan
from engine.train.schedule import warmup_cosine


@dataclass(frozen=True)
class Prepared:
    plan: RunPlan
    ds_config: dict
    method: Method              # the one lookup of the method: objective, recipe, towers, data needs
    data: DataFacts             # --data (or its --data-fraction subset), checked once: the loader reads these
    eval_data: str | None
    launch: Launch | None
    evals: list[PeriodicEval]   # the held-out split, then the --eval sets, checked (engine/eval/periodic.py)
    wordnet: Path | None        # the WordNet planned with, for EDA's synonyms (None: none found or no EDA)
    init: InitSource | None     # --init, checked against the model's tensors


@dataclass(frozen=True)
class RunEnd:
    metrics: dict[str, float]  # the last evaluation's
    stopped_at: int | None     # a stop signal ended the run here, with a checkpoint
    requeued: bool             # ... and SLURM put the job back in the queue


def prepare(dials: Dials, eval_data: str | None, launch: Launch | None = None) -> Prepared:
    """Resolve the plan and the DeepSpeed config. Raises UserError; writes nothing.
    `launch` says how the ranks were started (engine/launcher_env.py; None: read the environment)."""
    if dials.wandb is not None:
        import_wandb()  # the optional extra, checked before any work
    method = lookup(dials.method, dials.model, dials.text_layers)
    preset = method.preset
    if dials.data is None:
        digits = ensure_digits()
        data, eval_data = str(digits.train), eval_data or str(digits.heldout)
    else:
        data = dials.data
    facts = data_facts(data, dials.seed)  # every dataset of a mixture checked, remote indexes fetched
    full_size = facts.epoch_size
    evals = open_periodic_evals(dials.evals, held_out=eval_data)
    if dials.data_fraction != 1.0:
        if len(facts.streams) > 1:
            raise UserError(f"--data-fraction takes one dataset and --data {data} is a mixture: its weights "
                            f"already set how much of each dataset an epoch draws; drop --data-fraction.")
        data = ensure_subset(data, dials.data_fraction, cache_root())
        facts = data_facts(data, dials.seed)
    dataset_size = facts.epoch_size
    tokenizer = ClipTokenizer(preset.context_length)
    init, start = _start_weights(dials, preset, tokenizer)
    hardware = probe(launch, try_gpu_decode=dials.decode_device != "cpu")
    wordnet = find_wordnet() if method.data.text_aug else None
    plan = resolve(dials, hardware, method,
                   n_params=count_parameters(preset, tokenizer.eot_id, tokenizer.sot_id),
                   dataset_size=dataset_size, full_dataset_size=full_size,
                   optimizer_support=probe_optimizer_support(hardware),
                   image_size=preset.image_size, text_layers=preset.text_layers,
                   wordnet=None if wordnet is None else str(wordnet), launch=launch, data=facts, start=start)
    ds_config = apply_overrides(render(plan), dials.ds, world_size=plan.world_size)
    if (problem := temp_dir_problem(plan.workers)) is not None:
        raise UserError(problem)
    if plan.staging_dir is not None:  # --out is a store folder: reachable, and ours to write
        with tempfile.TemporaryDirectory() as scratch:  # nothing staged yet
            ObjectStore(dials.out, Path(scratch)).check_writable()
    return Prepared(plan, ds_config, method, facts, eval_data, launch, evals, wordnet, init)


def _start_weights(dials: Dials, preset, tokenizer: ClipTokenizer) -> tuple[InitSource | None, StartFacts]:
    """--init's source, its every tensor checked against the model, and what --lock leaves to
    train: counted on the model built on the meta device (no memory)."""
    with torch.device("meta"):
        model = TwoTower(preset, tokenizer.eot_id, tokenizer.sot_id)
    init = None
    if dials.init is not None:
        init = find_source(dials.init)
        check_source(init, model, dials.model)
    if dials.lock is None or init is None or dials.lock not in init.towers:  # the plan refuses these
        return init, StartFacts(init and init.describe(), init.towers if init else ())
    if (problem := unlock_problem(model, dials.lock, dials.unlock_last)) is not None:
        raise UserError(problem)
    lock(model, dials.lock, dials.unlock_last)
    return init, StartFacts(init.describe(), init.towers, count_trainable(model))


def default_run_dir(plan: RunPlan, job_id: str | None) -> Path:
    """Keyed by the SLURM job when there is one, so that a requeued job finds its own run."""
    suffix = f"job{job_id}" if job_id else time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{plan.method}-{plan.model}-{suffix}"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run(prepared: Prepared, *, out: str | None, dry_run: bool, stop_at_step: int | None) -> RunEnd:
    plan = prepared.plan
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if torch.cuda.is_available():
        # Before any collective: NCCL's object broadcast and barriers use the current device.
        torch.cuda.set_device(dist.local_device())
    dist.init_distributed(plan.collective_timeout_s)
    stop = StopSignals(plan.collective_timeout_s)
    try:
        end = _run(prepared, stop, out=out, dry_run=dry_run, stop_at_step=stop_at_step)
    except (UserError, NonFiniteSteps):
        # Raised outside any collective (most on every rank together: a full disk, too many
        # non-finite steps, a refused resume): the launcher's exit status 2 or 4 must not become
        # gloo's abort at the exit.
        dist.close_distributed(wait_for_peers=False)
        raise
    finally:
        stop.close()
    dist.close_distributed()
    return end


def _run(prepared: Prepared, stop: StopSignals, *, out: str | None, dry_run: bool,
         stop_at_step: int | None) -> RunEnd:
    plan, method = prepared.plan, prepared.method
    preset = method.preset
    job_id = prepared.launch.job_id if prepared.launch is not None else None
    is_main = dist.rank() == 0
    store = None
    if out is not None and is_url(out):  # each node stages the run on its own disk
        run_dir = Path(plan.staging_dir)
        store = ObjectStore(out, run_dir)
        if dist.local_rank() == 0:
            push_unfinished_checkpoint(store)  # one that a cut-short copy left only on this disk
            pull_run_files(store)
        dist.barrier()
    else:
        run_dir = Path(out) if out else dist.broadcast_from_rank0(default_run_dir(plan, job_id))
    saved_plan = check_resumable(run_dir, plan, method)
    plan = continue_sample_order(run_dir, saved_plan, plan)  # a resume keeps the order it began with
    # Each node's disk, measured by its first rank and seen by all: ranks that decided on their
    # own could part. (With a shared run directory every node measures the same one.)
    rooms = dist.gather_to_all(_room(run_dir, plan) if dist.local_rank() == 0 else (None, None))
    refusal = next((r for r, _ in rooms if r is not None), None)
    room_warning = next((w for _, w in rooms if w is not None), None)
    if refusal is not None:
        raise UserError(refusal)
    drills = Drills.from_environment()

    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir / "plan.json", json.dumps(plan.to_dict(), indent=2) + "\n")
        write_atomic(run_dir / "ds_config.json", json.dumps(prepared.ds_config, indent=2) + "\n")
        if store is not None:
            store.put("plan.json")
            store.put("ds_config.json")
        print(plan.table(), flush=True)
        print(f"run directory: {run_dir}" if store is None else f"run: {store.url}, staged in {run_dir}", flush=True)
        if room_warning:
            print(room_warning, flush=True)
        reshape = describe_reshape(saved_plan, plan)
        if reshape:
            print(reshape, flush=True)
        if drills:
            print(f"fault drills on (CLIPZERO_DRILL): {os.environ['CLIPZERO_DRILL']}", flush=True)
    if dry_run:
        return RunEnd({}, None, False)

    keep_freed_memory()  # before the first step's allocations: they return every step
    seed_everything(plan.seed)
    tokenizer = ClipTokenizer(preset.context_length)
    # Patch dropout only in the model trained: evaluation and export build the tower without it.
    model = TwoTower(with_patch_dropout(preset, plan.patch_dropout), tokenizer.eot_id, tokenizer.sot_id,
                     activation_checkpointing=plan.activation_checkpointing)
    if prepared.init is not None:  # a checkpoint, when the run resumes, replaces these below
        load_source(prepared.init, model)
    if plan.lock is not None:  # before the optimizer's parameter groups, which skip locked weights
        lock(model, plan.lock, plan.unlock_last)
    model.autocast_dtype = torch.bfloat16 if towers_autocast(plan.precision, plan.zero_stage) else None
    objective = method.build_objective(model, dict(plan.objective_options), plan.seed)
    task = ModelWithLoss(model, objective)
    optimizer = optimizer_for_plan(task, plan)
    scheduler = warmup_cosine(optimizer, lr=plan.lr, min_lr=plan.min_lr,
                              warmup_steps=plan.warmup_steps, total_steps=plan.total_steps,
                              start_lr=plan.warmup_start_lr)
    engine, _, _, _ = deepspeed.initialize(model=task, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=prepared.ds_config)
    align_buffer_dtypes(engine.module)
    dist.skip_reduction_alone(engine)
    if plan.zero_stage == 3:
        register_zero3_external_parameters(engine.module)

    loader = TrainLoader(prepared.data.streams, plan.loader_settings(), spec=method.data, tokenizer=tokenizer,
                         rank=dist.rank(), world_size=dist.world_size(),
                         wordnet=prepared.wordnet if plan.objective_options.get("eda_synonyms") else None)
    checkpoint_dir = run_dir / "checkpoints"
    if store is not None:  # the store's newest complete checkpoint, on every node's disk
        agree_on_checkpoint(pull_checkpoint(store) if dist.local_rank() == 0 else None)
    start_step, eval_pending = 0, False
    restored = checkpoint.load(engine, checkpoint_dir)
    if restored is not None:
        start_step, eval_pending = restored.step, restored.eval_pending
        loader.load_state_dict(restored.rank_state["loader"])
        task.load_rank_state(restored.rank_state["task"])
        if is_main:
            print(f"resuming from step {start_step} ({checkpoint_dir / restored.tag}"
                  + (f", from {store.url}" if store is not None else "") + ")"
                  + (", its evaluation first" if eval_pending else ""), flush=True)

    stop_step = min(stop_at_step or plan.total_steps, plan.total_steps)
    if start_step >= stop_step and not eval_pending:
        if is_main:
            print(f"{run_dir} is already at step {start_step} of {plan.total_steps}: nothing to do "
                  "(its numbers are in metrics.jsonl; choose a new --out to train again)")
        return RunEnd({}, None, False)

    # Evaluation is split over the ranks: each holds and encodes its block of every set.
    ranks = Ranks.current()
    for periodic in prepared.evals:
        periodic.evaluation.load(plan.image_size, ranks)   # the held-out split decoded, once
    eval_set = held_out_set(prepared.evals)   # for the charts' probe and the closing line

    clean_text = strip_punctuation if objective.strip_punctuation else None
    trained = TrainedModel(engine.module.model, tokenizer, clean_text, plan.image_size)

    def evaluator(interrupted) -> dict[str, float]:
        return run_periodic_evals(prepared.evals, trained, engine.device, interrupted, ranks)

    cadence = Cadence(total_steps=plan.total_steps, stop_step=stop_step, grad_accum=plan.grad_accum,
                      log_every=plan.log_every, eval_every=plan.eval_every,
                      checkpoint_every=plan.checkpoint_every,
                      max_skipped_in_a_row=plan.max_skipped_in_a_row,
                      nonfinite_advice=nonfinite_advice(plan), checkpoint_bytes=plan.checkpoint_bytes)
    writer = MetricsWriter(run_dir, enabled=is_main, resume_step=start_step)
    flops = count_model_flops(preset, tokenizer.eot_id, tokenizer.sot_id, views=views_encoded(objective),
                              device_name=plan.device_name, precision=plan.precision, world_size=plan.world_size)
    if is_main:
        print(flops.describe(), flush=True)
    writer.text(start_step, "plan", f"{plan.table()}\n\n{flops.describe()}")
    probe = None
    if eval_set is not None:  # the set's first pairs, on every rank: rank 0's block may hold fewer
        probe = HeldOutProbe.first(*first_rows(eval_set.images, eval_set.captions, PROBE_PAIRS, ranks, engine.device),
                                   tokenizer, clean_text)
    bad_records = BadRecordTally(loader.bad_records, engine.device,
                                 carried=restored.rank_state.get("bad_records") if restored else None)
    profiler = StepProfiler(run_dir, plan.profile_steps, start_step, dist.rank()) if plan.profile_steps else None
    uploads = StoreUpload(store, writer if is_main else None) if store is not None else None
    # First: it sets the patch dropout of each step before the step runs.
    tuning = ([UnmaskedTuning(engine.module.model, plan.patch_dropout, plan.total_steps, plan.unmasked_steps,
                              announce=is_main)] if plan.patch_dropout else [])
    # In this order: the log line's and evaluation's scalars written before the charts drawn
    # for them; throughput's timer wraps the charts' first-batch views (waiting for data).
    hooks = LoopHooks([*tuning, MetricsLog(writer),
                       Charts(writer, model=engine.module.model, probe=probe, device=engine.device),
                       Throughput(engine.train_batch_size(), flops), bad_records,
                       Progress(plan.total_steps, start_step, enabled=is_main),
                       *([profiler] if profiler is not None else []),
                       *([WandbLog(run_dir, plan.wandb_project, plan.to_dict())]
                         if plan.wandb_project is not None and is_main else []),
                       # Last: its copy of the run's files follows everything the others write.
                       *([uploads] if uploads is not None else [])])
    started = time.perf_counter()
    try:
        end = train(engine, loader, cadence=cadence, train_step=make_step(plan.accumulation),
                    start_step=start_step, checkpoint_dir=checkpoint_dir, evaluate=evaluator, hooks=hooks,
                    stop=stop, eval_pending=eval_pending, drills=drills)
    finally:
        hooks.closing()
    if profiler is not None and profiler.written is not None and is_main:
        print(f"profile of {plan.profile_steps} step(s): {profiler.written} (open in https://ui.perfetto.dev), "
              f"top operators in {profiler.written.with_suffix('.txt')}", flush=True)
    if uploads is not None:
        uploads.finish()  # before an exit or a requeue: the last checkpoint is in the store
    if end.stopped_at is not None:
        return _after_stop(end, stop, prepared.launch, plan)
    if is_main:
        print(f"trained steps {start_step}..{stop_step} in {time.perf_counter() - started:.1f} s")
        print(bad_records.summary())
        if "zeroshot_top1" in end.metrics:
            chance = 1 / len(eval_set.classnames)
            print(f"zero-shot top-1 on the held-out split: {end.metrics['zeroshot_top1']:.3f} "
                  f"(chance {chance:.3f}); image->text R@1 {end.metrics['retrieval_i2t_r1']:.3f}")
    return RunEnd(end.metrics, None, False)


def _room(run_dir: Path, plan: RunPlan) -> tuple[str | None, str | None]:
    """(refusal, warning) of the free space under the run directory (engine/plan/disk.py), the
    node named when there are several."""
    where = f"on {socket.gethostname()}: " if plan.nodes > 1 else ""
    try:
        warning = check_room(run_dir, plan.checkpoint_bytes, plan.checkpoints_on_disk)
        return None, None if warning is None else where + warning
    except UserError as refusal:
        return where + str(refusal), None


def _after_stop(end, stop: StopSignals, launch: Launch | None, plan: RunPlan) -> RunEnd:
    """The stop checkpoint is written: rank 0 asks SLURM for a requeue; every rank waits for
    that answer before exiting (srun --kill-on-bad-exit would cut the request short)."""
    stop.ignore_further()
    requeued, message = False, ""
    if dist.rank() == 0:
        print(f"step {end.stopped_at}: stopped by {' and '.join(sorted(stop.agreed_names))}"
              + (", evaluation left for the resumed run" if end.eval_pending else ""), flush=True)
        job_id = launch.job_id if launch is not None else None
        restarts = launch.restarts if launch is not None else 0
        requeued, message = requeue(job_id, restarts, plan.max_requeues, stop)
        print(f"stopped at step {end.stopped_at} of {plan.total_steps} with a checkpoint: {message}",
              flush=True)
    requeued = dist.broadcast_from_rank0(requeued)
    return RunEnd(end.metrics, end.stopped_at, requeued)


def nonfinite_advice(plan: RunPlan) -> str:
    """What the message that stops a run of non-finite steps suggests, for this plan."""
    tips = [f"lower --lr (this run: {plan.lr:g})", f"more --warmup-steps (this run: {plan.warmup_steps})"]
    if plan.precision == "fp16":
        tips.append("--precision bf16 on a GPU that has it, or fp32")
    tips.append("look for bad samples in the batches of these steps")
    return "Try: " + "; ".join(tips) + "."
