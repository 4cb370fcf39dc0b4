"""--init SOURCE: the weights a run starts from, read from files (never downloaded).

SOURCE is one of
  open_clip   a checkpoint file open_clip writes (training's epoch_N.pt, or a bare state dict in
              .pt/.bin/.safetensors), or a `local-dir:` folder (open_clip_config.json + weights)
  hf          a transformers CLIPModel folder (config.json + model.safetensors or pytorch_model.bin)
  timm        a timm image model's weights (a state dict file): the image tower only
  clipzero    another clipzero run directory (its newest intact checkpoint), or a
              `launchers/export.py --format safetensors` folder, or its model.safetensors

open_clip and hf weights are read through the exporters' own mapping run backwards
(engine/export/openclip.py, hf.py: towers_from_state; clip_layout.load_towers), so that init then
export gives back the same tensors. `check_source` compares every tensor's name and shape with the
model before any work, and names the first mismatch and the preset the source would fit.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from engine.data.text import ClipTokenizer
from engine.errors import UserError
from engine.eval.load_run import load_run
from engine.export import hf, openclip
from engine.export.clip_layout import MAPPED_PRESETS, clip_towers, layout_problem, load_towers
from engine.export.plain import CARD_FILE, WEIGHTS_FILE
from engine.models.presets import PRESETS
from engine.models.two_tower import TwoTower

LOCAL_DIR = "local-dir:"   # open_clip's schema for a folder
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
# Buffers a library may save that the weights do not depend on.
_IGNORED_SUFFIXES = ("position_ids", "attn_mask")


@dataclass(frozen=True)
class InitSource:
    path: str                   # the file or folder the weights are read from
    kind: str                   # "open_clip", "hf", "timm", "clipzero"
    towers: tuple[str, ...]     # what it initialises: ("image", "text") or ("image",)
    detail: str                 # for the plan's reason

    def describe(self) -> str:
        return f"{self.kind} weights for the {' and '.join(self.towers)} tower(s): {self.detail}"


def find_source(given: str) -> InitSource:
    """What `given` is, from its configs and tensor names; UserError if it is none of the kinds."""
    path = Path(given[len(LOCAL_DIR):] if given.startswith(LOCAL_DIR) else given).expanduser().absolute()
    if not path.exists():
        raise UserError(f"--init {given}: no such file or folder; give an open_clip checkpoint or local-dir: "
                        f"folder, a Hugging Face CLIPModel folder, a timm image model's weights, or a clipzero "
                        f"run directory (files only: nothing is downloaded)")
    if path.is_dir():
        return _folder_source(given, path)
    names = _names(path)
    if any(n.startswith("visual.") for n in names):
        return InitSource(str(path), "open_clip", ("image", "text"),
                          "a checkpoint file (its activation is not recorded: clipzero's towers use GELU, as "
                          "open_clip's configs without -quickgelu)")
    if any(n.startswith(("vision_model.", "text_model.")) for n in names):
        return InitSource(str(path), "hf", ("image", "text"), "a CLIPModel state dict file")
    if any(n.startswith("image.trunk.") for n in names):
        return InitSource(str(path), "clipzero", ("image", "text"), "a clipzero model's state dict file")
    return InitSource(str(path), "timm", ("image",), "a timm image model's state dict file")


def _folder_source(given: str, path: Path) -> InitSource:
    if (path / "plan.json").exists() or (path.name == "checkpoints" and (path.parent / "plan.json").exists()):
        return InitSource(str(path), "clipzero", ("image", "text"), "a run directory's newest intact checkpoint")
    if (path / CARD_FILE).exists() and (path / WEIGHTS_FILE).exists():
        return InitSource(str(path), "clipzero", ("image", "text"), "a --format safetensors export")
    if (path / openclip.CONFIG_FILE).exists():
        config = json.loads((path / openclip.CONFIG_FILE).read_text()).get("model_cfg", {})
        if config.get("quick_gelu"):
            raise UserError(f"--init {given}: its towers use QuickGELU (quick_gelu in {openclip.CONFIG_FILE}, as "
                            f"OpenAI's CLIP weights); clipzero's towers use GELU, so these weights would compute "
                            f"other embeddings. Use weights trained with GELU (open_clip's configs without "
                            f"-quickgelu)")
        return InitSource(str(_weights(path, OPEN_CLIP_WEIGHTS, given)), "open_clip", ("image", "text"),
                          f"a local-dir: folder ({openclip.CONFIG_FILE})")
    if (path / "config.json").exists():
        config = json.loads((path / "config.json").read_text())
        if config.get("model_type") != "clip":
            raise UserError(f"--init {given}: config.json describes a {config.get('model_type')!r} model, not a "
                            f"CLIPModel")
        acts = {config.get(part, {}).get("hidden_act", "quick_gelu") for part in ("text_config", "vision_config")}
        if acts != {"gelu"}:
            raise UserError(f"--init {given}: its towers use {' and '.join(sorted(acts))} (config.json); clipzero's "
                            f"towers use GELU, so these weights would compute other embeddings. Use a CLIPModel "
                            f"whose hidden_act is gelu (launchers/export.py --format hf writes one)")
        return InitSource(str(_weights(path, HF_WEIGHTS, given)), "hf", ("image", "text"),
                          "a CLIPModel folder (config.json)")
    raise UserError(f"--init {given}: a folder with none of plan.json (a clipzero run), {CARD_FILE} + "
                    f"{WEIGHTS_FILE} (a clipzero export), {openclip.CONFIG_FILE} (open_clip's local-dir:) or "
                    f"config.json (a Hugging Face CLIPModel)")


def _weights(folder: Path, candidates: tuple[str, ...], given: str) -> Path:
    for name in candidates:
        if (folder / name).exists():
            return folder / name
    raise UserError(f"--init {given}: the folder has none of {', '.join(candidates)}")


def _read(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors or torch file; open_clip's training checkpoint unwrapped
    ({"state_dict": ...}, with DistributedDataParallel's "module." prefix)."""
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:  # weights only: a checkpoint file from elsewhere runs no code here
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # each format raises its own types for a torn or foreign file
        raise UserError(f"--init {path}: cannot read it as safetensors or a torch state dict ({type(error).__name__}: "
                        f"{str(error)[:200]})") from error
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"--init {path}: not a state dict (names -> tensors)")
    if state and all(name.startswith("module.") for name in state):
        state = {name[len("module."):]: tensor for name, tensor in state.items()}
    return {n: t for n, t in state.items() if not n.endswith(_IGNORED_SUFFIXES)}


