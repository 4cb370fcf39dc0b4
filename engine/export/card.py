"""model_card.json: what the exported weights are and where they come from, written beside every
export. The run's own records are the source: plan.json (method, preset, the resolved recipe
numbers, data, hardware), the checkpoint exported, metrics.jsonl (the last evaluation training
logged at or before that checkpoint) and RUN/eval/*.json (launchers/evaluate.py's results).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from engine.data.dali import CLIP_MEAN, CLIP_STD

if TYPE_CHECKING:
    from engine.eval.load_run import LoadedRun

# The plan's values that say how the weights were trained (the rest is scheduling and I/O).
TRAINING_NUMBERS = (
    "seed", "global_batch", "micro_batch", "grad_accum", "accumulation", "optimizer", "lr", "group_lrs",
    "min_lr", "weight_decay", "betas", "eps", "momentum", "grad_clip", "warmup_steps", "warmup_start_lr",
    "total_steps", "epochs", "crop_scale", "image_size", "text_layers", "objective_options", "precision",
    "zero_stage", "world_size", "nodes", "accelerator", "device_name", "n_params")
# Names of the metrics training's periodic evaluation logs (engine/eval/): a metrics.jsonl row
# holding one of them is an evaluation, not a training-step row.
_EVALUATION_MARKS = ("zeroshot", "retrieval", "probe")


def _is_evaluation(row: dict) -> bool:
    return any(mark in key for key in row for mark in _EVALUATION_MARKS)


def last_training_evaluation(run_dir: Path, up_to_step: int) -> dict | None:
    """The metrics of the last evaluation logged at or before `up_to_step` (rows of one step merged)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:       # a line cut by a crash mid-write
            continue
        if isinstance(row, dict) and _is_evaluation(row) and (up_to_step < 0 or row.get("step", 0) <= up_to_step):
            rows.append(row)
    if not rows:
        return None
    step = rows[-1].get("step")
    merged: dict = {}
    for row in rows:
        if row.get("step") == step:
            merged.update(row)
    return merged


def evaluate_results(run_dir: Path) -> dict[str, dict]:
    """launchers/evaluate.py's records under RUN/eval/, by file name (each names its step)."""
    results = {}
    for path in sorted((run_dir / "eval").glob("*.json")):
        try:
            results[path.name] = json.loads(path.read_text())
        except ValueError:
            continue
    return results


def preprocessing(image_size: int) -> dict:
    """engine/data/cpu_pipeline.eval_pipeline: the transform every logged evaluation used."""
    return {"image_size": image_size, "resize_shorter_side_to": round(image_size * 256 / 224),
            "interpolation": "bicubic (antialiased)", "centre_crop": image_size,
            "mean": list(CLIP_MEAN), "std": list(CLIP_STD), "layout": "RGB, CHW, values in [0, 1] before normalising",
            "note": "preprocessor_config.json (hf) reproduces this transform; open_clip's preprocess_cfg cannot "
                    "(its eval transform resizes the shorter side to image_size itself, then crops)"}


def text_input(context_length: int, vocab_size: int, cleaned: bool) -> dict:
    return {"tokenizer": "CLIP BPE, 49,408 tokens (open_clip's bundled vocabulary)",
            "rows": "start token 49406, caption, end token 49407, zero padding; long captions cut so that the "
                    "end token stays last", "context_length": context_length, "vocab_size": vocab_size,
            "caption_cleaning": ("CLIP-Lite's: lower case, punctuation removed, accents stripped "
                                 "(engine.data.text.strip_punctuation)") if cleaned else "none"}


def run_card(run: "LoadedRun") -> dict:
    """The card's account of the run: method, training numbers, data, steps, evaluations."""
    plan = run.plan
    reasons = {d["name"]: d["reason"] for d in plan.get("decisions", []) if isinstance(d, dict) and "name" in d}
    return {
        "method": plan.get("method"),
        "model": plan.get("model"),
        "run": str(run.run_dir),
        "checkpoint": str(run.checkpoint),
        "steps_trained": run.step,
        # None: an option the method does not have (DeCLIP's queue on a CLIP run).
        "training": {name: plan[name] for name in TRAINING_NUMBERS if plan.get(name) is not None},
        "training_reasons": {name: reasons[name] for name in TRAINING_NUMBERS
                             if plan.get(name) is not None and name in reasons},
        "data": {"streams": plan.get("data_streams"), "pairs": plan.get("dataset_size"),
                 "fraction": plan.get("data_fraction")},
        "evaluation": {"last_logged_in_training": last_training_evaluation(run.run_dir, run.step),
                       "launchers/evaluate.py": evaluate_results(run.run_dir)},
        "preprocessing": preprocessing(run.image_size),
        "text_input": text_input(run.tokenizer.context_length, run.model.text.transformer.config.vocab_size,
                                 run.clean_text is not None),
    }
