"""benchmarks/e2e_openclip.py's and benchmarks/openclip_train.py's own arithmetic: open_clip_train's
epochs for a step count, its log lines read back as per-step rates and times, those rates grouped into
our log intervals, and --step-times' medians, CSV size and precision, the output name, both commands,
and the summary and table."""
import argparse
import json
import sys
import types
from pathlib import Path

import pytest

from benchmarks import e2e_openclip as bench
from benchmarks import openclip_train

# Two lines as open_clip_train 3.3 writes them with --log-every-n-steps 1, around one it writes between.
OPEN_CLIP_LOG = """\
2026-12-02,02:24:02 | INFO | Start epoch 0
2026-12-02,02:25:18 | INFO | Train Epoch: 0 [1440/1497 (98%)] Data (t): 0.015 Batch (t): 3.925, 8.15300/s, \
8.15300/s/gpu LR: 0.000003 Logit Scale: 14.147 Contrastive_loss: 3.4590 (3.4978) Loss: 3.4590 (3.4978)
2026-12-02,02:25:21 | INFO | Train Epoch: 1 [  128/1497 (9%)] Data (t): 0.024 Batch (t): 0.271, 472.244/s, \
472.244/s/gpu LR: 0.002999 Logit Scale: 14.147 Contrastive_loss: 3.4278 (3.4963) Loss: 3.4278 (3.4963)
"""


def test_steps_match_when_they_are_whole_epochs_of_whole_batches():
    # The smoke run: 1,497 pairs at 128 are 11 whole steps an epoch, so 110 steps are 10 epochs.
    assert openclip_train.openclip_epochs(110, 1497, 128) == (10, 110)
    assert openclip_train.openclip_epochs(22, 1497, 128) == (2, 22)


def test_steps_that_are_not_whole_epochs_round_to_the_nearest_and_at_least_one():
    assert openclip_train.openclip_epochs(100, 1497, 128) == (9, 99)
    assert openclip_train.openclip_epochs(4, 1497, 32) == (1, 46)


def test_a_batch_larger_than_the_data_is_refused():
    with pytest.raises(ValueError, match="more than the 100 training pairs"):
        openclip_train.openclip_epochs(10, 100, 128)


def test_step_rates_are_read_from_its_log_lines_only():
    assert openclip_train.parse_openclip_log(OPEN_CLIP_LOG) == [8.153, 472.244]


def test_step_seconds_are_read_from_its_batch_time():
    assert openclip_train.parse_openclip_log(OPEN_CLIP_LOG, "seconds") == [3.925, 0.271]


def test_our_step_times_are_the_logged_step_seconds_in_step_order():
    rows = [{"step": 1, "loss": 3.5, "time/step_s": 4.0}, {"step": 2, "time/step_s": 1.5},
            {"step": 2, "zeroshot_top1": 0.1}, {"step": 3, "time/step_s": 1.25}]
    assert bench.our_step_times(rows) == [4.0, 1.5, 1.25]


def test_our_step_times_refuse_a_run_not_logged_every_step():
    with pytest.raises(ValueError, match="not every step"):
        bench.our_step_times([{"step": 2, "time/step_s": 1.0}, {"step": 4, "time/step_s": 1.0}])


def test_the_steady_median_leaves_out_step_one_unless_it_is_the_only_one():
    # With step 1 the median of these would be 2.5; without it, 2.0.
    assert bench.steady_median([9.0, 1.0, 3.0, 2.0]) == 2.0
    assert bench.steady_median([9.0, 1.0, 3.0]) == 2.0
    assert bench.steady_median([9.0]) == 9.0
    assert bench.steady_median([]) is None


def test_open_clip_train_autocasts_to_bf16_only_where_our_plan_is_bf16():
    assert openclip_train.openclip_precision("bf16") == "amp_bf16"
    assert openclip_train.openclip_precision("fp32") == "fp32"


def test_step_times_give_open_clip_train_one_epoch_of_exactly_the_steps():
    assert openclip_train.csv_limit(6, 32, step_times=False) is None
    pairs = openclip_train.csv_limit(6, 32, step_times=True)
    assert pairs == 192
    assert openclip_train.openclip_epochs(6, pairs, 32) == (1, 6)


def test_the_default_output_names_the_model_and_mode_but_keeps_the_old_name():
    assert bench.default_out("vit-debug", False).name == "e2e_openclip_cpu.json"
    assert bench.default_out("vit-b-32", True).name == "e2e_openclip_cpu_vitb32_steps.json"
    assert bench.default_out("vit-b-32", False).name == "e2e_openclip_cpu_vitb32.json"


def test_step_times_compare_samples_per_s_from_the_medians_and_skip_the_scores():
    batch = 32
    sides = {}
    for name, precision, times, wall in (("ours", "bf16", [9.0, 2.0, 2.0, 4.0], 60.0),
                                         ("open_clip", "amp_bf16", [5.0, 3.0, 3.0, 3.0], 30.0)):
        median = bench.steady_median(times)
        sides[name] = dict(precision=precision, steps=4, wall_s=wall, end_to_end_samples_per_s=4 * batch / wall,
                           step_s=times, median_step_s=median, samples_per_s=batch / median)
    summary = bench.summarise(sides)
    assert summary["ratios"]["samples_per_s"] == pytest.approx(3.0 / 2.0)   # its median over ours'
    assert summary["ratios"]["wall_s"] == 2.0 and "zeroshot_top1" not in summary["ratios"]
    assert summary["targets"]["steady_met"] and "zeroshot_top1_difference" not in summary
    shown = bench.table({**sides, **summary})
    assert "| ours | bf16 | 2.000 | 16.00 | 60.0 |" in shown
    assert "| open_clip_train | amp_bf16 | 3.000 | 10.67 | 30.0 |" in shown
    assert "| ours / open_clip | | | 1.50 | 2.00 |" in shown
    assert "ours step times (s): 9.000 2.000 2.000 4.000" in shown


