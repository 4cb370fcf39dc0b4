"""`--out s3://...` end to end, as a user runs it against a real S3-API server (moto's): the
run stops, resumes from the URL on fresh staging folders (the same and another number of ranks)
with the losses of the uninterrupted run, passes over a checkpoint damaged in the store, and
TensorBoard reads its events from the URL."""
import json
import re
import signal
import subprocess
import sys
import textwrap

import pytest

from engine.store import ObjectStore
from engine.train.run_store import complete_checkpoints
from launching import REFERENCE_DIALS, ROOT, check, command, launch, losses, wait_for
from s3_server import BUCKET, s3_server  # noqa: F401  (the session fixture)

STOP = 8


def _store_run(s3_server, prefix: str, destination):  # noqa: F811
    """The run's metrics.jsonl as the store holds it, downloaded into `destination`."""
    destination.mkdir(parents=True, exist_ok=True)
    s3_server.client().download_file(BUCKET, f"{prefix}/metrics.jsonl", str(destination / "metrics.jsonl"))
    return destination


def _keys(s3_server, prefix: str) -> list[str]:  # noqa: F811
    listed = s3_server.client().list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/")
    return sorted(o["Key"][len(prefix) + 1:] for o in listed.get("Contents", []))


def _copy_prefix(s3_server, source: str, target: str) -> None:  # noqa: F811
    client = s3_server.client()
    for key in _keys(s3_server, source):
        client.copy_object(Bucket=BUCKET, Key=f"{target}/{key}", CopySource={"Bucket": BUCKET, "Key": f"{source}/{key}"})


def _assert_losses(run, reference, exact_until: int) -> None:
    got, want = losses(run), losses(reference)
    assert sorted(got) == sorted(want) == list(range(1, 17))
    for step, loss in want.items():
        assert got[step] == pytest.approx(loss, rel=1e-5 if step <= exact_until else 0.03), f"step {step}"


@pytest.fixture(scope="module")
def stopped_run(s3_server, cache_env, tmp_path_factory):  # noqa: F811
    """REFERENCE_DIALS on 2 ranks with --out s3://..., stopped at step 8; its env and prefix."""
    env = {**cache_env, **s3_server.env}
    prefix = "runs/stopped"
    staging = tmp_path_factory.mktemp("staging-first")
    result = launch([*REFERENCE_DIALS, "--out", f"s3://{BUCKET}/{prefix}", "--staging", str(staging),
                     "--stop-at-step", str(STOP)], env, ranks=2)
    check(result)
    assert f"run: s3://{BUCKET}/{prefix}, staged in {staging}" in result.stdout
    assert f"checkpoint of step {STOP} reached s3://{BUCKET}/{prefix}" in result.stdout
    keys = _keys(s3_server, prefix)
    assert {"plan.json", "ds_config.json", "metrics.jsonl", f"checkpoints/step{STOP:08d}/manifest.json"} <= set(keys)
    assert any(k.startswith("tensorboard/events.out.tfevents") for k in keys)
    return env, prefix


def test_a_run_resumes_from_the_url_on_fresh_disks_with_the_losses_of_an_uninterrupted_run(
        stopped_run, s3_server, tmp_path, two_rank_reference):  # noqa: F811
    env, stopped = stopped_run
    prefix = "runs/same-ranks"
    _copy_prefix(s3_server, stopped, prefix)
    url = f"s3://{BUCKET}/{prefix}"
    result = launch([*REFERENCE_DIALS, "--out", url, "--staging", str(tmp_path / "fresh")], env, ranks=2)
    check(result)
    assert f"resuming from step {STOP} ({tmp_path / 'fresh'}/checkpoints/step{STOP:08d}, from {url})" in result.stdout
    _assert_losses(_store_run(s3_server, prefix, tmp_path / "store"), two_rank_reference, exact_until=16)
    # The store keeps the last two complete checkpoints, as a local run directory does.
    assert sorted({k.split("/")[1] for k in _keys(s3_server, prefix) if k.startswith("checkpoints/")}) == \
        ["step00000012", "step00000016"]

    # A checkpoint damaged in the store (bytes changed, size kept) is passed over: the run
    # goes back to the one before it and trains the last steps again to the same losses.
    key = f"{prefix}/checkpoints/step00000016/mp_rank_00_model_states.pt"
    damaged = tmp_path / "damaged.pt"
    s3_server.client().download_file(BUCKET, key, str(damaged))
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    s3_server.client().upload_file(str(damaged), BUCKET, key)
    result = launch([*REFERENCE_DIALS, "--out", url, "--staging", str(tmp_path / "fresh-again")], env, ranks=2)
    check(result)
    assert "checkpoints/step00000016 is damaged in the store" in result.stdout
    assert "resuming from step 12" in result.stdout
    _assert_losses(_store_run(s3_server, prefix, tmp_path / "store-again"), two_rank_reference, exact_until=16)


