"""An evaluation is one file: one written outside engine/ (tests/unit/toy_evaluation.py, on
PYTHONPATH) is scored at every evaluation of a training run given as `--eval
package.module:Class:PATH`, and scores the run's checkpoint from launchers/evaluate.py as the run
logged it. Its options in `--help` and the refusals of a bad `--eval` are tested in-process
(tests/unit/test_eval_plugin.py), as is a bad `--eval` refused before a run writes anything
(tests/integration/test_periodic_eval.py)."""
import json
import os

from launching import ROOT, check, launch, read_metrics
from test_evaluate import evaluate

PLUGIN = "toy_evaluation:CountFiles"


def _env(cache_env):
    unit = str(ROOT / "tests" / "unit")
    return dict(cache_env, PYTHONPATH=os.pathsep.join(filter(None, [unit, cache_env.get("PYTHONPATH")])))


def test_an_evaluation_from_outside_runs_in_training_and_standalone(cache_env, tmp_path):
    env = _env(cache_env)
    folder = tmp_path / "things"
    folder.mkdir()
    for name in ("a", "b", "c", "d"):
        (folder / name).write_text(name)
    run = tmp_path / "run"
    check(launch(["--steps", "2", "--global-batch", "16", "--log-every", "1", "--eval-every", "2",
                  "--checkpoint-every", "2", "--eval", f"{PLUGIN}:{folder},weight=2", "--out", run], env))
    (logged,) = [row for row in read_metrics(run) if "eval/things/toy_files" in row]
    assert logged["step"] == 2 and logged["eval/things/toy_files"] == 8.0
    assert "zeroshot_top1" in logged and "retrieval_i2t_r1" in logged   # the held-out split's, beside it

    check(evaluate([run, "--task", PLUGIN, "--folder", folder], env))
    written = json.loads((run / "eval" / "count-files-things.json").read_text())
    assert written["step"] == 2 and written["metrics"]["toy_files"] == 4.0   # weight's default: 1
    assert abs(written["metrics"]["toy_blank_similarity"] - logged["eval/things/toy_blank_similarity"]) < 1e-6

