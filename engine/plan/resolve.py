"""The one module that decides: dials + hardware + method (its recipe) + model/data facts -> RunPlan.

Every derived value is recorded with the fact behind it, so the plan table printed before
the first step (and plan.json) explains the whole run. Overrides of single decisions win
and are checked against each other here, before any heavy work.
"""
import dataclasses
import math
from dataclasses import dataclass

from engine.data.loader import LoaderSettings
from engine.data.streams import DataFacts
from engine.errors import UserError
from engine.plan.deepspeed_config import fp16_scale_search_steps
from engine.plan.hardware import Hardware
from engine.launcher_env import Launch
from engine.plan.dials import PRECISIONS, Dials
from engine.plan.data import data_decisions, dataset_reason
from engine.plan.decode import decode_decisions
from engine.plan.disk import checkpoint_decisions, staging_decision
from engine.plan.faults import fault_decisions
from engine.plan.memory import gb, micro_batch_setting, zero_setting
from engine.plan.start import StartFacts, start_decisions
from engine.objectives.base import OptionContext
from engine.objectives.method import Method
from engine.objectives.recipes import Recipe
from engine.plan.objective_options import accumulation, check_micro_batch, objective_options
from engine.plan.optimizer import OptimizerSupport, optimizer_decision
from engine.plan.patch_dropout import patch_dropout_decisions
from engine.plan.precision import cpu_precision, precision_details
from engine.plan.resume import must_match, same_batch_semantics, same_dialled_options, same_stream_shares

@dataclass(frozen=True)
class Decision:
    name: str; value: object; reason: str


@dataclass(frozen=True)
class RunPlan:
    """Fields marked must_match are what a resumed run must share with the run it continues
    (else the checkpoint is wrong for it). The number of ranks and the micro-batch split may
    change: the states are resharded (engine/train/reshard.py) and the data order continues
    (engine/data/loader.py), as long as each step's loss spans the same samples."""
    method: str = must_match(); model: str = must_match(); seed: int = must_match()
    # --init: the weights the run starts from; --lock: a tower kept as they are (engine/plan/start.py)
    init: str | None = must_match(); lock: str | None = must_match(); unlock_last: int = must_match()
    world_size: int; nodes: int; rendezvous: str; accelerator: str; device_name: str
    global_batch: int = must_match(); micro_batch: int; grad_accum: int
    accumulation: str = must_match(same_batch_semantics)
    activation_checkpointing: bool  # the towers recompute their blocks in the backward (plan/memory.py)
    precision: str; zero_stage: int; offload_optimizer: bool; grad_dtype: str; fp32_parts: str
    loss_input_dtype: str; optimizer: str
    lr: float; group_lrs: tuple[tuple[str, float], ...]; min_lr: float
    weight_decay: float; betas: tuple[float, float] | None; eps: float | None
    momentum: float | None; grad_clip: float | None
    warmup_steps: int; warmup_start_lr: float; total_steps: int = must_match(); epochs: float
    crop_scale: tuple[float, float]; image_size: int; text_layers: int = must_match()
    patch_dropout: float; unmasked_steps: int  # FLIP's masking (plan/patch_dropout.py): may change on resume
    workers: int; decode_device: str; decode_threads: int; hw_decoder_load: float | None
    checkpoint_every: int
    # The disk the checkpoints need (engine/plan/disk.py): estimates, free to change on resume
    # (another precision or ZeRO stage), and absent from the plan.json of older runs.
    checkpoint_bytes: int; checkpoints_on_disk: int
    # With --out an object store URL: where each node writes the run first (None: --out is local).
    staging_dir: str | None
    eval_every: int; evaluations: tuple[str, ...]; log_every: int; profile_steps: int
    wandb_project: str | None
    collective_timeout_s: int; max_requeues: int; max_skipped_in_a_row: int
    dataset_size: int = must_match(); data_fraction: float = must_match(); n_params: int; trainable_params: int
    # Where the data lives may change (a local copy of a bucket), not how much of each stream
    # an epoch draws: a mixture's weights set the data order as much as the seed does.
    data_streams: tuple[tuple[str, float, int], ...] = must_match(same_stream_shares)
    cache_limit: int | None
    # A resume keeps the canonical node count it began with, on the node counts that keep its
    # order, and refuses the others (continue_sample_order in engine/plan/resume.py).
    shuffle_algo: str; shuffle_seed: int; shuffle_block: int; canonical_nodes: int
    # The method's own options, resolved (name -> value); the dialled ones must match.
    objective_options: dict = must_match(same_dialled_options)
    decisions: tuple[Decision, ...]     # one per field above in field order, then one per objective option

    def table(self) -> str:
        """The plan as aligned `name | value | reason` rows."""
        rows = [("name", "value", "reason")]
        rows += [(d.name, _show(d.value), d.reason) for d in self.decisions
                 if not (d.value is None and d.name in _SHOWN_ONLY_WHEN_SET)]
        name_w = max(len(r[0]) for r in rows)
        value_w = max(len(r[1]) for r in rows)
        lines = [f"{n:<{name_w}} | {v:<{value_w}} | {r}" for n, v, r in rows]
        lines.insert(1, f"{'-' * name_w}-+-{'-' * value_w}-+-{'-' * 6}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def loader_settings(self) -> LoaderSettings:
        """The training loader's slice: each of its fields is the plan field of the same name, so
        a new data decision reaches the loader without a line here."""
        return LoaderSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(LoaderSettings)})


