"""Resume a ZeRO checkpoint on another number of ranks: read the whole state from the files
DeepSpeed wrote, then give each new rank its share.

DeepSpeed refuses to load a ZeRO checkpoint on another data-parallel world size, and its
universal checkpoint was measured wrong here (deepspeed 0.19.8, CPU): under ZeRO-3 it gave
every parameter group the first group's weight decay and one shared Adam `step` counted once
per group (final weights off by 3e-3 after 4 steps), it never restores buffers, and it cannot
convert a non-Adam optimizer state (SGD + Lookahead: KeyError 'exp_avg'). This module needs
no conversion step and restores, bit for bit, the fp32 weights, every per-element optimizer
state (Adam moments, momentum, Lookahead's slow weights), the per-group counters and
hyperparameters, the LR scheduler, DeepSpeed's step counters and the module's buffers, at
ZeRO 1, 2 and 3, from N ranks to M, and between ZeRO and none (the planner runs one rank in
fp32 without ZeRO, engine/plan/memory.py: such a run grown to more ranks, or an older ZeRO-1
run of one rank, crosses over).

bf16 runs at ZeRO 1-3 are read and written the same way: their shards are DeepSpeed's
`bf16_zero_pp_rank_*` files (ZeRO-1 with fp32 gradient accumulation is its BF16_Optimizer,
2 and 3 its ZeRO optimizers), holding the same fp32 master weights and states. What is read
is precision-free, so a checkpoint also crosses between fp32 and bf16 (a CPU run resumed on a
GPU), the loss scale excepted: it stays the engine's own. bf16 without ZeRO trains fp32 weights
under autocast (engine/plan/precision.py), so its checkpoints are fp32 ones. fp16 without ZeRO
is refused both ways: DeepSpeed's wrapper keeps the fp32 weights in its own state, which this
module does not read or fill (DeepSpeed's own loader resumes it on any number of ranks at ZeRO 0).

It reads DeepSpeed's file layout and sets state through a few of its internals (named where
used); setup.py pins deepspeed to the 0.19 series, and tests/unit/test_reshard.py checks
every stage and both directions, in fp32 and bf16, against an uninterrupted run.
"""
import math
import re
from collections import OrderedDict
from pathlib import Path

import torch
import torch.distributed as torch_dist

from engine.errors import UserError

_STAGE3_MODEL = "zero_pp_rank_0_mp_rank_00_model_states.pt"
_MODEL = "mp_rank_00_model_states.pt"
# Without ZeRO, DeepSpeed saves the client optimizer's torch state_dict, which numbers the
# parameters; the checkpoint also keeps their names, group by group, under this key.
OPTIMIZER_PARAM_NAMES = "optimizer_param_names"


def _load(path: Path) -> dict:
    # mmap: each rank reads only the pages it narrows out.
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


# A bf16 engine prefixes its shards with bf16_ (DeepSpeed's engine._get_zero_ckpt_prefix).
_OPTIM_FILE = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt")


def _optim_files(folder: Path) -> list[Path]:
    ranked = [(int(match.group(1)), path) for path in folder.glob("*zero_pp_rank_*_optim_states.pt")
              if (match := _OPTIM_FILE.fullmatch(path.name))]
    return [path for _, path in sorted(ranked)]


def has_zero_shards(folder: Path) -> bool:
    """Whether the checkpoint's optimizer states are partitioned over its ranks (ZeRO >= 1)."""
    return bool(_optim_files(folder))


def is_stage3(folder: Path) -> bool:
    return (folder / _STAGE3_MODEL).exists()


def saved_weight_dtype(folder: Path) -> torch.dtype:
    """The dtype the checkpoint's run trained its weights in (bf16, fp16 or fp32)."""
    return _weight_dtype(_load(folder / (_STAGE3_MODEL if is_stage3(folder) else _MODEL)))


def _weight_dtype(model_states: dict) -> torch.dtype:
    # The module file keeps the working weights' dtype (ZeRO-3's as empty placeholders); buffers
    # are left out, as DeepSpeed leaves them in fp32 (and the task may cast them).
    buffers = set(model_states.get("buffer_names", []))
    return _lowest({v.dtype for name, v in model_states["module"].items() if name not in buffers})


