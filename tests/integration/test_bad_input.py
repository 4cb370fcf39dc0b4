"""Bad input fails before any work, names the fix, and leaves no run directory behind.

Input errors are raised before any process group or engine exists, so these run the
launcher's own `main()` in this process (one import instead of one interpreter per case);
the dry run, which starts DeepSpeed, runs as a user runs it.
"""
import os

import pytest

from launching import launch


def run_main(args, cache_env, monkeypatch, capsys):
    """`python launchers/pretrain.py ARGS` in this process: (exit code, stderr)."""
    from launchers.pretrain import main

    # main() fills RANK/WORLD_SIZE/... into the environment: keep that out of other tests.
    monkeypatch.setattr(os, "environ", dict(os.environ, CLIPZERO_CACHE=cache_env["CLIPZERO_CACHE"]))
    code = main(args)
    return code, capsys.readouterr().err


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
def test_fails_fast_with_the_fix_and_no_run_dir(args, fix, tmp_path, cache_env, monkeypatch, capsys):
    out = tmp_path / "run"
    code, stderr = run_main([*args, "--out", str(out)], cache_env, monkeypatch, capsys)
    assert code == 2, stderr[-3000:]
    assert stderr.startswith("error: ") and fix in stderr, stderr[-3000:]
    assert not out.exists()


def test_mds_without_caption_column_is_refused(tmp_path, cache_env, monkeypatch, capsys):
    from streaming import MDSWriter

    data = tmp_path / "images_only"
    with MDSWriter(out=str(data), columns={"jpg": "bytes"}) as writer:
        writer.write({"jpg": b"\x89PNG"})
    out = tmp_path / "run"
    code, stderr = run_main(["--data", str(data), "--out", str(out)], cache_env, monkeypatch, capsys)
    assert code == 2 and "txt" in stderr, stderr[-3000:]
    assert not out.exists()


def test_dry_run_writes_the_plan_and_trains_nothing(tmp_path, cache_env):
    out = tmp_path / "run"
    # The first DeepSpeed process group on a fresh machine JIT-builds a small op (~90 s).
    result = launch(["--model", "vit-b-32", "--global-batch", "512", "--dry-run", "--out", str(out)],
                    cache_env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {p.name for p in out.iterdir()} == {"plan.json", "ds_config.json"}
    assert "zero" in result.stdout.lower() and "precision" in result.stdout.lower()
