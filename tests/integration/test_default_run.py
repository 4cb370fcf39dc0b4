"""The README's promise: the default command trains a small CLIP that reaches >= 0.8 zero-shot."""
from launching import check, launch, read_metrics


def test_default_command_reaches_08_zero_shot(tmp_path, cache_env):
    out = tmp_path / "default"
    result = launch(["--out", str(out)], cache_env, ranks=1, launcher="deepspeed")
    check(result)
    final = [row for row in read_metrics(out) if "zeroshot_top1" in row][-1]
    assert final["zeroshot_top1"] >= 0.8, final
    assert "zero-shot top-1 on the held-out split" in result.stdout