def weight_dtype(engine) -> torch.dtype:
    """The dtype the engine trains its weights in, as saved_weight_dtype reads it back."""
    return _lowest({p.dtype for p in engine.module.parameters()})


def _lowest(dtypes: set) -> torch.dtype:
    # DeepSpeed casts every parameter, but a model that kept one in fp32 is still a bf16 run.
    return next((d for d in (torch.bfloat16, torch.float16) if d in dtypes), torch.float32)


def optimizer_param_names(engine) -> dict:
    """What checkpoint.save adds without ZeRO: {OPTIMIZER_PARAM_NAMES: names per optimizer
    group}. Empty under ZeRO (its files name the parameters) and where DeepSpeed's fp16/bf16
    wrapper steps fp32 copies instead of the module's parameters (not resharded)."""
    if engine.zero_optimization_stage() > 0:
        return {}
    names = {id(p): name for name, p in engine.module.named_parameters()}
    groups = [[names.get(id(p)) for p in group["params"]] for group in engine.optimizer.param_groups]
    return {} if any(None in group for group in groups) else {OPTIMIZER_PARAM_NAMES: groups}


def read_full_state(folder: Path) -> dict:
    """Everything a resume needs, whole and keyed by parameter name, rebuilt without an engine
    or a collective from a checkpoint written by any number of ranks at ZeRO 0, 1, 2 or 3."""
    if not has_zero_shards(folder):
        return _read_unpartitioned(folder)
    optim_files = _optim_files(folder)
    ranks = len(optim_files)
    stage3 = is_stage3(folder)
    model_states = _load(folder / (_STAGE3_MODEL if stage3 else _MODEL))
    if model_states["dp_world_size"] != ranks:
        raise UserError(f"{folder} holds optimizer shards of {ranks} rank(s) but was written by "
                        f"{model_states['dp_world_size']}: the checkpoint is incomplete")
    shapes = model_states["param_shapes"]  # [{name: shape}] per (sub-)group, in flat order
    fragments: dict[str, dict[str, list[torch.Tensor]]] = {}
    scalars, param_groups, tensor_keys, zero_global = {}, None, set(), None
    for rank, path in enumerate(optim_files):
        shard = _load(path)
        saved = shard["optimizer_state_dict"]
        if stage3:
            torch_state, flats = saved["optimizer_state_dict"], saved["fp32_flat_groups"]
        else:
            torch_state, flats = saved["base_optimizer_state"], saved["single_partition_of_fp32_groups"]
            if not isinstance(torch_state, dict):
                raise UserError(f"{folder} was written with zero_optimization.elastic_checkpoint; "
                                "resume it on the same number of ranks")
        if rank == 0:  # what DeepSpeed's own loader restores beside the states (fp16's loss scale)
            zero_global = {k: saved[k] for k in ("loss_scaler", "dynamic_loss_scale", "overflow",
                                                 "clip_grad", "ds_version") if k in saved}
            zero_global.setdefault("ds_version", shard.get("ds_version"))
        param_groups = [{k: v for k, v in g.items() if k != "params"} for g in torch_state["param_groups"]]
        group_of = {i: g for g, group in enumerate(torch_state["param_groups"]) for i in group["params"]}
        for index, flat in enumerate(flats):
            state = torch_state["state"].get(index, {})
            per_element = {k: v for k, v in state.items() if torch.is_tensor(v) and v.dim() > 0}
            tensor_keys.update(per_element)
            counters = {k: v for k, v in state.items() if k not in per_element}
            if counters:
                scalars.setdefault(group_of[index], counters)
            for name, start, length in _slices(saved, shapes, index, rank, ranks, stage3):
                for key, tensor in (("fp32", flat), *per_element.items()):
                    fragments.setdefault(name, {}).setdefault(key, []).append(tensor.narrow(0, start, length))
    params = OrderedDict()
    for group in shapes:
        for name, shape in group.items():
            params[name] = {k: torch.cat(parts).view(shape).detach().clone() for k, parts in fragments[name].items()}
    return {"params": params, "tensor_keys": sorted(tensor_keys), "scalars": scalars,
            "param_groups": param_groups, "lr_scheduler": model_states["lr_scheduler"],
            "global_steps": model_states["global_steps"],
            "global_samples": model_states.get("global_samples"),
            "skipped_steps": model_states["skipped_steps"],
            "buffers": {n: model_states["module"][n] for n in model_states.get("buffer_names", [])},
            "frozen": _frozen_params(folder, model_states, ranks, stage3),
            "client_state": {k: model_states[k] for k in ("step", "eval_pending") if k in model_states},
            "zero_global": zero_global, "saved_ranks": ranks, "weight_dtype": _weight_dtype(model_states)}


