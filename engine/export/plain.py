"""--format safetensors: any model, in our own names. model.safetensors holds the TwoTower's
parameters and buffers as engine/models/two_tower.py names them; model_card.json's
"architecture" is the preset it was built from, so `load_exported(OUT)` rebuilds it:

    from engine.data.text import ClipTokenizer
    from engine.export.plain import exported_preset, load_exported
    model = load_exported("OUT")    # a TwoTower in eval mode
    tokenizer = ClipTokenizer(exported_preset("OUT").context_length)

The towers this format carries may have no counterpart in open_clip or transformers (a timm
ResNet, CLIP-Lite's BERT tower and critic projections); it needs clipzero to read back.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from engine.data.text import ClipTokenizer
from engine.export.verify import Encoders
from engine.models.presets import ModelPreset
from engine.models.two_tower import TwoTower

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model_card.json"


def architecture(preset: ModelPreset) -> dict:
    """The preset as JSON (the card's "architecture"): everything TwoTower is built from."""
    return asdict(preset)


def preset_from(architecture: dict) -> ModelPreset:
    # JSON turns tuples (timm's channel lists) into lists; timm takes either, but the preset is
    # frozen and hashed, so give tuples back.
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in architecture["image_kwargs"].items()}
    return ModelPreset(**{**architecture, "image_kwargs": kwargs})


def write(model: TwoTower, folder: Path) -> None:
    state = {name: tensor.detach().float().contiguous() if tensor.is_floating_point() else tensor.contiguous()
             for name, tensor in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})


def exported_preset(folder: str | Path) -> ModelPreset:
    return preset_from(json.loads((Path(folder) / CARD_FILE).read_text())["architecture"])


def load_exported(folder: str | Path) -> TwoTower:
    preset = exported_preset(folder)
    tokenizer = ClipTokenizer(preset.context_length)
    model = TwoTower(preset, tokenizer.eot_id, tokenizer.sot_id)
    model.load_state_dict(load_file(str(Path(folder) / WEIGHTS_FILE)))  # strict: every tensor or an error
    return model.eval()


def load(folder: Path) -> Encoders:
    model = load_exported(folder)
    tokenizer = ClipTokenizer(exported_preset(folder).context_length)

    def encode_text(captions: list[str]) -> torch.Tensor:
        with torch.no_grad():
            return model.encode_text(tokenizer(captions))

    def encode_image(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model.encode_image(images)

    return Encoders("clipzero (engine.export.plain)", encode_image, encode_text, float(model.scale().detach()))


def how_to_load(out: Path) -> str:
    return (f"from engine.data.text import ClipTokenizer\n"
            f"from engine.export.plain import exported_preset, load_exported\n"
            f"model = load_exported({str(out)!r})   # engine.models.two_tower.TwoTower, eval mode\n"
            f"tokenizer = ClipTokenizer(exported_preset({str(out)!r}).context_length)   # engine.data.text")