def _names(path: Path) -> list[str]:
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), "pt") as reader:
                return list(reader.keys())
        except Exception as error:
            raise UserError(f"--init {path}: cannot read it as safetensors ({error})") from error
    return list(_read(path))


def _source_state(source: InitSource) -> dict[str, torch.Tensor]:
    """The source's tensors in its own library's names (ours for clipzero)."""
    path = Path(source.path)
    if source.kind != "clipzero" or path.is_file():
        return _read(path)
    if (path / CARD_FILE).exists():
        return load_file(str(path / WEIGHTS_FILE))
    return load_run(path).model.state_dict()


def _expected(source: InitSource, model: TwoTower) -> dict[str, tuple[int, ...]]:
    """The names and shapes `model` needs from a source of this kind."""
    if source.kind == "clipzero":
        return {n: tuple(t.shape) for n, t in model.state_dict().items()}
    if source.kind == "timm":
        return {n: tuple(t.shape) for n, t in model.image.trunk.state_dict().items()}
    problem = layout_problem(model)
    if problem:
        raise UserError(f"--init {source.path}: {source.kind} weights hold CLIP's native towers, which this --model "
                        f"has not ({problem}); use one of the presets {', '.join(MAPPED_PRESETS)}")
    library = openclip if source.kind == "open_clip" else hf
    return {n: tuple(t.shape) for n, t in library.state_dict(clip_towers(model, source.kind)).items()}


def _first_mismatch(have: dict[str, tuple[int, ...]], want: dict[str, tuple[int, ...]],
                    dropped: frozenset[str] = frozenset()) -> str | None:
    for name, shape in want.items():
        if name not in have:
            return f"{name} is missing from the source"
        if have[name] != shape:
            return f"{name} is {have[name]} in the source, {shape} in this model"
    extra = sorted(set(have) - set(want) - dropped)
    return f"the source has {extra[0]}, which this model has not" if extra else None


def _fitting_presets(source: InitSource, have: dict[str, tuple[int, ...]], dropped: frozenset[str]) -> list[str]:
    fits = []
    for name, preset in PRESETS.items():
        tokenizer = ClipTokenizer(preset.context_length)
        with torch.device("meta"):
            model = TwoTower(preset, tokenizer.eot_id, tokenizer.sot_id)
        try:
            if _first_mismatch(have, _expected(source, model), dropped) is None:
                fits.append(name)
        except UserError:
            continue
    return fits


def check_source(source: InitSource, model: TwoTower, model_name: str) -> None:
    """Refuse, before any work, a source whose tensors are not this model's: the first mismatch,
    and the presets it would fit. `model` may live on the meta device."""
    state = _source_state(source)
    have = {n: tuple(t.shape) for n, t in state.items()}
    dropped = _dropped_head(source, model, have)
    problem = _first_mismatch(have, _expected(source, model), dropped)
    if problem is None:
        return
    fits = _fitting_presets(source, have, dropped)
    if model_name in fits:
        hint = ("it fits the preset, but the --method changes the preset's towers (DeCLIP adds a mask token to the "
                "vocabulary, CLIP-Lite has its own towers): start this method from a run of the same method")
    elif fits:
        hint = f"it fits --model {' or '.join(fits)}"
    else:
        hint = "it fits none of clipzero's presets"
    raise UserError(f"--init {source.path} does not fit --model {model_name}: {problem}; {hint}")


def _dropped_head(source: InitSource, model: TwoTower, have: dict[str, tuple[int, ...]]) -> frozenset[str]:
    """A timm checkpoint's classifier, which the image tower (features into the projection) has not."""
    if source.kind != "timm":
        return frozenset()
    own = set(model.image.trunk.state_dict())
    return frozenset(n for n in have if n not in own and n.split(".")[0] in ("head", "fc", "classifier"))


@torch.no_grad()
def load_source(source: InitSource, model: TwoTower) -> None:
    """Copy the source's weights into `model` (checked by check_source before)."""
    state = _source_state(source)
    if source.kind == "clipzero":
        model.load_state_dict(state)
    elif source.kind == "timm":
        own = model.image.trunk.state_dict()
        model.image.trunk.load_state_dict({n: t for n, t in state.items() if n in own})
    else:
        library = openclip if source.kind == "open_clip" else hf
        load_towers(model, library.towers_from_state(state, clip_towers(model, source.kind)))

