"""benchmarks/e2e_openclip.py's own arithmetic: open_clip_train's epochs for a step count, its log
lines read back as per-step rates, and those rates grouped into our log intervals."""
import pytest

from benchmarks import e2e_openclip as bench

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
    assert bench.openclip_epochs(110, 1497, 128) == (10, 110)
    assert bench.openclip_epochs(22, 1497, 128) == (2, 22)


def test_steps_that_are_not_whole_epochs_round_to_the_nearest_and_at_least_one():
    assert bench.openclip_epochs(100, 1497, 128) == (9, 99)
    assert bench.openclip_epochs(4, 1497, 32) == (1, 46)


def test_a_batch_larger_than_the_data_is_refused():
    with pytest.raises(ValueError, match="more than the 100 training pairs"):
        bench.openclip_epochs(10, 100, 128)


def test_step_rates_are_read_from_its_log_lines_only():
    assert bench.parse_openclip_log(OPEN_CLIP_LOG) == [8.153, 472.244]


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
    monkeypatch.setattr(bench.importlib.util, "find_spec", lambda name: object() if name in installed else None)
    assert bench.missing_packages() == ["braceexpand", "webdataset"]
