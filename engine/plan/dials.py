"""The dials: everything a user may set, declared once.

Each field of `Dials` carries its command-line flag in its metadata (help, allowed values, how
it parses), so the launcher's parser is built from these declarations and read back into
`Dials` by the same ones. A field left at None lets the planner decide (engine/plan/resolve.py).
The objectives' own options are declared by each objective (engine/objectives/base.Option) and
join the parser in a group of their own.
"""
import argparse
import dataclasses
from dataclasses import dataclass

from engine.objectives.registry import DEFAULT_METHOD, declared_dials, method_names

PRECISIONS = ("bf16", "fp16", "fp32")
OPTIMIZERS = ("apex_fused", "deepspeed_fused", "torch_fused", "torch", "deepspeed_cpu_adam",
              "sgd_lookahead")
DECODE_DEVICES = ("gpu", "cpu")
# How micro-batches of one step accumulate: "gradcache" keeps the global-batch loss
# (engine/train/step.py), "plain" contrasts each micro-batch within itself.
ACCUMULATIONS = ("gradcache", "plain")

DIALS = "dials"
OVERRIDES = "overrides of single decisions (default: derived, see the plan)"
OBJECTIVE_OPTIONS = "objective options, declared by each method (default: its recipe)"


def dial(default=None, help: str = "", *, group: str = DIALS, kind: type = str, choices=None,
         metavar: str | None = None, repeatable: bool = False, switch: bool = False, flag: str | None = None):
    """A Dials field and its flag (--field-name unless `flag` is given): `kind` parses the
    text, `repeatable` collects every use into a tuple, `switch` makes --name / --no-name."""
    return dataclasses.field(default=default, metadata={
        "flag": {"help": help, "group": group, "kind": kind, "choices": choices, "metavar": metavar,
                 "repeatable": repeatable, "switch": switch, "flag": flag}})


@dataclass(frozen=True)
class Dials:
    method: str = dial(DEFAULT_METHOD, "{methods}, or your own objective as package.module:Class "
                       "(default: {default})")
    model: str = dial("debug", "debug | vit-debug | rn50 | vit-b-32 | vit-b-16 | vit-l-14 | vit-h-14 | "
                      "any timm image model name")
    data: str | None = dial(None, "MDS directory or remote URL (s3://, gs://, ...), or a weighted mixture "
                            "of them, e.g. s3://bucket/a:0.7,/data/b:0.3 (default: built-in digits)")
    evals: tuple[str, ...] = dial(
        (), "also evaluate on this set at every evaluation (repeatable): zeroshot:DIR (an ImageFolder; "
        "options classnames=imagenet|FILE, templates=openai|simple|FILE), retrieval:FILE|MDS (a Karpathy "
        ".json or MDS directory; options split=, image_root=), heldout:MDS (scored as the held-out split) or your own "
        "evaluation as package.module:Class:PATH (engine/eval/base.py)",
        metavar="TASK:PATH[,OPTION=VALUE]", repeatable=True, flag="--eval")
    out: str | None = dial(None, "run directory (default runs/<method>-<model>-<time>), or an object store "
                           "folder (s3://bucket/prefix) that every node stages locally and copies to; an "
                           "existing one is resumed from its latest checkpoint")
    steps: int | None = dial(None, "optimizer steps (default: from epochs)", kind=int)
    epochs: float | None = dial(None, "passes over the data (default: recipe)", kind=float)
    global_batch: int | None = dial(None, "pairs per optimizer step, all ranks", kind=int)
    seed: int = dial(0, "everything random derives from it (default: 0)", kind=int)
    init: str | None = dial(None, "start from these weights: an open_clip checkpoint or local-dir: folder, a Hugging "
                                  "Face CLIPModel folder, a timm image model's weights (image tower), or a clipzero "
                                  "run directory; files only, never a download", metavar="SOURCE")
    lock: str | None = dial(None, "keep this tower as --init gave it: image (LiT) or text", choices=("image", "text"))
    unlock_last: int = dial(0, "with --lock: still train the locked tower's last N blocks and what follows "
                               "them (final norm, projection)", kind=int, metavar="N")
    data_fraction: float = dial(1.0, "train on a fixed subset of this fraction of the data (e.g. 0.1)",
                                kind=float)
    ds: tuple[str, ...] = dial((), "raw DeepSpeed config override (repeatable)", metavar="KEY.PATH=VALUE",
                               repeatable=True)
    profile: int | None = dial(None, "trace this many training steps with torch.profiler, after two steps of "
                               "warm-up, into RUN/profile/ (Chrome/Perfetto JSON, one file per rank)",
                               kind=int, metavar="STEPS")
    wandb: str | None = dial(None, "also log the scalars of metrics.jsonl to this Weights & Biases project, with "
                             "the plan as the run's config; a resumed run continues the same W&B run (needs "
                             "pip install 'clipzero[wandb]'; WANDB_MODE=offline keeps it on this machine)",
                             metavar="PROJECT")
    # Overrides of single decisions (None = the planner decides).
    micro_batch: int | None = dial(None, group=OVERRIDES, kind=int)
    activation_checkpointing: str | None = dial(None, "on: the towers keep only each block's input and "
                                                "recompute the block in the backward (less memory, one more "
                                                "forward)", group=OVERRIDES, choices=("on", "off"))
    accumulation: str | None = dial(None, "gradcache: negatives span the global batch however it is split "
                                    "into micro-batches (GradCache); plain: each micro-batch contrasts "
                                    "within itself", group=OVERRIDES, choices=ACCUMULATIONS)
    precision: str | None = dial(None, group=OVERRIDES, choices=PRECISIONS)
    zero_stage: int | None = dial(None, group=OVERRIDES, kind=int)
    offload: bool | None = dial(None, group=OVERRIDES, switch=True)
    optimizer: str | None = dial(None, group=OVERRIDES, choices=OPTIMIZERS)
    lr: float | None = dial(None, group=OVERRIDES, kind=float)
    warmup_steps: int | None = dial(None, group=OVERRIDES, kind=int)
    workers: int | None = dial(None, "data workers per rank", group=OVERRIDES, kind=int)
    cache_limit: str | None = dial(None, "disk that remote shards may take on each node, e.g. 20gb (the "
                                   "least recently used are evicted); the cache lives under $CLIPZERO_CACHE",
                                   group=OVERRIDES, metavar="SIZE")
    decode_device: str | None = dial(None, group=OVERRIDES, choices=DECODE_DEVICES)
    decode_threads: int | None = dial(None, "DALI threads per rank", group=OVERRIDES, kind=int)
    hw_decoder_load: float | None = dial(None, "GPU decode: the share of JPEGs for the GPU's hardware JPEG "
                                         "decoder, 0 to 1", group=OVERRIDES, kind=float, metavar="SHARE")
    checkpoint_every: int | None = dial(None, group=OVERRIDES, kind=int)
    staging: str | None = dial(None, "with --out URL: the local folder each node writes the run in before "
                               "copying it to the store (default: TMPDIR/clipzero-staging/...)",
                               group=OVERRIDES, metavar="DIR")
    eval_every: int | None = dial(None, group=OVERRIDES, kind=int)
    log_every: int | None = dial(None, group=OVERRIDES, kind=int)
    text_layers: int | None = dial(None, "text tower depth (CLIP-Lite: 2/4/6/12)", group=OVERRIDES, kind=int)
    patch_dropout: float | None = dial(None, "drop this share of a ViT image tower's patch tokens in training, "
                                       "0 <= R < 1 (FLIP, Li et al. 2023: 0.5); whole images at evaluation and "
                                       "export", kind=float, metavar="R")
    unmasked_steps: int | None = dial(None, "with --patch-dropout: the run's last N steps encode every patch "
                                      "token (FLIP's unmasked tuning; default 0.32 epoch, at most 5%% of the run)",
                                      group=OVERRIDES, kind=int, metavar="N")
    collective_timeout: int | None = dial(None, "a rank silent this long (dead, hung) ends the job",
                                          group=OVERRIDES, kind=int, metavar="SECONDS")
    max_requeues: int | None = dial(None, "SLURM: times a signalled job requeues itself before it stops "
                                    "with its checkpoint", group=OVERRIDES, kind=int)
    # The objective's own options given, by name (engine/objectives/base.Option): their flags
    # come from the objectives' declarations; an option the method does not declare is refused.
    objective_options: dict = dataclasses.field(default_factory=dict)


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


