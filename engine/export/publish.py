"""Export a trained TwoTower: write the format into a staging folder beside OUT, load it back
through the target library itself, compare its embeddings with ours (verify.py), and only then
rename the folder to OUT. A failed check leaves no OUT, so a folder at OUT is always one that
loads and agrees.

    formats: hf (transformers CLIPModel), open_clip (local-dir:), safetensors (ours, any model)
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from engine.data.text import ClipTokenizer
from engine.errors import UserError
from engine.export import hf, openclip, plain
from engine.export.clip_layout import clip_towers
from engine.export.verify import Agreement, compare
from engine.models.presets import ModelPreset
from engine.models.two_tower import TwoTower

FORMATS = {"hf": hf, "open_clip": openclip, "safetensors": plain}


class ExportNotVerified(Exception):
    """The export, loaded back, does not embed as the model does: nothing was written to OUT."""

    def __init__(self, message: str, agreement: Agreement | None = None):
        super().__init__(message)
        self.agreement = agreement


@dataclass(frozen=True)
class Exported:
    out: Path
    fmt: str
    files: list[str]
    agreement: Agreement
    how_to_load: str


def check_out(out: Path, force: bool) -> None:
    """Refused before any work: a file at OUT, or a folder with something in it (unless --force)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file: give a folder to export into")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"{out} exists and is not empty: give a new folder, or --force to replace it")


def _replace(staging: Path, out: Path) -> None:
    if out.is_dir():
        # Set the old folder aside first, so that OUT is never half one export and half another.
        old = out.with_name(f".{out.name}.replaced-{os.getpid()}")
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old)
    else:
        staging.rename(out)


def _write_card(folder: Path, card: dict) -> None:
    (folder / plain.CARD_FILE).write_text(json.dumps(card, indent=2, default=str) + "\n")


def export(model: TwoTower, preset: ModelPreset, fmt: str, out: str | Path, run_card: dict | None = None,
           force: bool = False) -> Exported:
    """`model` (eval mode, fp32, built from `preset`) as `fmt` at `out`; `run_card`: the run's
    account (card.run_card) for model_card.json."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: use one of {', '.join(FORMATS)}")
    out = Path(out)
    model.eval()
    # A model the format cannot hold is refused before anything is written.
    towers = None if fmt == "safetensors" else clip_towers(model, fmt)
    check_out(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    # A hidden sibling: on the same file system (the rename is atomic), never taken for a model.
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.exporting-", dir=out.parent))
    target = FORMATS[fmt]
    try:
        if towers is None:
            plain.write(model, staging)
        else:
            target.write(towers, staging)
        how_to_load = target.how_to_load(out.resolve())
        card = {"format": fmt, "how_to_load": how_to_load, "architecture": plain.architecture(preset),
                "parameters": sum(p.numel() for p in model.parameters()),
                "logit_scale": float(model.scale().detach()), **(run_card or {})}
        _write_card(staging, card)   # before loading: the safetensors format rebuilds from it
        try:
            exported = target.load(staging)
        except Exception as error:   # any library error here means the export does not load
            raise ExportNotVerified(
                f"the {fmt} export does not load back: {type(error).__name__}: {error}") from error
        agreement = compare(model, ClipTokenizer(preset.context_length), preset.image_size, exported)
        if not agreement.ok:
            raise ExportNotVerified(f"the {fmt} export, loaded back, embeds otherwise than the model: "
                                    f"{agreement.describe()}", agreement)
        card["verification"] = agreement.as_dict()
        files = card["files"] = sorted(p.name for p in staging.iterdir())   # the card is among them
        _write_card(staging, card)
        _replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Exported(out, fmt, files, agreement, how_to_load)
