"""From dials to a trained, evaluated model: the data flow of the design, in order.

prepare()  everything that can fail on bad input, before any heavy work or any file written
run()      distributed setup, run directory, DeepSpeed engine, loader, loop, final eval
"""
import json
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import numpy as np
import torch

from engine import dist
from engine.data.embedded import ensure_digits
from engine.data.eval_set import load_eval_set
from engine.data.loader import TrainLoader
from engine.data.mds import cache_root, describe_mds
from engine.data.spec import DataSpec
from engine.data.text import ClipTokenizer, strip_punctuation
from engine.ds_config import apply_overrides, render
from engine.errors import UserError
from engine.eval.evaluate import evaluate
from engine.hardware import probe
from engine.data.wordnet import find_wordnet
from engine.models.presets import ModelPreset, for_method, get_preset
from engine.models.two_tower import TwoTower, count_parameters
from engine.observe.metrics import MetricsWriter
from engine.observe.progress import Progress
from engine.plan import Dials, RunPlan, probe_optimizer_support, resolve
from engine.recipes import get_recipe
from engine.task import Task, align_buffer_dtypes, build_objective, objective_class
from engine.train import checkpoint
from engine.train.loop import Cadence, train
from engine.train.optim import optimizer_for_plan
from engine.train.schedule import warmup_cosine


@dataclass(frozen=True)
class Prepared:
    plan: RunPlan
    ds_config: dict
    preset: ModelPreset
    data: str
    eval_data: str | None


def prepare(dials: Dials, eval_data: str | None) -> Prepared:
    """Resolve the plan and the DeepSpeed config. Raises UserError; writes nothing."""
    recipe = get_recipe(dials.method, dials.model)
    preset = for_method(get_preset(dials.model), dials.method, dials.text_layers)
    if dials.data is None:
        digits = ensure_digits()
        data, eval_data = str(digits.train), eval_data or str(digits.heldout)
    else:
        data = dials.data
    full_size = describe_mds(data).num_samples
    if eval_data is not None:
        describe_mds(eval_data)
    if dials.data_fraction != 1.0:
        from engine.data.subset import ensure_subset
        data = ensure_subset(data, dials.data_fraction, cache_root())
    dataset_size = describe_mds(data).num_samples
    tokenizer = ClipTokenizer(preset.context_length)
    hardware = probe()
    wordnet = find_wordnet() if objective_class(dials.method).text_aug else None
    plan = resolve(dials, hardware, recipe,
                   n_params=count_parameters(preset, tokenizer.eot_id, tokenizer.sot_id),
                   dataset_size=dataset_size, full_dataset_size=full_size,
                   optimizer_support=probe_optimizer_support(hardware),
                   image_size=preset.image_size, text_layers=preset.text_layers,
                   wordnet=None if wordnet is None else str(wordnet))
    ds_config = apply_overrides(render(plan), dials.ds, world_size=plan.world_size)
    return Prepared(plan, ds_config, preset, data, eval_data)


# Values a resumed run must share with the run it continues (else the checkpoint is wrong for it).
RESUME_MUST_MATCH = ("method", "model", "seed", "world_size", "global_batch", "micro_batch",
                     "accumulation", "total_steps", "dataset_size", "data_fraction", "text_layers",
                     "queue_size", "enqueue", "negatives", "prior")


def check_resumable(run_dir: Path, plan: RunPlan) -> None:
    saved_path = run_dir / "plan.json"
    if not (run_dir / "checkpoints" / "latest").exists() or not saved_path.exists():
        return
    saved = json.loads(saved_path.read_text())
    now = plan.to_dict()
    for key in RESUME_MUST_MATCH:
        if saved.get(key) != now[key]:
            raise UserError(
                f"{run_dir} holds a run with {key}={saved.get(key)!r} but this command gives "
                f"{key}={now[key]!r}: resume with the same dials, or choose a new --out")