_OPTION_DEST = "objective_option__"   # argparse dest prefix of the objectives' own options


def add_dial_arguments(parser: argparse.ArgumentParser, method: str | None) -> None:
    """Every dial as a flag, in groups, then the options declared by the registered methods
    and by `method` (a plug-in given as package.module:Class)."""
    groups = {DIALS: parser.add_argument_group(DIALS)}
    for field in dataclasses.fields(Dials):
        if "flag" not in field.metadata:
            continue
        spec = field.metadata["flag"]
        if spec["group"] not in groups:
            groups[spec["group"]] = parser.add_argument_group(spec["group"])
        help_text = spec["help"].format(methods=" | ".join(method_names()), default=field.default) or None
        flag, common = spec["flag"] or flag_name(field.name), {"dest": field.name, "help": help_text}
        if spec["switch"]:
            groups[spec["group"]].add_argument(flag, action=argparse.BooleanOptionalAction,
                                               default=field.default, **common)
        elif spec["repeatable"]:
            groups[spec["group"]].add_argument(flag, action="append", default=[], metavar=spec["metavar"], **common)
        else:
            groups[spec["group"]].add_argument(flag, type=spec["kind"], default=field.default,
                                               choices=spec["choices"], metavar=spec["metavar"], **common)
    options = parser.add_argument_group(OBJECTIVE_OPTIONS)
    for name, (option, owners) in declared_dials(method).items():
        options.add_argument(flag_name(name), dest=_OPTION_DEST + name,
                             metavar=(option.kind.__name__.upper() if option.choices is None
                                      else "{" + ",".join(map(str, option.choices)) + "}"),
                             help=f"{', '.join(owners)}: {option.help}")


def dials_from_args(args: argparse.Namespace) -> Dials:
    """The Dials a parser built by add_dial_arguments read."""
    given = {}
    for field in dataclasses.fields(Dials):
        if "flag" in field.metadata:
            value = getattr(args, field.name)
            given[field.name] = tuple(value) if field.metadata["flag"]["repeatable"] else value
    options = {key[len(_OPTION_DEST):]: value for key, value in vars(args).items()
               if key.startswith(_OPTION_DEST) and value is not None}
    return Dials(**given, objective_options=options)


def method_in(argv) -> str:
    """--method alone, read before the full parser is built (its options depend on it)."""
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--method", default=DEFAULT_METHOD)
    return early.parse_known_args(argv)[0].method

