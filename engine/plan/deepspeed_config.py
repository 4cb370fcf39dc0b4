"""RunPlan -> DeepSpeed config dict, and raw `--ds key.path=value` overrides of it.

The only module in the project that knows DeepSpeed's key names. Overrides are checked
before any work: unknown keys (against the keys DeepSpeed's own parser reads, and the
fields of its pydantic section models), wrong types, and values that would contradict a
decision the plan owns all fail with a message naming what to change. The rendered config
has no "optimizer" or "scheduler" section: the engine hands its own optimizer and LR
schedule to deepspeed.initialize.

    config = apply_overrides(render(plan), ["zero_optimization.reduce_bucket_size=5e7"],
                             world_size=plan.world_size)
"""
import copy
import difflib
import functools
import json
import typing
from collections.abc import Sequence

import deepspeed.runtime.constants as constants
from deepspeed.comm.config import CommsLoggerConfig
from deepspeed.compile.config import CompileConfig
from deepspeed.monitor.config import DeepSpeedMonitorConfig
from deepspeed.runtime.config import DeepSpeedConfig, DeepSpeedConfigError, HybridEngineConfig
from deepspeed.runtime.precision_config import BFLOAT16, BFLOAT16_OLD, FP16, DeepSpeedBF16Config, DeepSpeedFP16Config
from deepspeed.runtime.tensor_parallel.config import TPTrainingConfig
from deepspeed.runtime.zero.config import ZERO_OPTIMIZATION, DeepSpeedZeroConfig
from pydantic import BaseModel, ValidationError

from engine.errors import UserError
from engine.plan.precision import towers_autocast

if typing.TYPE_CHECKING:  # engine.plan reads fp16_scale_search_steps() from here
    from engine.plan.resolve import RunPlan

