"""A method is one file: an objective written outside clipzero, in the user's own package,
trains through the launcher with its own option on the command line, in --help and in the
plan; and SigLIP, added the same way, learns on the smoke run."""
import json
import os
import subprocess
import sys

from launching import LAUNCHER, ROOT, check, launch, read_metrics

TOY = '''
"""CLIP's loss scaled by a dial: an objective from outside clipzero."""
from engine.objectives.base import Objective, Option
from kernels import contrastive_loss


class ToyObjective(Objective):
    weights = {"toy": 1.0}
    options = (Option("toy_weight", "how much of CLIP's loss to keep", default=1.0, kind=float,
                      reason="the toy's default"),)

    def __init__(self, toy_weight: float = 1.0):
        super().__init__()
        self.toy_weight = toy_weight

    @classmethod
    def from_plan(cls, model, options, seed):
        return cls(options["toy_weight"])

    def embed(self, model, batch):
        return {"image": model.encode_image(batch["image"]).float(),
                "text": model.encode_text(batch["text"]).float()}, {}

    def loss_from_embeddings(self, embeddings, scale):
        return {"toy": self.toy_weight * contrastive_loss(embeddings["image"], embeddings["text"], scale)}
'''
METHOD = "my_toy_objective:ToyObjective"


def _env(cache_env, tmp_path):
    (tmp_path / "my_toy_objective.py").write_text(TOY)
    return dict(cache_env, PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), cache_env.get("PYTHONPATH")])))


def test_an_objective_from_outside_trains_with_its_own_option(cache_env, tmp_path):
    env = _env(cache_env, tmp_path)
    shown = subprocess.run([sys.executable, str(LAUNCHER), "--method", METHOD, "--help"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "--toy-weight FLOAT" in shown.stdout
    assert f"{METHOD}: how much of CLIP's loss to keep" in " ".join(shown.stdout.split())   # unwrapped

    run = tmp_path / "run"
    result = launch(["--method", METHOD, "--toy-weight", "0.5", "--steps", "2", "--global-batch", "16",
                     "--log-every", "1", "--out", run], env)
    check(result)
    plan = json.loads((run / "plan.json").read_text())
    assert plan["method"] == METHOD and plan["objective_options"] == {"toy_weight": 0.5}
    assert any(line.startswith("toy_weight") and "--toy-weight given" in line for line in result.stdout.splitlines())
    losses = [row["loss/toy"] for row in read_metrics(run) if "loss/toy" in row]
    assert len(losses) == 2 and all(0 < loss < 5 for loss in losses)   # half of CLIP's ~ln(16) start

    bad = launch(["--method", METHOD, "--toy-weight", "lots", "--steps", "2", "--out", tmp_path / "bad"], env)
    assert bad.returncode == 2 and "--toy-weight 'lots': not a float" in bad.stderr
    foreign = launch(["--method", METHOD, "--queue-size", "8", "--steps", "2", "--out", tmp_path / "bad"], env)
    assert foreign.returncode == 2 and "--queue-size is an option of --method declip" in foreign.stderr
    missing = launch(["--method", "no_such_package:Objective", "--steps", "2", "--out", tmp_path / "bad"], env)
    assert missing.returncode == 2 and "cannot import no_such_package:Objective" in missing.stderr
    assert not (tmp_path / "bad").exists()


def test_siglip_smoke_run_learns(cache_env, tmp_path):
    """The smoke schedule (110 steps) stopped at its first evaluation, step 28: SigLIP's
    zero-shot is already well above chance (0.1) there, about 0.3; a full run reaches about 0.98.
    The bar, 75 of the 300 held-out digits, is 8 standard deviations above chance and leaves
    room for a run that moves with the data path's pixels (a change of resampler did)."""
    run = tmp_path / "siglip"
    check(launch(["--method", "siglip", "--stop-at-step", "28", "--eval-every", "28", "--checkpoint-every", "28",
                  "--out", run], cache_env))
    plan = json.loads((run / "plan.json").read_text())
    assert plan["method"] == "siglip" and plan["total_steps"] == 110
    evaluation = [row for row in read_metrics(run) if "zeroshot_top1" in row][-1]
    assert evaluation["step"] == 28 and evaluation["zeroshot_top1"] >= 0.25
    scales = [row["logit_scale"] for row in read_metrics(run) if "logit_scale" in row]
    assert abs(scales[0] - 10) < 1   # SigLIP's t starts at 10 (CLIP's at 14.3)
