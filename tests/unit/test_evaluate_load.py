"""Finding and loading a run's checkpoint for evaluation (engine/eval/load_run.py) on hand-written
checkpoint folders in DeepSpeed's no-ZeRO layout; the ZeRO layouts are loaded from real runs in
tests/integration/test_evaluate.py."""
import json

import pytest
import torch

from engine.data.text import strip_punctuation
from engine.errors import UserError
from engine.eval.load_run import build_model, find_checkpoint, load_run

PLAN = {"method": "clip", "model": "debug", "text_layers": 2, "image_size": 32}


def _save(run_dir, step: int, plan=PLAN, drop: str | None = None) -> dict:
    """A checkpoint as engine/train/checkpoint.save leaves it (module file + manifest), holding
    a model of its own random weights; returns those weights."""
    torch.manual_seed(step)
    model, _ = build_model(plan)
    weights = model.state_dict()
    module = {f"model.{k}": v for k, v in weights.items() if k != drop}
    module["objective.head.weight"] = torch.zeros(2)  # what the objective owns is not evaluated
    folder = run_dir / "checkpoints" / f"step{step:08d}"
    folder.mkdir(parents=True)
    torch.save({"module": module}, folder / "mp_rank_00_model_states.pt")
    files = {p.name: p.stat().st_size for p in folder.iterdir()}
    (folder / "manifest.json").write_text(json.dumps({"files": files}))
    (run_dir / "checkpoints" / "latest").write_text(folder.name)
    (run_dir / "plan.json").write_text(json.dumps(plan))
    return weights


def _same(model, weights) -> bool:
    return all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())


def test_newest_intact_checkpoint_is_loaded_and_a_damaged_one_skipped(tmp_path, capsys):
    run = tmp_path / "run"
    older = _save(run, 4)
    newer = _save(run, 8)
    loaded = load_run(run)
    assert loaded.step == 8 and _same(loaded.model, newer) and not loaded.model.training
    assert loaded.clean_text is None and loaded.image_size == 32
    assert find_checkpoint(run / "checkpoints") == (run, run / "checkpoints" / "step00000008")

    with open(run / "checkpoints" / "step00000008" / "mp_rank_00_model_states.pt", "ab") as f:
        f.write(b"torn")
    loaded = load_run(run)
    assert loaded.step == 4 and _same(loaded.model, older)
    assert "skipped damaged checkpoint" in capsys.readouterr().out
    assert (run / "checkpoints" / "step00000008").is_dir()  # evaluation sets nothing aside
    with pytest.raises(UserError, match="damaged"):
        load_run(run / "checkpoints" / "step00000008")
    assert load_run(run / "checkpoints" / "step00000004").step == 4


def test_clip_lite_runs_get_their_caption_cleaning(tmp_path):
    plan = {**PLAN, "method": "clip-lite"}
    weights = _save(tmp_path / "lite", 2, plan=plan)
    loaded = load_run(tmp_path / "lite")
    assert loaded.clean_text is strip_punctuation and _same(loaded.model, weights)
    assert loaded.tokenizer.context_length == 32  # CLIP-Lite's caption length, from its preset


def test_refusals_say_what_to_give(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_run(tmp_path / "nowhere")
    with pytest.raises(UserError, match="neither a run directory"):
        load_run(tmp_path)
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "plan.json").write_text(json.dumps(PLAN))
    with pytest.raises(UserError, match="no checkpoint yet"):
        load_run(tmp_path / "fresh")
    _save(tmp_path / "other", 3, drop="logit_scale.log_scale")
    with pytest.raises(UserError, match="1 tensor.*missing.*logit_scale"):
        load_run(tmp_path / "other")
