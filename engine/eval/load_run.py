"""A trained model back from a run directory or one checkpoint, on one process, without
DeepSpeed's engine: for `launchers/evaluate.py`.

The plan the run wrote (plan.json) says what was built (method, model preset, text depth); the
model is rebuilt the way engine/training_run.py builds it and given the checkpoint's weights. Only
the `TwoTower` is kept: everything evaluation compares lives there (CLIP-Lite's critic
projections and temperature included, engine/models/heads.py); what the objective owns beside
it (DeCLIP's heads and queue, CLIP-Lite's prior discriminators) serves only the loss.

Weights come from the fp32 master copy where ZeRO partitioned the optimizer (stage 1-3: the
module file of a ZeRO-3 checkpoint holds no weights, and under bf16/fp16 the module file of
stage 1/2 holds the rounded working copy), read whole by engine/train/reshard.py; without ZeRO,
DeepSpeed's module file holds the whole module.
"""
from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from engine.data.text import ClipTokenizer, strip_punctuation
from engine.errors import UserError
from engine.models.presets import ModelPreset
from engine.models.two_tower import TwoTower
from engine.objectives.method import Method, lookup
from engine.store import ObjectStore, is_url, local_name
from engine.train import checkpoint, reshard
from engine.train.run_store import pull_checkpoint, pull_run_files

_MODULE_FILE = "mp_rank_00_model_states.pt"   # DeepSpeed's whole-module file (no ZeRO-3)
_MODEL_PREFIX = "model."                      # the TwoTower inside model_with_loss.ModelWithLoss
_STEP = re.compile(r"step(\d{8})")


@dataclass(frozen=True)
class LoadedRun:
    model: TwoTower                    # eval mode, on the requested device, fp32
    tokenizer: ClipTokenizer
    clean_text: Callable[[str], str] | None   # the caption cleaning training applied (CLIP-Lite)
    plan: dict
    run_dir: Path
    checkpoint: Path                   # the checkpoint folder the weights came from
    step: int
    image_size: int
    preset: ModelPreset | None = None  # the architecture the model was built from (export)
    url: str | None = None             # a run in an object store: run_dir is its local copy


def find_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """(run directory, checkpoint folder) for a run directory (its newest intact checkpoint),
    its checkpoints/ folder, or one checkpoint folder (stepNNNNNNNN); or a run at a URL (--out
    s3://...), copied first."""
    if is_url(path):
        return _copy_from_store(str(path))
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist: give a run directory (runs/<run>) or one of its "
                        f"checkpoints (runs/<run>/checkpoints/stepNNNNNNNN)")
    if path.name == "checkpoints" and (path.parent / "plan.json").exists():
        path = path.parent
    if (path / "plan.json").exists():
        return path, _newest_intact(path / "checkpoints")
    if _STEP.fullmatch(path.name) and (path.parent.parent / "plan.json").exists():
        problem = checkpoint.damage(path, 0, 1)
        if problem is not None:
            raise UserError(f"checkpoint {path} is damaged ({problem}): give its run directory to use the "
                            f"newest intact checkpoint, or another checkpoint")
        return path.parent.parent, path
    raise UserError(f"{path} is neither a run directory (no plan.json) nor a checkpoint folder inside one "
                    f"(<run>/checkpoints/stepNNNNNNNN)")


def _copy_from_store(url: str) -> tuple[Path, Path]:
    """A run in an object store: its plan and newest intact checkpoint copied to a local folder
    of their own (not a training's staging folder, which a run on this machine may be using)."""
    folder = Path(tempfile.gettempdir()) / "clipzero-read" / local_name(url)
    store = ObjectStore(url, folder)
    pull_run_files(store)
    if not (folder / "plan.json").exists():
        raise UserError(f"{url} holds no run (no plan.json): give the --out URL of a training run")
    tag = pull_checkpoint(store)
    if tag is None:
        raise UserError(f"{url} has no complete checkpoint yet: evaluate it after its first checkpoint reached the store")
    return folder, folder / "checkpoints" / tag