# DeepSpeed prints a progress line every `steps_per_print` steps; the engine logs its own.
_STEPS_PER_PRINT_NEVER = 2**31 - 1
# Dynamic loss scaling for fp16: loss_scale 0 selects it; start at 2^16 (torch GradScaler's
# start too), halve after `hysteresis` overflowing steps, double after `loss_scale_window`
# clean ones, and never go below 1.
_FP16_DYNAMIC_LOSS_SCALE = {"loss_scale": 0, "initial_scale_power": 16,
                            "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
_DIAL_FOR_SECTION = {"optimizer": "--optimizer and --lr", "scheduler": "--lr and --warmup-steps"}


def fp16_scale_search_steps() -> int:
    """Overflowing steps fp16's dynamic loss scale may skip while it comes down from its start
    to 1 (each halving waits for `hysteresis` overflows)."""
    return _FP16_DYNAMIC_LOSS_SCALE["initial_scale_power"] * _FP16_DYNAMIC_LOSS_SCALE["hysteresis"]


def render(plan: "RunPlan") -> dict:
    zero = {"stage": plan.zero_stage}
    if plan.zero_stage >= 2:
        # Gradients copied into one buffer as they are produced: no fragmentation when
        # they are partitioned.
        zero["contiguous_gradients"] = True
    if plan.zero_stage >= 1:
        # Overlapping the gradient reduction with the backward pass pays off only when
        # there is communication; on one rank it would just hold extra buffers.
        zero["overlap_comm"] = plan.accelerator == "cuda" and plan.world_size > 1
    if plan.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    config = {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
        # DeepSpeed clips at norm 1.0 unless told 0.
        "gradient_clipping": plan.grad_clip if plan.grad_clip is not None else 0.0,
        "zero_optimization": zero,
        "steps_per_print": _STEPS_PER_PRINT_NEVER,
        "wall_clock_breakdown": False,
    }
    if plan.optimizer == "sgd_lookahead" and plan.zero_stage >= 1:
        # DeepSpeed's ZeRO optimizers refuse client optimizers outside its tested list unless
        # told; SGD + Lookahead under ZeRO 1-3 is tested in tests/unit/test_lookahead.py.
        config["zero_allow_untested_optimizer"] = True
    # bf16 without ZeRO is an fp32 engine: the model runs its towers under bf16 autocast itself.
    if plan.precision == "bf16" and not towers_autocast(plan.precision, plan.zero_stage):
        config["bf16"] = {"enabled": True}
        if plan.grad_dtype == "fp32":
            # Gradients accumulated and all-reduced / reduce-scattered in fp32 (engine/plan/precision.py).
            # At ZeRO-1 this makes DeepSpeed step with its BF16_Optimizer rather than ZeRO's.
            config["data_types"] = {"grad_accum_dtype": "fp32"}
            config["communication_data_type"] = "fp32"
    elif plan.precision == "fp16":
        config["fp16"] = {"enabled": True, **_FP16_DYNAMIC_LOSS_SCALE}
    return config


def apply_overrides(config: dict, overrides: Sequence[str], *, world_size: int) -> dict:
    """A copy of `config` with each "a.b.c=value" applied; raises UserError on any bad one."""
    assignments = [assignment for text in overrides for assignment in _parse(text)]
    for path, value in assignments:
        _check_key(path, value)
    result = copy.deepcopy(config)
    for path, value in assignments:
        _assign(result, path, value)
    _check_plan_owned(config, result, world_size)
    _check_with_deepspeed(result)
    return result


def _parse(text: str) -> list[tuple[tuple[str, ...], object]]:
    """"a.b=1" -> [(("a", "b"), 1)]; a JSON object value becomes one assignment per leaf."""
    key, sep, raw = text.partition("=")
    path = tuple(key.strip().split("."))
    if not sep or not all(path):
        raise UserError(f"--ds {text!r}: write key.path=value, e.g. --ds gradient_clipping=0.5")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw            # a bare word is a string: --ds checkpoint.tag_validation=Fail

    def leaves(prefix, node):
        if isinstance(node, dict) and node:
            return [leaf for k, v in node.items() for leaf in leaves(prefix + (k,), v)]
        return [(prefix, node)]
    return leaves(path, value)


def _dotted(path: Sequence[str]) -> str:
    return ".".join(path)


def _unknown(path: tuple[str, ...], known) -> UserError:
    where = f" in {_dotted(path[:-1])}" if len(path) > 1 else ""
    close = difflib.get_close_matches(path[-1], sorted(known), n=3)
    hint = (f"did you mean {' or '.join(_dotted(path[:-1] + (c,)) for c in close)}?" if close
            else "see https://www.deepspeed.ai/docs/config-json/")
    return UserError(f"--ds {_dotted(path)}: DeepSpeed has no key {path[-1]!r}{where}: {hint}")


def _check_key(path: tuple[str, ...], value) -> None:
    top = path[0]
    if top in _DIAL_FOR_SECTION:
        raise UserError(f"--ds {_dotted(path)}: the engine builds its own optimizer and LR "
                        f"schedule; use {_DIAL_FOR_SECTION[top]} instead")
    if top not in _top_level_keys():
        raise _unknown(path, _top_level_keys())
    model = _section_models().get(top)
    expected = _top_level_types().get(top)
    if model is not None:
        if len(path) == 1 and not isinstance(value, dict):
            raise UserError(f"--ds {top}: it is a section; set its keys, e.g. --ds {top}.KEY=VALUE")
        _check_model_path(model, path, 1)
    elif expected is not None:
        if len(path) > 1:
            raise UserError(f"--ds {_dotted(path)}: {top} is a single value, not a section")
        if not _is_instance(value, expected):
            raise UserError(f"--ds {top}={json.dumps(value)}: expected a {expected.__name__}")


def _check_model_path(model: type[BaseModel], path: tuple[str, ...], depth: int) -> None:
    """Walk path[depth:] through a pydantic section model's fields (names and aliases)."""
    if depth == len(path):
        return
    fields = {}
    for name, field in model.model_fields.items():
        fields[name] = field
        if field.alias:
            fields[field.alias] = field
    if path[depth] not in fields:
        raise _unknown(path[:depth + 1], fields)
    annotation = fields[path[depth]].annotation
    submodel = _model_in(annotation)
    if submodel is not None:
        _check_model_path(submodel, path, depth + 1)
    elif depth + 1 < len(path) and typing.get_origin(annotation) is not dict and annotation is not dict:
        raise UserError(f"--ds {_dotted(path)}: {_dotted(path[:depth + 1])} is a single value, "
                        "not a section")


def _model_in(annotation) -> type[BaseModel] | None:
    """The pydantic model in an annotation such as `Optional[DeepSpeedZeroOffloadParamConfig]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _is_instance(value, expected: type) -> bool:
    if expected is bool or isinstance(value, bool):
        return expected is bool and isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float))
    return isinstance(value, expected)


def _assign(config: dict, path: tuple[str, ...], value) -> None:
    node = config
    for depth, key in enumerate(path[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise UserError(f"--ds {_dotted(path)}: {_dotted(path[:depth + 1])} holds a value "
                            f"({json.dumps(child)}), not a section")
        node = child
    if value == {} and isinstance(node.get(path[-1]), dict):
        return                 # "section={}" only makes sure the section exists
    node[path[-1]] = value


def _check_plan_owned(before: dict, after: dict, world_size: int) -> None:
    """Keys that restate a plan decision may only agree with it: the data loader, the
    precision casts and the checkpoint layout follow the plan, not the DeepSpeed config."""
    batch = [after.get(key) for key in _BATCH_KEYS]
    for key, value in zip(_BATCH_KEYS, batch):
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise UserError(f"--ds {key}={json.dumps(value)}: must be a positive integer; "
                            "set the batch with --global-batch / --micro-batch")
    train, micro, accum = batch
    if train != micro * accum * world_size:
        raise UserError(f"--ds batch keys contradict each other: train_batch_size {train} != "
                        f"train_micro_batch_size_per_gpu {micro} x gradient_accumulation_steps "
                        f"{accum} x {world_size} ranks: set the batch with --global-batch / "
                        "--micro-batch instead")
    if batch != [before.get(key) for key in _BATCH_KEYS]:
        raise UserError("--ds batch keys differ from the plan, which the data loader follows: "
                        "set the batch with --global-batch / --micro-batch instead")
    if _precision(after) != _precision(before):
        raise UserError(f"--ds makes the precision {_precision(after)} but the plan trains in "
                        f"{_precision(before)}: use --precision instead")
    stage_before, stage_after = _zero_stage(before), _zero_stage(after)
    if stage_after != stage_before:
        raise UserError(f"--ds zero_optimization.stage={stage_after}: the plan chose stage "
                        f"{stage_before}; use --zero-stage {stage_after} instead")
    if _offloads(after, "offload_optimizer") != _offloads(before, "offload_optimizer"):
        raise UserError("--ds zero_optimization.offload_optimizer changes whether Adam states "
                        "are offloaded, which picks the optimizer: use --offload true/false instead")
    if _offloads(after, "offload_optimizer") and stage_after == 0:
        raise UserError("optimizer offload needs ZeRO stage 1 or more: use --zero-stage 1")
    if _offloads(after, "offload_param") and stage_after != 3:
        raise UserError(f"--ds zero_optimization.offload_param needs ZeRO stage 3, the plan has "
                        f"stage {stage_after}: add --zero-stage 3")


def _precision(config: dict) -> str:
    enabled = [name for name, section in (("bf16", config.get("bf16", config.get("bfloat16"))),
                                          ("fp16", config.get("fp16")))
               if (section or {}).get("enabled")]
    return "+".join(enabled) or "fp32"


def _zero_stage(config: dict):
    return (config.get("zero_optimization") or {}).get("stage", 0)


def _offloads(config: dict, section: str) -> bool:
    offload = (config.get("zero_optimization") or {}).get(section) or {}
    return offload.get("device", "none") not in ("none", None)


def _check_with_deepspeed(config: dict) -> None:
    """Let DeepSpeed's own parser judge every value (types, ranges, removed features)."""
    # DeepSpeed checks train_batch_size against the current process group, which may not
    # exist yet; the batch arithmetic was checked against the real world size above.
    world_size_free = {k: v for k, v in config.items() if k != "train_batch_size"}
    try:
        DeepSpeedConfig(world_size_free)
    except ValidationError as error:
        problems = "; ".join(f"{_dotted(map(str, e['loc']))}: {e['msg']} (got {e['input']!r})"
                             for e in error.errors())
        raise UserError(f"--ds: DeepSpeed's {error.title} rejects {problems}") from None
    except (ValueError, TypeError, AttributeError, KeyError, AssertionError,
            DeepSpeedConfigError) as error:
        raise UserError(f"--ds: DeepSpeed rejects the resulting config: {error}") from None


class _KeyRecorder(dict):
    """A config dict that notes every top-level key DeepSpeed's parser asks for."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.asked: set[str] = set()

    def get(self, key, default=None):
        self.asked.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.asked.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.asked.add(key)
        return super().__contains__(key)

    def keys(self):
        return self            # `key in config.keys()` then goes through __contains__


@functools.cache
def _top_level_keys() -> frozenset[str]:
    """Every top-level key the installed DeepSpeed reads, found by letting it parse a config
    that records its questions: stays right as DeepSpeed adds or removes sections."""
    recorder = _KeyRecorder(train_micro_batch_size_per_gpu=1)
    DeepSpeedConfig(recorder)
    return frozenset(recorder.asked)


@functools.cache
def _top_level_types() -> dict[str, type]:
    """Scalar top-level keys -> the type of DeepSpeed's default (deepspeed.runtime.constants
    pairs each KEY with KEY_DEFAULT)."""
    types = {"steps_per_print": int}
    for name, key in vars(constants).items():
        default = getattr(constants, f"{name}_DEFAULT", None)
        if isinstance(key, str) and key in _top_level_keys() and default is not None:
            types[key] = type(default)
    return types


@functools.cache
def _section_models() -> dict[str, type[BaseModel]]:
    """Top-level sections that DeepSpeed parses with a pydantic model (which forbids
    unknown fields), so nested keys can be checked and misspellings suggested."""
    models = {ZERO_OPTIMIZATION: DeepSpeedZeroConfig, BFLOAT16: DeepSpeedBF16Config,
              BFLOAT16_OLD: DeepSpeedBF16Config, FP16: DeepSpeedFP16Config,
              "comms_logger": CommsLoggerConfig, "compile": CompileConfig,
              "hybrid_engine": HybridEngineConfig, "tensor_parallel": TPTrainingConfig}
    # tensorboard, wandb, csv_monitor, comet: each a field of DeepSpeed's monitor model.
    for name, field in DeepSpeedMonitorConfig.model_fields.items():
        models[name] = _model_in(field.annotation)
    return models
