"""Bad input fails before any work, names the fix, and leaves no run directory behind."""
import pytest

from launching import launch


@pytest.mark.parametrize("args, fix", [
    (["--method", "simclr"], "--method"),
    (["--model", "not-a-model"], "--model"),
    (["--data", "/nonexistent/mds"], "/nonexistent/mds"),
    (["--global-batch", "33", "--micro-batch", "8"], "--micro-batch"),
    (["--ds", "zero_optimization.no_such_key=1"], "no_such_key"),
    (["--ds", "optimizer.params.lr=0.1"], "--lr"),
    (["--steps", "10", "--epochs", "2"], "--steps"),
    (["--zero-stage", "0", "--offload"], "--offload"),
])
def test_fails_fast_with_the_fix_and_no_run_dir(args, fix, tmp_path, cache_env):
    out = tmp_path / "run"
    result = launch([*args, "--out", str(out)], cache_env, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.startswith("error: ") and fix in result.stderr, result.stderr[-3000:]
    assert not out.exists()


def test_mds_without_caption_column_is_refused(tmp_path, cache_env):
    from streaming import MDSWriter

    data = tmp_path / "images_only"
    with MDSWriter(out=str(data), columns={"jpg": "bytes"}) as writer:
        writer.write({"jpg": b"\x89PNG"})
    out = tmp_path / "run"
    result = launch(["--data", str(data), "--out", str(out)], cache_env, timeout=120)
    assert result.returncode == 2 and "txt" in result.stderr, result.stderr[-3000:]
    assert not out.exists()


def test_dry_run_writes_the_plan_and_trains_nothing(tmp_path, cache_env):
    out = tmp_path / "run"
    # The first DeepSpeed process group on a fresh machine JIT-builds a small op (~90 s).
    result = launch(["--model", "vit-b-32", "--global-batch", "512", "--dry-run", "--out", str(out)],
                    cache_env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {p.name for p in out.iterdir()} == {"plan.json", "ds_config.json"}
    assert "zero" in result.stdout.lower() and "precision" in result.stdout.lower()
