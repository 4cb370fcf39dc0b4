"""launchers/export.py on a real vit-debug run: the hf and open_clip folders load in
transformers and open_clip as their users load them, embed the held-out digits as the run's
model does, and open_clip's own zero-shot classifier (its tokenizer, the same class names and
templates, the same decoded images) scores exactly what launchers/evaluate.py scores."""
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from launching import ROOT, check, launch, losses
from test_evaluate import evaluate, heldout, write_image_folder

EXPORT = ROOT / "launchers" / "export.py"
# The smoke run's schedule (110 steps at batch 128), stopped at step 20: by then the tiny ViT
# tells digits apart (about 0.2 zero-shot top-1), so the top-1 compared below is no one-class tie.
STEPS = 20
TRAIN = ["--model", "vit-debug", "--stop-at-step", str(STEPS), "--eval-every", str(STEPS),
         "--checkpoint-every", str(STEPS), "--log-every", "10"]


def export(args, env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXPORT), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_env):
    run = tmp_path_factory.mktemp("export") / "vit-debug"
    check(launch([*TRAIN, "--out", run], cache_env))
    return run


def test_exports_load_in_both_libraries_and_open_clip_scores_what_evaluate_scores(trained, cache_env, tmp_path):
    import open_clip
    from transformers import AutoTokenizer, CLIPModel

    from engine.eval.images import decode_images, read_image_folder
    from engine.eval.load_run import load_run

    classes = heldout(cache_env) / "classes.json"
    images = write_image_folder(heldout(cache_env), tmp_path / "digits")
    check(evaluate([trained, "--task", "zeroshot", "--images", images, "--classnames", classes], cache_env))
    evaluated = json.loads((trained / "eval" / "zeroshot-digits.json").read_text())["metrics"]

    hf_dir, open_clip_dir = tmp_path / "hf", tmp_path / "open_clip"
    for fmt, out, library in (("hf", hf_dir, "transformers"), ("open_clip", open_clip_dir, "open_clip")):
        result = export([trained, "--format", fmt, out], cache_env)
        check(result)
        assert f"verified against {library}" in result.stdout and "load it with:" in result.stdout
    card = json.loads((open_clip_dir / "model_card.json").read_text())
    assert (card["method"], card["model"], card["steps_trained"]) == ("clip", "vit-debug", STEPS)
    assert card["evaluation"]["last_logged_in_training"]["step"] == STEPS
    assert card["evaluation"]["launchers/evaluate.py"]["zeroshot-digits.json"]["metrics"] == evaluated

    # The same decoded tensors for every model: launchers/evaluate.py's own decoding of the folder.
    ours = load_run(trained)
    folder = read_image_folder(images)
    decoded = decode_images(folder.files, ours.image_size, "digits")
    labels = torch.tensor([folder.labels[i] for i in decoded.kept])
    spec = json.loads(classes.read_text())
    prompts = [t.format(c) for c in spec["classnames"] for t in spec["templates"]]

    hf_model = CLIPModel.from_pretrained(str(hf_dir)).eval()
    hf_tokens = AutoTokenizer.from_pretrained(str(hf_dir))(prompts, padding=True, return_tensors="pt")
    oc_model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{open_clip_dir}")
    oc_model.eval()
    oc_tokenizer = open_clip.get_tokenizer(f"local-dir:{open_clip_dir}")
    with torch.no_grad():
        our_images = ours.model.encode_image(decoded.images)
        our_text = ours.model.encode_text(ours.tokenizer(prompts))
        for image, text in (
                (hf_model.get_image_features(pixel_values=decoded.images), hf_model.get_text_features(**hf_tokens)),
                (oc_model.encode_image(decoded.images), oc_model.encode_text(oc_tokenizer(prompts)))):
            assert (F.normalize(image, dim=-1) - our_images).abs().max() <= 1e-5
            assert (F.normalize(text, dim=-1) - our_text).abs().max() <= 1e-5

        classifier = open_clip.build_zero_shot_classifier(oc_model, oc_tokenizer, spec["classnames"],
                                                          spec["templates"], device="cpu")
        predicted = (oc_model.encode_image(decoded.images, normalize=True) @ classifier).argmax(1)
    top1 = (predicted == labels).float().mean().item()
    assert top1 == evaluated["zeroshot_top1"]
    assert len(set(predicted.tolist())) >= 3   # a model that tells digits apart, not one answer for all



def test_a_run_starts_from_the_run_and_from_its_open_clip_export_alike(trained, cache_env, tmp_path):
    """--init of the run directory and of its open_clip export give the same weights, so the same
    losses step for step, below a run from scratch; the plan records --init and a resume keeps it."""
    check(export([trained, "--format", "open_clip", tmp_path / "open_clip"], cache_env))
    short = ["--model", "vit-debug", "--steps", "2", "--log-every", "1", "--eval-every", "2", "--checkpoint-every", "2"]
    runs = {}
    for name, init in (("scratch", []), ("run", ["--init", trained]),
                       ("open_clip", ["--init", f"local-dir:{tmp_path / 'open_clip'}"])):
        result = launch([*short, *init, "--out", tmp_path / name], cache_env, ranks=1)
        check(result)
        runs[name] = losses(tmp_path / name)
        if init:
            assert "\ninit " in result.stdout and "weights for the image and text tower(s)" in result.stdout
    assert runs["run"] == pytest.approx(runs["open_clip"], abs=1e-6)
    assert runs["run"][1] < runs["scratch"][1] - 0.2, runs   # 20 trained steps: about 0.35 lower
    plan = json.loads((tmp_path / "open_clip" / "plan.json").read_text())
    assert plan["init"] == f"local-dir:{tmp_path / 'open_clip'}"
    resumed = launch([*short, "--init", trained, "--out", tmp_path / "open_clip"], cache_env, ranks=1,
                     launcher="deepspeed")
    said = resumed.stdout + resumed.stderr
    assert resumed.returncode == 2 and "holds a run with init" in said and "Traceback" not in said, said[-3000:]
