"""--patch-dropout end to end: vit-debug on the built-in digits, one process, as a user runs it.
The plan shows and records the two rows; the last steps train unmasked; a run stopped before the
boundary and resumed across it trains every step as the uninterrupted run does."""
import json

from launching import check, launch, losses

DIALS = ["--model", "vit-debug", "--patch-dropout", "0.5", "--unmasked-steps", "3", "--steps", "8",
         "--global-batch", "32", "--log-every", "1", "--eval-every", "8", "--checkpoint-every", "4"]


def test_patch_dropout_trains_then_tunes_unmasked_and_resumes_across_the_boundary(tmp_path, cache_env):
    whole, split = tmp_path / "whole", tmp_path / "split"
    result = launch([*DIALS, "--out", str(whole)], cache_env)
    check(result)
    table = {line.split("|")[0].strip(): line for line in result.stdout.splitlines() if "|" in line}
    assert "--patch-dropout given: 50% of the patch tokens" in table["patch_dropout"]
    assert "steps 6..8 encode every patch token" in table["unmasked_steps"]
    plan = json.loads((whole / "plan.json").read_text())
    assert (plan["patch_dropout"], plan["unmasked_steps"]) == (0.5, 3)
    assert result.stdout.count("step 6: unmasked tuning") == 1

    check(launch([*DIALS, "--out", str(split), "--stop-at-step", "4"], cache_env))
    resumed = launch([*DIALS, "--out", str(split)], cache_env)
    check(resumed)
    assert "resuming from step 4" in resumed.stdout and "step 6: unmasked tuning" in resumed.stdout
    a, b = losses(whole), losses(split)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in a:   # the same masks before the boundary (torch's RNG in the checkpoint), none after it
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])