def test_a_scored_run_keeps_its_zero_shot_ratio_and_targets():
    sides = {name: dict(steps=110, wall_s=wall, samples_per_s=rate, end_to_end_samples_per_s=rate / 2,
                        zeroshot_top1=top1)
             for name, wall, rate, top1 in (("ours", 50.0, 300.0, 0.5), ("open_clip", 100.0, 200.0, 0.4))}
    summary = bench.summarise(sides)
    assert summary["ratios"] == pytest.approx(dict(wall_s=0.5, samples_per_s=1.5, end_to_end_samples_per_s=1.5,
                                                   zeroshot_top1=1.25))
    assert summary["zeroshot_top1_difference"] == pytest.approx(0.1)
    assert summary["targets"]["zeroshot_equal_or_better"] and summary["targets"]["end_to_end_met"]
    assert "| ours / open_clip | | 0.50 | 1.50 | 1.50 | 1.25 |" in bench.table({**sides, **summary})


PLAN = {"betas": [0.9, 0.98], "crop_scale": [0.8, 1.0], "lr": 5e-4, "warmup_steps": 1, "weight_decay": 0.2,
        "eps": 1e-6, "grad_clip": 1.0}


def after(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def test_a_registry_model_runs_through_the_wrapper_without_a_config(tmp_path):
    model = openclip_train.openclip_model("vit-b-32", tmp_path)
    assert model == ("ViT-B-32", "") and not list(tmp_path.iterdir())
    command = openclip_train.openclip_command(PLAN, tmp_path / "t.csv", tmp_path / "logs", model, 1,
                                              "amp_bf16", argparse.Namespace(global_batch=32, workers=1, seed=0))
    assert command[1:4] == ["-c", openclip_train.OPEN_CLIP_WRAPPER, ""]
    assert after(command, "--model") == "ViT-B-32" and after(command, "--precision") == "amp_bf16"


@pytest.mark.parametrize("config, registered", [("", []), ("towers.json", ["towers.json"])])
def test_the_wrapper_registers_a_config_only_if_given_one(monkeypatch, config, registered):
    calls, runs = [], []
    monkeypatch.setitem(sys.modules, "open_clip", types.SimpleNamespace(add_model_config=calls.append))
    monkeypatch.setitem(sys.modules, "open_clip_train", types.SimpleNamespace())
    monkeypatch.setitem(sys.modules, "open_clip_train.main", types.SimpleNamespace(main=runs.append))
    monkeypatch.setattr(sys, "argv", ["-c", config, "--model", "ViT-B-32"])
    with pytest.raises(SystemExit) as exit_:
        exec(openclip_train.OPEN_CLIP_WRAPPER, {})
    assert exit_.value.code == 0 and calls == registered and runs == [["--model", "ViT-B-32"]]


def test_the_debug_towers_are_registered_from_a_config(tmp_path):
    name, config = openclip_train.openclip_model("vit-debug", tmp_path)
    assert name == openclip_train.OPEN_CLIP_NAME
    assert json.loads(Path(config).read_text())["embed_dim"] == 64


def test_step_times_run_ours_through_the_deepspeed_launcher_logging_every_step(monkeypatch):
    monkeypatch.setitem(sys.modules, "engine.dist", types.SimpleNamespace(free_port=lambda: 12345))
    args = argparse.Namespace(model="vit-b-32", steps=6, global_batch=32, workers=1, seed=0, our_flags="",
                              user_defaults=False, step_times=True)
    command = bench.our_command(args, Path("run"))
    assert command[0].endswith("deepspeed") and after(command, "--model") == "vit-b-32"
    assert after(command, "--log-every") == "1" and after(command, "--eval-every") == "6"
    args.step_times = False
    command = bench.our_command(args, Path("run"))
    assert command[0] == sys.executable and "--log-every" not in command


def test_an_interval_rate_is_its_samples_over_the_sum_of_its_step_times():
    # Steps of 0.1 s and 0.3 s at batch 10: 20 samples in 0.4 s, not the mean of 100 and 33.3.
    rates = bench.interval_rates([100.0, 100 / 3, 50.0], batch=10, interval=2)
    assert rates == pytest.approx([50.0, 50.0])


def test_the_steady_rate_leaves_out_the_first_interval_unless_it_is_the_only_one():
    assert bench.steady_rate([10.0, 40.0, 60.0]) == 50.0
    assert bench.steady_rate([10.0]) == 10.0
    assert bench.steady_rate([]) is None


def test_missing_packages_name_what_pip_must_install(monkeypatch):
    installed = {"pandas", "fsspec", "tqdm", "torchvision"}
    monkeypatch.setattr(openclip_train.importlib.util, "find_spec",
                        lambda name: object() if name in installed else None)
    assert openclip_train.missing_packages() == ["braceexpand", "webdataset"]