def test_a_run_at_a_url_resumes_on_another_number_of_ranks(stopped_run, s3_server, tmp_path,
                                                          two_rank_reference):  # noqa: F811
    env, stopped = stopped_run
    prefix = "runs/one-rank"
    _copy_prefix(s3_server, stopped, prefix)
    result = launch([*REFERENCE_DIALS, "--out", f"s3://{BUCKET}/{prefix}", "--staging", str(tmp_path / "fresh")], env)
    check(result)
    assert "resharding" in result.stdout and f"resuming from step {STOP}" in result.stdout
    _assert_losses(_store_run(s3_server, prefix, tmp_path / "store"), two_rank_reference, exact_until=STOP)


def test_tensorboard_reads_the_events_from_the_url(stopped_run, s3_server):  # noqa: F811
    """What the README tells a user: S3_ENDPOINT (TensorBoard's own name for the endpoint)."""
    _, prefix = stopped_run
    read = textwrap.dedent(f"""
        import json
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        events = EventAccumulator("s3://{BUCKET}/{prefix}/tensorboard")
        events.Reload()
        print(json.dumps([e.step for e in events.Scalars("train/loss")]))
    """)
    env = {**s3_server.env, "S3_ENDPOINT": s3_server.endpoint, "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", read], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == list(range(1, STOP + 1))


def test_a_bucket_that_does_not_exist_is_refused_before_any_work(s3_server, cache_env, tmp_path):  # noqa: F811
    staging = tmp_path / "staging"
    result = launch(["--steps", "4", "--out", "s3://no-such-bucket/run", "--staging", str(staging)],
                    {**cache_env, **s3_server.env})
    assert result.returncode == 2, result.stderr[-3000:]
    assert "error: s3://no-such-bucket/run: could not open the store" in result.stderr
    assert "the bucket 'no-such-bucket' does not exist: create it or fix the URL" in result.stderr
    assert not staging.exists()  # nothing written


def test_a_signalled_run_copies_its_stop_checkpoint_before_it_exits(s3_server, cache_env, tmp_path,  # noqa: F811
                                                                    monkeypatch):
    prefix = "runs/signalled"
    staging = tmp_path / "staging"
    log = tmp_path / "run.log"
    args = ["--global-batch", "32", "--steps", "200", "--checkpoint-every", "200", "--log-every", "1",
            "--out", f"s3://{BUCKET}/{prefix}", "--staging", str(staging)]
    with open(log, "w") as output:
        job = subprocess.Popen(command(args), cwd=ROOT, env={**cache_env, **s3_server.env}, stdout=output,
                               stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: job.poll() is not None or (
            (staging / "metrics.jsonl").exists() and len(losses(staging)) >= 3), 240, "three steps", log)
        job.send_signal(signal.SIGTERM)
        assert job.wait(timeout=240) == 3, log.read_text()[-3000:]  # stopped with a checkpoint
    finally:
        job.kill()
    text = log.read_text()
    stopped = int(re.search(r"stopped at step (\d+) of 200 with a checkpoint", text).group(1))
    assert f"checkpoint of step {stopped} reached s3://{BUCKET}/{prefix}" in text
    assert text.index(f"checkpoint of step {stopped} reached") < text.index(f"stopped at step {stopped}")
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    store = ObjectStore(f"s3://{BUCKET}/{prefix}", tmp_path / "check")
    assert [tag for tag, _ in complete_checkpoints(store)] == [f"step{stopped:08d}"]


def test_evaluate_reads_a_run_from_its_url_and_scores_what_it_logged(stopped_run, s3_server, tmp_path):  # noqa: F811
    """launchers/evaluate.py URL: the run's newest checkpoint (step 8, where it also evaluated)
    copied down, scored on the held-out split as the run scored it, the result put beside it."""
    from test_evaluate import RETRIEVAL, evaluate, heldout

    env, prefix = stopped_run
    url = f"s3://{BUCKET}/{prefix}"
    result = evaluate([url, "--task", "retrieval", "--pairs", heldout(env)], {**env, "TMPDIR": str(tmp_path)})
    check(result)
    written = re.search(r"written to (s3://\S+)", result.stdout).group(1)
    assert written.startswith(f"{url}/eval/retrieval-")
    local = tmp_path / "record.json"
    s3_server.client().download_file(BUCKET, written[len(f"s3://{BUCKET}/"):], str(local))
    record = json.loads(local.read_text())
    assert record["run"] == url and record["step"] == STOP
    logged = [row for row in map(json.loads, (_store_run(s3_server, prefix, tmp_path / "store") / "metrics.jsonl")
                                 .read_text().splitlines()) if "retrieval_i2t_r1" in row][-1]
    assert logged["step"] == STOP
    for name in RETRIEVAL:
        assert record["metrics"][name] == pytest.approx(logged[name], abs=1e-9), name
