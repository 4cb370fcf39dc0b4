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
    (["--patch-dropout", "0.5"], "has no patch tokens: use a ViT preset"),   # the debug ResNet
    (["--model", "vit-debug", "--patch-dropout", "1"], "must lie in [0, 1)"),
])
def test_fails_fast_with_the_fix_and_no_run_dir(args, fix, tmp_path, cache_env, monkeypatch, capsys):
    out = tmp_path / "run"
    code, stderr = run_main([*args, "--out", str(out)], cache_env, monkeypatch, capsys)
    assert code == 2, stderr[-3000:]
    assert stderr.startswith("error: ") and fix in stderr, stderr[-3000:]
    assert not out.exists()


def test_wandb_without_its_package_names_the_extra_to_install(tmp_path, cache_env, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)   # `import wandb` raises ImportError
    out = tmp_path / "run"
    code, stderr = run_main(["--wandb", "clip-runs", "--out", str(out)], cache_env, monkeypatch, capsys)
    assert code == 2 and "pip install 'clipzero[wandb]'" in stderr, stderr[-3000:]
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


def _hostile_mds(path, samples=320):
    """32 px pairs as another tool might write them: every 8th image cut to a third (DALI's CPU
    decoder segfaulted on these), and a few random, empty, 1x1 images and empty or 30 kB captions."""
    import io

    import numpy as np
    from PIL import Image
    from streaming import MDSWriter

    def encode(seed, side=32, fmt="PNG"):
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(
            buffer, format=fmt)
        return buffer.getvalue()

    kinds = {}
    with MDSWriter(out=str(path), columns={"jpg": "bytes", "txt": "str"}) as writer:
        for index in range(samples):
            image, caption = encode(index), f"a noise picture number {index % 10}"
            if index % 8 == 0:
                image, kinds[index] = image[: len(image) // 3], "truncated_or_corrupt_image"
            elif index % 40 == 1:
                image, kinds[index] = np.random.default_rng(index).bytes(900), "undecodable_image"
            elif index % 40 == 3:
                image, kinds[index] = b"", "empty_image"
            elif index % 40 == 5:
                image, kinds[index] = encode(index, side=1), "image_under_8_px"
            elif index % 40 == 7:
                caption, kinds[index] = "", "empty_caption"
            elif index % 40 == 9:
                caption, kinds[index] = "text " * 6_000, "caption_over_4_000_characters"
            writer.write({"jpg": image, "txt": caption})
    return set(kinds.values())


def test_training_on_a_hostile_dataset_completes_and_reports_its_bad_records(tmp_path, cache_env):
    from launching import check, read_metrics, tensorboard_scalars

    data, out = tmp_path / "hostile", tmp_path / "run"
    kinds = _hostile_mds(data)
    result = launch(["--data", str(data), "--global-batch", "64", "--steps", "10", "--log-every", "5",
                     "--out", str(out)], cache_env, ranks=2)
    check(result)
    last = [row for row in read_metrics(out) if "loss" in row][-1]
    counted = {name.rsplit("/", 1)[1] for name in last if name.startswith("data/bad_records/")}
    assert counted == kinds  # 10 steps x 64 = 640 samples: two epochs of 320, every kind met
    assert last["data/bad_records"] == sum(v for k, v in last.items() if k.startswith("data/bad_records/"))
    assert last["data/bad_records"] >= 2 * 80  # every epoch meets all 80 bad records (and bad stand-ins)
    assert "data/bad_records/truncated_or_corrupt_image" in tensorboard_scalars(out)
    assert "bad records replaced by stand-ins:" in result.stdout