def default_run_dir(plan: RunPlan) -> Path:
    return Path("runs") / f"{plan.method}-{plan.model}-{time.strftime('%Y%m%d-%H%M%S')}"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def data_spec(objective, plan: RunPlan) -> DataSpec:
    """What the loader must yield for this objective, with the recipe's crop scale."""
    return DataSpec(image_views=objective.image_views, augment=objective.augment,
                    crop_scale=plan.crop_scale, text_aug=objective.text_aug, mlm=objective.mlm,
                    strip_punctuation=objective.strip_punctuation)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run(prepared: Prepared, *, out: str | None, dry_run: bool, stop_at_step: int | None) -> dict:
    plan, preset = prepared.plan, prepared.preset
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if torch.cuda.is_available():
        # Before any collective: NCCL's object broadcast and barriers use the current device.
        torch.cuda.set_device(dist.local_rank() % torch.cuda.device_count())
    dist.init_distributed()
    is_main = dist.rank() == 0
    run_dir = Path(out) if out else dist.broadcast_from_rank0(default_run_dir(plan))
    check_resumable(run_dir, plan)

    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir / "plan.json", json.dumps(plan.to_dict(), indent=2) + "\n")
        write_atomic(run_dir / "ds_config.json", json.dumps(prepared.ds_config, indent=2) + "\n")
        print(plan.table(), flush=True)
        print(f"run directory: {run_dir}", flush=True)
    if dry_run:
        return {}

    seed_everything(plan.seed)
    tokenizer = ClipTokenizer(preset.context_length)
    model = TwoTower(preset, tokenizer.eot_id, tokenizer.sot_id)
    objective = build_objective(plan, model)
    task = Task(model, objective)
    optimizer = optimizer_for_plan(task, plan)
    scheduler = warmup_cosine(optimizer, lr=plan.lr, min_lr=plan.min_lr,
                              warmup_steps=plan.warmup_steps, total_steps=plan.total_steps,
                              start_lr=plan.warmup_start_lr)
    engine, _, _, _ = deepspeed.initialize(model=task, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=prepared.ds_config)
    align_buffer_dtypes(engine.module)

    loader = TrainLoader(prepared.data, micro_batch=plan.micro_batch, image_size=plan.image_size,
                         spec=data_spec(objective, plan), seed=plan.seed, workers=plan.workers,
                         decode_device=plan.decode_device, tokenizer=tokenizer,
                         rank=dist.rank(), world_size=dist.world_size(),
                         wordnet=find_wordnet() if objective.text_aug and plan.eda_synonyms else None)
    checkpoint_dir = run_dir / "checkpoints"
    start_step = 0
    restored = checkpoint.load(engine, checkpoint_dir)
    if restored is not None:
        start_step, rank_state = restored
        loader.load_state_dict(rank_state["loader"])
        task.load_rank_state(rank_state["task"])
        if is_main:
            print(f"resuming from step {start_step} ({checkpoint_dir / checkpoint.latest_tag(checkpoint_dir)})")

    stop_step = min(stop_at_step or plan.total_steps, plan.total_steps)
    if start_step >= stop_step:
        if is_main:
            print(f"{run_dir} is already at step {start_step} of {plan.total_steps}: nothing to do "
                  "(its numbers are in metrics.jsonl; choose a new --out to train again)")
        return {}

    eval_set = load_eval_set(prepared.eval_data, plan.image_size) if prepared.eval_data else None

    def evaluator() -> dict[str, float]:
        if eval_set is None:
            return {}
        return evaluate(engine.module.model, eval_set, tokenizer, engine.device,
                        clean_text=strip_punctuation if objective.strip_punctuation else None)

    cadence = Cadence(total_steps=plan.total_steps, stop_step=stop_step, grad_accum=plan.grad_accum,
                      log_every=plan.log_every, eval_every=plan.eval_every,
                      checkpoint_every=plan.checkpoint_every,
                      feature_cache=plan.accumulation == "feature_cache")
    writer = MetricsWriter(run_dir, enabled=is_main)
    progress = Progress(plan.total_steps, start_step, enabled=is_main)
    started = time.perf_counter()
    try:
        metrics = train(engine, loader, cadence=cadence, start_step=start_step,
                        device=engine.device, checkpoint_dir=checkpoint_dir, evaluate=evaluator,
                        writer=writer, progress=progress)
    finally:
        progress.close()
        writer.close()
    if is_main:
        print(f"trained steps {start_step}..{stop_step} in {time.perf_counter() - started:.1f} s")
        if "zeroshot_top1" in metrics:
            chance = 1 / len(eval_set.classnames)
            print(f"zero-shot top-1 on the held-out split: {metrics['zeroshot_top1']:.3f} "
                  f"(chance {chance:.3f}); image->text R@1 {metrics['retrieval_i2t_r1']:.3f}")
    return metrics