def _frozen_params(folder: Path, model_states: dict, ranks: int, stage3: bool) -> dict[str, torch.Tensor]:
    """The parameters no optimizer owns (--lock's), whole, in the weights' dtype. ZeRO-1/2 keep
    them in the module file; ZeRO-3 gives each rank's partition in its own model file."""
    shapes = model_states.get("frozen_param_shapes") or {}
    if not stage3:
        owned = {name for group in model_states["param_shapes"] for name in group}
        buffers = set(model_states.get("buffer_names", []))
        return {n: t for n, t in model_states["module"].items() if n not in owned and n not in buffers}
    parts = [_load(folder / _STAGE3_MODEL.replace("rank_0_", f"rank_{rank}_"))["frozen_param_fragments"] or {}
             for rank in range(ranks)] if shapes else []
    return {name: torch.cat([p[name].reshape(-1) for p in parts])[:math.prod(shape)].view(tuple(shape)).clone()
            for name, shape in shapes.items()}


def _read_unpartitioned(folder: Path) -> dict:
    """read_full_state of a checkpoint without ZeRO: the module file holds the whole weights and
    the client optimizer's state, per parameter."""
    model_states = _load(folder / _MODEL)
    names, optimizer = model_states.get(OPTIMIZER_PARAM_NAMES), model_states.get("optimizer")
    if names is None or optimizer is None:
        precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(_weight_dtype(model_states))
        if precision == "bf16":  # clipzero trains bf16 without ZeRO as fp32 weights under autocast now
            raise UserError(f"{folder} was written without ZeRO in bf16 by an older clipzero, whose fp32 "
                            "weights DeepSpeed kept inside its optimizer wrapper: this clipzero cannot read "
                            "them; continue the run with the clipzero that wrote it, or start it again")
        why = (f"in {precision}, whose fp32 weights DeepSpeed keeps inside its optimizer wrapper"
               if precision else "by an older clipzero, which did not name the optimizer's parameters")
        raise UserError(f"{folder} was written without ZeRO {why}: resharding cannot read it; resume it "
                        f"with --zero-stage 0{f' --precision {precision}' if precision else ''} "
                        "(on any number of ranks: DeepSpeed's own loader reads it whole)")
    module = model_states["module"]
    params, scalars, tensor_keys = OrderedDict(), {}, set()
    for group_index, (group, group_names) in enumerate(zip(optimizer["param_groups"], names)):
        for index, name in zip(group["params"], group_names):
            state = optimizer["state"].get(index, {})
            per_element = {k: v for k, v in state.items() if torch.is_tensor(v) and v.dim() > 0}
            tensor_keys.update(per_element)
            counters = {k: v for k, v in state.items() if k not in per_element}
            if counters:
                scalars.setdefault(group_index, counters)
            params[name] = {"fp32": module[name].detach().clone(),
                            **{k: v.detach().clone() for k, v in per_element.items()}}
    for entry in params.values():  # a parameter that never had a gradient has no state yet
        for key in tensor_keys - entry.keys():
            entry[key] = torch.zeros_like(entry["fp32"])
    return {"params": params, "tensor_keys": sorted(tensor_keys), "scalars": scalars,
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in optimizer["param_groups"]],
            "lr_scheduler": model_states["lr_scheduler"], "global_steps": model_states["global_steps"],
            "global_samples": model_states.get("global_samples"), "skipped_steps": model_states["skipped_steps"],
            "buffers": {n: model_states["module"][n] for n in model_states.get("buffer_names", [])},
            "frozen": {n: t for n, t in module.items() if n not in params
                       and n not in model_states.get("buffer_names", [])},
            "client_state": {k: model_states[k] for k in ("step", "eval_pending") if k in model_states},
            "zero_global": None, "saved_ranks": model_states["dp_world_size"],
            "weight_dtype": _weight_dtype(model_states)}