def _newest_intact(checkpoint_dir: Path) -> Path:
    # The resume's own order (`latest`, then older completed ones), but read-only: evaluating
    # must not set a damaged checkpoint aside under a run that may still be training.
    candidates = checkpoint.restore_order(checkpoint_dir)
    if not candidates:
        raise UserError(f"{checkpoint_dir.parent} has no checkpoint yet (no {checkpoint_dir / 'latest'}): "
                        f"evaluate it after its first checkpoint is written")
    problems = []
    for tag in candidates:
        problem = checkpoint.damage(checkpoint_dir / tag, 0, 1)
        if problem is None:
            if problems:
                print(f"warning: skipped damaged checkpoint(s): {'; '.join(problems)}", flush=True)
            return checkpoint_dir / tag
        problems.append(f"{tag}: {problem}")
    raise UserError(f"no intact checkpoint in {checkpoint_dir} ({'; '.join(problems)})")


def module_state(folder: Path) -> dict[str, torch.Tensor]:
    """The whole module's parameters and buffers (names as in model_with_loss.ModelWithLoss),
    fp32 masters where ZeRO kept them."""
    if reshard.has_zero_shards(folder):
        full = reshard.read_full_state(folder)
        return {**{name: entry["fp32"] for name, entry in full["params"].items()}, **full["frozen"],
                **full["buffers"]}
    path = folder / _MODULE_FILE
    if not path.exists():
        raise UserError(f"{folder} holds neither ZeRO shards nor {_MODULE_FILE}: not a clipzero checkpoint")
    return torch.load(path, map_location="cpu", weights_only=False)["module"]


def method_of(plan: dict) -> Method:
    """The method of a saved plan, as engine/training_run.py looked it up: its towers, its captions."""
    return lookup(plan["method"], plan["model"], plan.get("text_layers"))


def build_model(plan: dict, method: Method | None = None) -> tuple[TwoTower, ClipTokenizer]:
    """The TwoTower engine/training_run.py built for this plan (random weights)."""
    preset = (method or method_of(plan)).preset
    tokenizer = ClipTokenizer(preset.context_length)
    return TwoTower(preset, tokenizer.eot_id, tokenizer.sot_id), tokenizer


def load_run(path: str | Path, device: torch.device | str = "cpu") -> LoadedRun:
    run_dir, folder = find_checkpoint(path)
    plan = json.loads((run_dir / "plan.json").read_text())
    method = method_of(plan)
    model, tokenizer = build_model(plan, method)
    state = module_state(folder)
    expected = model.state_dict()
    weights = {name[len(_MODEL_PREFIX):]: value for name, value in state.items()
               if name.startswith(_MODEL_PREFIX) and name[len(_MODEL_PREFIX):] in expected}
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise UserError(f"{folder} does not fit the model its plan describes (method {plan['method']}, model "
                        f"{plan['model']}): {len(missing)} tensor(s) missing, e.g. {missing[:3]}")
    wrong = [n for n, v in weights.items() if tuple(v.shape) != tuple(expected[n].shape)]
    if wrong:
        raise UserError(f"{folder} does not fit the model its plan describes: shape of {wrong[0]} is "
                        f"{tuple(weights[wrong[0]].shape)}, the model's {tuple(expected[wrong[0]].shape)}")
    # Weights may be bf16/fp16 (a module file of a mixed-precision run): evaluate in fp32.
    model.load_state_dict({n: v.to(expected[n].dtype) for n, v in weights.items()})
    model.to(device).eval()
    clean = strip_punctuation if method.data.strip_punctuation else None
    match = _STEP.fullmatch(folder.name)
    return LoadedRun(model, tokenizer, clean, plan, run_dir, folder,
                     int(match.group(1)) if match else -1, int(plan["image_size"]), method.preset,
                     str(path) if is_url(path) else None)