# Decisions that only a run from weights, some optimizers, GPU decoding or a run in an object
# store have: the table leaves them out when unset.
_SHOWN_ONLY_WHEN_SET = frozenset(("init", "lock", "betas", "eps", "momentum", "hw_decoder_load", "staging_dir"))


def _show(value: object) -> str:
    if isinstance(value, tuple):
        return "(" + ", ".join(_show(v) for v in value) + ")"
    if isinstance(value, float):
        return f"{value:.4g}"
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def resolve(dials: Dials, hw: Hardware, method: Method, *, n_params: int, dataset_size: int,
            optimizer_support: OptimizerSupport, image_size: int, text_layers: int = 0,
            full_dataset_size: int | None = None, wordnet: str | None = None,
            launch: Launch | None = None, data: DataFacts | None = None, start: StartFacts = StartFacts()) -> RunPlan:
    """`dataset_size` counts the pairs trained on (after --data-fraction: an epoch's samples),
    `full_dataset_size` the whole data set; `wordnet` is the WordNet directory found (DeCLIP's
    EDA), if any; `launch` how the ranks were started (None: planned for `hw` alone, as in a dry
    run); `data` the training data's streams and cache disk (None: one local dataset); `start`
    what --init's source is and what --lock leaves to train, found by the caller."""
    recipe = method.recipe
    if data is not None and data.epoch_size != dataset_size:
        raise ValueError(f"dataset_size {dataset_size} is not the data's epoch of {data.epoch_size}")
    if (dials.method, dials.model) != (recipe.method, recipe.model):
        raise ValueError(f"recipe is for {recipe.method}/{recipe.model}, "
                         f"dials ask for {dials.method}/{dials.model}")
    decisions: dict[str, Decision] = {}

    def decide(name: str, value, reason: str):
        decisions[name] = Decision(name, value, reason)
        return value

    for name, value in (("method", recipe.method), ("model", recipe.model), ("seed", dials.seed)):
        decide(name, value, "dial")
    for name, value, reason in start_decisions(dials, start, n_params):
        decide(name, value, reason)
    decide("world_size", hw.world_size,
           f"{hw.nodes} node(s) x {hw.local_world_size} rank(s) per node, {hw.ranks_from}")
    decide("nodes", hw.nodes, hw.ranks_from)
    decide("accelerator", hw.accelerator,
           "CUDA device found" if hw.accelerator == "cuda" else "no CUDA device: CPU run")
    decide("device_name", hw.device_name,
           f"{_sm(hw)}, {gb(hw.device_memory_bytes)} GB" if hw.accelerator == "cuda"
           else f"{gb(hw.device_memory_bytes)} GB usable RAM per rank")
    decide("n_params", n_params, "counted in the built model")
    decide("image_size", image_size, "the model's input size")
    decide("text_layers", text_layers, "--text-layers given" if dials.text_layers is not None
           else "the model preset's text tower")

    global_batch = decide("global_batch", *_global_batch(dials, recipe, hw.world_size, dataset_size))
    decide("dataset_size", dataset_size, dataset_reason(data))
    decide("data_fraction", *_data_fraction(dials, dataset_size, full_dataset_size))
    precision = decide("precision", *_precision(dials, hw, n_params))
    per_rank = global_batch // hw.world_size
    micro_batch, checkpointing = micro_batch_setting(dials, hw, recipe, precision, per_rank,
                                                     method.objective.min_micro_batch)
    micro = decide("micro_batch", *micro_batch)
    decide("activation_checkpointing", *checkpointing)
    check_micro_batch(method, micro, per_rank)
    decide("grad_accum", per_rank // micro,
           f"{global_batch:,} = {micro} micro x {per_rank // micro} accum x {hw.world_size} ranks")
    decide("accumulation", *accumulation(dials.accumulation, per_rank // micro))

    stage, stage_reason, offload, offload_reason = zero_setting(dials, hw, precision, n_params,
                                                                   decisions["trainable_params"].value)
    decide("zero_stage", stage, stage_reason)
    decide("offload_optimizer", offload, offload_reason)
    for name, value, reason in precision_details(precision, stage, hw.world_size, per_rank // micro):
        decide(name, value, reason)
    decide("optimizer", *optimizer_decision(dials, hw, offload, optimizer_support, recipe))

    lr = decide("lr", *_lr(dials, recipe, global_batch))
    factor = lr / recipe.lr  # every LR of the recipe scales with the peak LR
    decide("group_lrs", tuple((group, group_lr * factor) for group, group_lr in recipe.group_lrs),
           "one LR for all parameters" if not recipe.group_lrs
           else recipe.source + ("" if factor == 1 else f", scaled x{factor:.3g} with lr"))
    decide("min_lr", recipe.min_lr * factor,
           recipe.source if lr == recipe.lr or not recipe.min_lr
           else f"recipe's {recipe.min_lr:g} scaled with lr")
    decide("warmup_start_lr", recipe.warmup_start_lr * factor,
           "warmup ramps up from 0" if not recipe.warmup_start_lr else
           recipe.source + ("" if factor == 1 else f", scaled x{factor:.3g} with lr"))
    adam = recipe.optimizer == "adamw"
    for name in ("weight_decay", "betas", "eps", "momentum", "grad_clip", "crop_scale"):
        applies = name not in ("betas", "eps", "momentum") or adam == (name != "momentum")
        decide(name, getattr(recipe, name) if applies else None,
               recipe.source if applies else f"not used by {'AdamW' if adam else 'SGD'}")
    options = [Decision(*option) for option in objective_options(
        method, dials.objective_options,
        OptionContext(recipe=recipe, dataset_size=dataset_size, wordnet=wordnet))]

    # The loader ends each epoch at a whole optimizer step (engine/data/loader.py), so epochs
    # are counted in the same whole steps here: the plan's epochs are the loader's epochs.
    steps_per_epoch = dataset_size // global_batch
    total_steps = decide("total_steps", *_total_steps(dials, recipe, global_batch, dataset_size))
    decide("epochs", total_steps / steps_per_epoch,
           f"{total_steps:,} steps / {steps_per_epoch:,} whole steps of {global_batch:,} per epoch "
           f"of {dataset_size:,} pairs (each epoch leaves out the last "
           f"{dataset_size - steps_per_epoch * global_batch:,} of its shuffled order)")
    decide("warmup_steps", *_warmup(dials, recipe, total_steps))
    for name, value, reason in patch_dropout_decisions(dials, method.preset, total_steps, steps_per_epoch):
        decide(name, value, reason)
    workers = decide("workers", *_workers(dials, hw))
    for name, value, reason in data_decisions(dials, data, dataset_size=dataset_size, workers=workers,
                                              local_world_size=hw.local_world_size, seed=dials.seed,
                                              nodes=hw.nodes):
        decide(name, value, reason)
    for name, value, reason in decode_decisions(dials, hw):
        decide(name, value, reason)
    decide("checkpoint_every", *_every(dials.checkpoint_every, "--checkpoint-every",
                                       min(1000, math.ceil(total_steps / 5)),
                                       "about 5 checkpoints per run, at least every 1,000 steps"))
    for name, value, reason in checkpoint_decisions(n_params, precision, stage, total_steps,
                                                    decisions["checkpoint_every"].value):
        decide(name, value, reason)
    decide("staging_dir", *staging_decision(dials.out, dials.staging))
    decide("eval_every", *_every(dials.eval_every, "--eval-every", math.ceil(total_steps / 4),
                                 "about 4 evaluations per run"))
    decide("evaluations", dials.evals,
           "--eval: scored at every evaluation, beside the held-out split of --eval-data" if dials.evals else
           "none beyond the held-out split of --eval-data (the built-in data's by default); add sets with --eval")
    for name, value, reason in fault_decisions(dials, launch, n_params, precision,
                                               fp16_scale_search_steps()):
        decide(name, value, reason)
    log_every = min(10, max(1, total_steps // 10))
    decide("log_every", *_every(dials.log_every, "--log-every", log_every, "every 10 steps"
                                if log_every == 10 else f"about 10 lines for a {total_steps}-step run"))
    decide("profile_steps", *_profile(dials, total_steps))
    decide("wandb_project", *_wandb(dials.wandb))
    # The table lists the decisions in RunPlan's field order, whatever order they were made in.
    ordered = tuple(decisions[f.name] for f in dataclasses.fields(RunPlan)
                    if f.name not in ("objective_options", "decisions"))
    return RunPlan(**{d.name: d.value for d in ordered}, objective_options={d.name: d.value for d in options},
                   decisions=ordered + tuple(options))


def _sm(hw: Hardware) -> str:
    major, minor = hw.compute_capability or (0, 0)
    return f"sm_{major}{minor}"


def _global_batch(dials: Dials, recipe: Recipe, world_size: int, dataset_size: int):
    if dials.global_batch is not None:
        (batch, reason), flag = _given(dials.global_batch, "--global-batch"), "--global-batch"
    else:
        batch, reason, flag = recipe.global_batch, recipe.source, "recipe's global batch"
    if batch % world_size:
        lower = max(world_size, batch - batch % world_size)
        raise UserError(f"{flag} {batch} is not divisible by {world_size} ranks: use a multiple "
                        f"of {world_size} (e.g. --global-batch {lower})")
    if dataset_size < 1:
        raise UserError("the training data is empty: point --data at a converted dataset")
    if batch > dataset_size:
        raise UserError(f"{flag} {batch} is larger than the {dataset_size:,} training pairs: "
                        f"use --global-batch {dataset_size - dataset_size % world_size} or less")
    return batch, reason


def _precision(dials: Dials, hw: Hardware, n_params: int):
    if dials.precision is not None:
        if dials.precision not in PRECISIONS:
            raise UserError(f"--precision {dials.precision!r} is unknown: use one of "
                            f"{', '.join(PRECISIONS)}")
        if dials.precision == "bf16" and not hw.bf16:
            raise UserError(f"--precision bf16: {hw.device_name} ({_sm(hw)}) has no bf16 support: "
                            "use --precision fp16")
        if dials.precision == "fp16" and hw.accelerator == "cpu":
            raise UserError("--precision fp16 needs a GPU (DeepSpeed's CPU accelerator has no fp16): "
                            "use --precision bf16 or fp32 on a CPU")
        if dials.precision == "bf16" and hw.accelerator == "cpu" and hw.cpu_bf16 is None:
            return "bf16", ("--precision given; this CPU has no AMX or AVX512-BF16, so bf16 is emulated "
                            "and likely slower than fp32")
        return dials.precision, "--precision given"
    if hw.accelerator == "cpu":
        return cpu_precision(hw.cpu_bf16, n_params)
    if hw.bf16:
        return "bf16", f"bf16: {_sm(hw)} supports it"
    return "fp16", f"fp16 with dynamic loss scaling: {_sm(hw)} has no bf16"


def _lr(dials: Dials, recipe: Recipe, global_batch: int):
    if dials.lr is not None:
        if dials.lr <= 0:
            raise UserError(f"--lr {dials.lr} must be positive")
        return dials.lr, "--lr given"
    if global_batch == recipe.global_batch:
        return recipe.lr, recipe.source
    factor = global_batch / recipe.global_batch
    return recipe.lr * factor, (f"recipe's {recipe.lr:g} at batch {recipe.global_batch:,}, scaled "
                                f"linearly to batch {global_batch:,} (x{factor:.3g})")


def _total_steps(dials: Dials, recipe: Recipe, global_batch: int, dataset_size: int):
    if dials.steps is not None and dials.epochs is not None:
        raise UserError("--steps and --epochs both set the run length: give only one")
    if dials.steps is not None:
        return _given(dials.steps, "--steps")
    if recipe.steps is not None and dials.epochs is None:
        return recipe.steps, f"{recipe.source}: {recipe.steps:,} iterations"
    epochs, origin = ((recipe.epochs, "recipe") if dials.epochs is None
                      else (dials.epochs, "--epochs given"))
    if epochs <= 0:
        raise UserError(f"--epochs {epochs} must be positive")
    steps_per_epoch = dataset_size // global_batch  # whole steps: the loader drops each epoch's tail
    # Rounded before the ceiling: 1.1 x 100 is 110.00000000000001 in floating point, not 111 steps.
    steps = math.ceil(round(epochs * steps_per_epoch, 6))
    return steps, (f"{epochs:g} epochs ({origin}) of {steps_per_epoch:,} whole steps "
                   f"({dataset_size:,} pairs at batch {global_batch:,})")


def _warmup(dials: Dials, recipe: Recipe, total_steps: int):
    if dials.warmup_steps is not None:
        if not 0 <= dials.warmup_steps < total_steps:
            raise UserError(f"--warmup-steps {dials.warmup_steps} must be between 0 and the "
                            f"{total_steps:,} total steps (exclusive)")
        return dials.warmup_steps, "--warmup-steps given"
    cap = total_steps // 10
    if recipe.warmup_steps > cap:
        return cap, f"recipe's {recipe.warmup_steps:,} capped at 10% of this {total_steps:,}-step run"
    return recipe.warmup_steps, recipe.source


def _data_fraction(dials: Dials, dataset_size: int, full_dataset_size: int | None):
    if not 0 < dials.data_fraction <= 1:
        raise UserError(f"--data-fraction {dials.data_fraction} must lie in (0, 1], e.g. 0.1")
    if dials.data_fraction == 1.0:
        return 1.0, "all of the training data"
    return dials.data_fraction, (f"--data-fraction given: a fixed subset of {dataset_size:,} of "
                                 f"{full_dataset_size or dataset_size:,} pairs")


def _workers(dials: Dials, hw: Hardware):
    if dials.workers is not None:
        return _given(dials.workers, "--workers")
    per_rank = hw.cpus_per_node // hw.local_world_size
    workers = min(8, max(1, per_rank - 1))
    return workers, (f"{hw.cpus_per_node} CPUs / {hw.local_world_size} rank(s) per node, one left "
                     "for the training process (1 to 8)")


# The profiler's schedule (engine/observe/profile.py follows it; --profile is checked against it).
PROFILE_SKIPPED_STEPS = 1   # the process's first step: not recorded
PROFILE_WARMUP_STEPS = 1    # profiled but dropped: the profiler's own start-up cost lands here


def first_traced_step(start_step: int) -> int:
    """The first step (1-based, as logged) a process starting after `start_step` traces."""
    return start_step + PROFILE_SKIPPED_STEPS + PROFILE_WARMUP_STEPS + 1


def _profile(dials: Dials, total_steps: int):
    if dials.profile is None:
        return 0, "off (--profile N traces N steps with torch.profiler)"
    steps = _given(dials.profile, "--profile")[0]
    first = first_traced_step(0)
    if first + steps - 1 > total_steps:
        raise UserError(f"--profile {steps}: the trace starts at step {first} of this {total_steps:,}-step run; "
                        f"use --profile {max(1, total_steps - first + 1)} or fewer, or more --steps")
    return steps, (f"--profile given: steps {first}..{first + steps - 1} of those this process runs, traced "
                   "into RUN/profile/ (Chrome/Perfetto JSON)")


WANDB_FORBIDDEN = ("/", "\\", "#", "?", "%", ":")  # W&B refuses them in a project name
WANDB_RUN_ID_FILE = "wandb_run_id"  # under the run directory (engine/observe/wandb_log.py writes it)


def _wandb(project: str | None):
    if project is None:
        return None, "off (--wandb PROJECT also logs the scalars to Weights & Biases)"
    if not project.strip() or any(c in project for c in WANDB_FORBIDDEN):
        raise UserError(f"--wandb {project!r}: a W&B project name is not empty and has none of "
                        f"{' '.join(WANDB_FORBIDDEN)}")
    return project, ("--wandb given: rank 0 logs metrics.jsonl's scalars there, with this plan as the config; "
                     f"the W&B run id is kept in RUN/{WANDB_RUN_ID_FILE}, so a resumed run continues the same W&B run")


def _every(given: int | None, flag: str, default: int, reason: str):
    return _given(given, flag) if given is not None else (max(1, default), reason)


def _given(value: int, flag: str):
    if value < 1:
        raise UserError(f"{flag} {value} must be at least 1")
    return value, f"{flag} given"