def _slices(saved: dict, shapes: list, index: int, rank: int, ranks: int, stage3: bool):
    """(parameter name, start, length) of each parameter's piece in flat group `index` of
    `rank`'s shard."""
    if not stage3:
        for name, address in saved["param_slice_mappings"][index].items():
            yield name, address.start, address.numel
        return
    # ZeRO-3 gives each parameter ceil(n / ranks) slots in every rank's flat, the last padded.
    offset = 0
    for name, shape in shapes[index].items():
        n = math.prod(shape)
        part = math.ceil(n / ranks)
        yield name, offset, max(0, min(part, n - rank * part))
        offset += part


def apply_full_state(engine, full: dict) -> None:
    """Put `full` (read_full_state) into a freshly initialised engine of any number of ranks,
    with or without ZeRO. Every rank calls it with the same `full`."""
    if engine.zero_optimization_stage() == 0:
        _set_unpartitioned(engine, full)
        groups = engine.optimizer.param_groups
    else:
        _set_partitioned(engine, full)
        groups = engine.optimizer.optimizer.param_groups
        # A loss scale belongs to its precision (fp16's is dynamic): across precisions the engine keeps its own.
        if full["zero_global"] and full["weight_dtype"] == weight_dtype(engine):
            stage3 = engine.zero_optimization_stage() == 3
            zero = engine.optimizer
            (zero._load_global_state_stage3 if stage3 else zero._load_global_state)(full["zero_global"])
    # Hyperparameters (the current LR lives in the groups), scheduler, counters, buffers.
    for group, saved in zip(groups, full["param_groups"]):
        group.update(saved)
    engine.lr_scheduler.load_state_dict(full["lr_scheduler"])
    engine.global_steps = full["global_steps"]
    engine.global_samples = (full["global_samples"] if full["global_samples"] is not None
                             else full["global_steps"] * engine.train_batch_size())
    engine.skipped_steps = full["skipped_steps"]
    with torch.no_grad():
        for name, buffer in engine.module.named_buffers():
            if name in full["buffers"]:
                buffer.copy_(full["buffers"][name].to(buffer.device, buffer.dtype))


def _set_unpartitioned(engine, full: dict) -> None:
    """Weights and optimizer state into an engine without ZeRO, whose client optimizer steps
    the module's own fp32 parameters."""
    if engine.fp16_enabled() or engine.bfloat16_enabled():  # bf16 here only through --ds
        raise UserError("without ZeRO in bf16/fp16, DeepSpeed keeps the fp32 weights inside its optimizer "
                        "wrapper, which resharding does not fill: resume this checkpoint with ZeRO (drop "
                        "--zero-stage 0, or give 1, 2 or 3), or in fp32 (--precision fp32)")
    optimizer = engine.optimizer
    names = {id(p): name for name, p in engine.module.named_parameters()}
    with torch.no_grad():
        for index, group in enumerate(optimizer.param_groups):
            for param in group["params"]:
                entry = full["params"][names[id(param)]]
                param.copy_(entry["fp32"].to(param.device, param.dtype))
                state = optimizer.state[param]
                for key in full["tensor_keys"]:
                    state[key] = entry[key].to(param.device).clone()
                for key, value in full["scalars"].get(index, {}).items():
                    if torch.is_tensor(value):  # torch keeps `step` on the device only when fused/capturable
                        on_device = group.get("fused") or group.get("capturable")
                        value = value.to(param.device if on_device else "cpu")
                    state[key] = value.clone() if torch.is_tensor(value) else value


