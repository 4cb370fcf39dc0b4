"""launchers/evaluate.py on real runs: the model it loads from a run's checkpoint scores, on the
run's own held-out set, exactly what the run logged at its last evaluation (same weights, same
images, same code): a wrong parameter, buffer or caption cleaning would change the numbers."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from launching import ROOT, check, launch, read_metrics

EVALUATE = ROOT / "launchers" / "evaluate.py"
RETRIEVAL = [f"retrieval_{way}_r{k}" for way in ("i2t", "t2i") for k in (1, 5, 10)]


def evaluate(args, env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EVALUATE), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def last_evaluation(run_dir: Path) -> dict:
    return [row for row in read_metrics(run_dir) if "retrieval_i2t_r1" in row][-1]


def heldout(env) -> Path:
    from engine.data.embedded import ensure_digits
    return ensure_digits(Path(env["CLIPZERO_CACHE"])).heldout


def write_image_folder(mds: Path, root: Path) -> Path:
    """The held-out digits as DIR/<class id, two digits>/<sample>.png: sorted folders are class order."""
    from streaming import LocalDataset

    dataset = LocalDataset(local=str(mds))
    for i in range(len(dataset)):
        sample = dataset[i]
        folder = root / f"{int(sample['cls']):02d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:04d}.png").write_bytes(sample["jpg"])
    return root


def test_reference_run_scores_what_it_logged(two_rank_reference, cache_env, tmp_path):
    """Two ranks at ZeRO-1: the weights come from the optimizer shards' fp32 master copy."""
    logged = last_evaluation(two_rank_reference)
    assert logged["step"] == 16 and json.loads((two_rank_reference / "plan.json").read_text())["zero_stage"] == 1

    out = tmp_path / "retrieval.json"
    result = evaluate([two_rank_reference, "--task", "retrieval", "--pairs", heldout(cache_env), "--out", out,
                       "--device", "cpu"], cache_env)
    check(result)
    written = json.loads(out.read_text())
    assert written["step"] == 16 and written["counts"] == {"images": 300, "captions": 300}
    assert {k: written["metrics"][k] for k in RETRIEVAL} == {k: logged[k] for k in RETRIEVAL}
    assert "retrieval_i2t_r1" in result.stdout and "step 16" in result.stdout
    # The comparison can fail: the checkpoint before it (step 12) scores otherwise.
    check(evaluate([two_rank_reference / "checkpoints" / "step00000012", "--task", "retrieval", "--pairs",
                    heldout(cache_env), "--out", tmp_path / "step12.json"], cache_env))
    earlier = json.loads((tmp_path / "step12.json").read_text())
    assert earlier["step"] == 12 and earlier["metrics"] != written["metrics"]

    images = write_image_folder(heldout(cache_env), tmp_path / "digits")
    classes = heldout(cache_env) / "classes.json"  # the built-in class names and templates
    out = tmp_path / "zeroshot.json"
    check(evaluate([two_rank_reference, "--task", "zeroshot", "--images", images, "--classnames", classes,
                    "--out", out], cache_env))
    metrics = json.loads(out.read_text())["metrics"]
    assert (metrics["zeroshot_top1"], metrics["zeroshot_top5"]) == (logged["zeroshot_top1"], logged["zeroshot_top5"])
    assert 0 < metrics["zeroshot_mean_per_class_recall"] <= 1


def test_clip_lite_at_zero_stage_3_scores_what_it_logged(cache_env, tmp_path):
    """ZeRO-3 keeps no weights in its module file, and CLIP-Lite evaluates in its critic's space
    with a BERT text tower: both must be loaded right for the numbers to agree. (One rank: ZeRO-3
    partitions the same way, without the launcher's start-up. The held-out captions have no
    punctuation, so the caption cleaning is checked in tests/unit/test_evaluate_designed.py.)"""
    run = tmp_path / "lite"
    check(launch(["--method", "clip-lite", "--zero-stage", "3", "--global-batch", "32", "--steps", "4",
                  "--log-every", "1", "--eval-every", "4", "--checkpoint-every", "4", "--out", run],
                 cache_env))
    assert (run / "checkpoints" / "step00000004" / "zero_pp_rank_0_mp_rank_00_model_states.pt").exists()
    logged = last_evaluation(run)
    check(evaluate([run, "--task", "retrieval", "--pairs", heldout(cache_env)], cache_env))
    written = json.loads((run / "eval" / "retrieval-heldout.json").read_text())  # the default place
    assert written["method"] == "clip-lite" and written["step"] == 4
    assert {k: written["metrics"][k] for k in RETRIEVAL} == {k: logged[k] for k in RETRIEVAL}


@pytest.mark.parametrize("args, message", [
    (["--task", "zeroshot"], "--task zeroshot needs --images"),
    (["--task", "retrieval", "--pairs", "x", "--templates", "openai"], "--templates belongs to --task zeroshot"),
])
def test_bad_options_exit_2_with_the_fix(args, message, tmp_path, cache_env):
    result = evaluate([tmp_path, *args], cache_env)
    assert result.returncode == 2 and f"error: {message}" in result.stderr


def test_a_folder_that_is_no_run_is_refused(tmp_path, cache_env):
    result = evaluate([tmp_path, "--task", "retrieval", "--pairs", tmp_path], cache_env)
    assert result.returncode == 2 and "neither a run directory" in result.stderr