def _set_partitioned(engine, full: dict) -> None:
    """Weights and optimizer state into a ZeRO engine; ZeRO-1/2 all-gather the working weights."""
    # deferred: DeepSpeed is slow to import, and the evaluator and exporter read checkpoints
    # through this module without it; a ZeRO engine to fill has loaded it already.
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    stage = engine.zero_optimization_stage()
    zero = engine.optimizer
    inner = zero.optimizer  # the client optimizer DeepSpeed steps: AdamW, or SGD in Lookahead
    if stage == 3:  # as DeepSpeed's own load: every parameter partitioned while states change
        zero.checkpoint_event_prologue()
    # 1. The optimizer's state, created the way its first step would, then overwritten below.
    for flat, group in _flat_partitions(engine):
        state = inner.state[flat]
        for key in full["tensor_keys"]:
            state[key] = torch.zeros_like(flat)
        for key, value in full["scalars"].get(group, {}).items():
            state[key] = value.clone() if torch.is_tensor(value) else value  # one per flat
    if stage in (1, 2):  # per-parameter views of that state, otherwise made at the first step
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()
    # 2. fp32 weights and per-element state: each rank narrows out its own piece.
    for name, param in engine.module.named_parameters():
        entry = full["params"][name]
        if stage == 3:
            # safe_set_full_* narrows past the end of a parameter whose size the ranks do not
            # divide (deepspeed 0.19.8): set this rank's padded piece instead.
            _set_local_stage3(param, entry["fp32"], None)
            for key in full["tensor_keys"]:
                _set_local_stage3(param, entry[key], key)
        else:
            safe_set_full_fp32_param(param, entry["fp32"].to(param.device))
            for key in full["tensor_keys"]:
                safe_set_full_optimizer_state(param, entry[key].to(param.device), key)
    # 3. The working weights the forward uses, from the fp32 ones (BF16_Optimizer, ZeRO-1 in bf16,
    # has the ZeRO optimizer's update_lp_params and lazy state linking under the same names).
    if stage in (1, 2):
        zero.update_lp_params()
    else:
        for sub_group in range(len(zero.fp16_groups)):
            zero._reassign_or_swap_out_partitioned_parameters(sub_group)
        # Gathers again the parameters ZeRO-3 keeps whole ("persistent", under its size threshold).
        zero.checkpoint_event_epilogue()


def _flat_partitions(engine) -> list[tuple[torch.Tensor, int]]:
    """(this rank's flat fp32 partition that the client optimizer steps, its param group)."""
    zero = engine.optimizer
    if engine.zero_optimization_stage() == 3:
        return [(flat, zero.sub_group_to_group_id[i]) for i, flat in enumerate(zero.fp32_partitioned_groups_flat)]
    # ZeRO-1 in bf16 with fp32 gradient accumulation is BF16_Optimizer, which names them otherwise.
    flats = getattr(zero, "fp32_groups_flat_partition", None) or zero.single_partition_of_fp32_groups
    return [(flat, i) for i, flat in enumerate(flats)]


def _set_local_stage3(param, full_value: torch.Tensor, key: str | None) -> None:
    # deferred: as in _set_partitioned, DeepSpeed stays out of the evaluator's and exporter's imports.
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

    part = param.ds_tensor.numel()  # ceil(numel / ranks)
    group = getattr(param, "ds_process_group", None)
    rank = torch_dist.get_rank(group=group) if torch_dist.is_initialized() else 0
    flat = full_value.reshape(-1)
    local = torch.zeros(part, dtype=flat.dtype)
    start, stop = rank * part, min(flat.numel(), (rank + 1) * part)
    if stop > start:
        local[:stop - start] = flat[start:stop]
    local = local.to(param.ds_tensor.device)
    if key is None:
        safe_set_local_fp32_param(param, local)
    else:
        safe_set_local_optimizer_state(param, local, key)
