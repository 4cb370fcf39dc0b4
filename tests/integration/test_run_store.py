"""A run's checkpoints in a real S3-API store (moto's server): copied by StoreUpload, read back
by pull_checkpoint on a staging folder that never saw them, a half-uploaded or damaged one
passed over for the one before it; and the store's failures, each one line with its fix."""
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from engine.store import ObjectStore, StoreError
from engine.train.checkpoint import MANIFEST, damage
from engine.train.run_store import (StoreUpload, complete_checkpoints, pull_checkpoint, pull_run_files,
                                    push_unfinished_checkpoint)
from s3_server import BUCKET, s3_server  # noqa: F401  (the session fixture)


@pytest.fixture
def s3_env(s3_server, monkeypatch):  # noqa: F811
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    return s3_server


def _write_checkpoint(root: Path, step: int) -> tuple[str, list[str]]:
    """A checkpoint as checkpoint.save leaves it: torch's zip files and a manifest of their sizes."""
    tag = f"step{step:08d}"
    folder = root / "checkpoints" / tag
    folder.mkdir(parents=True)
    for name in ("mp_rank_00_model_states.pt", "rank0.pt"):
        torch.save({"step": step, "weights": torch.randn(64, 64)}, folder / name)
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir())}
    (folder / MANIFEST).write_text(json.dumps({"files": files}))
    return tag, [f"{tag}/{name}" for name in files] + [f"{tag}/{MANIFEST}"]


def _uploaded_run(staging: Path, url: str, steps: list[int]) -> StoreUpload:
    uploads = StoreUpload(ObjectStore(url, staging), writer=None)
    for step in steps:
        _, files = _write_checkpoint(staging, step)
        uploads.checkpointed(step, files)
    uploads.finish()
    return uploads


def test_checkpoints_reach_the_store_and_a_fresh_disk_resumes_from_the_newest(s3_env, tmp_path, capsys):
    url = f"s3://{BUCKET}/runs/fresh"
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.5}\n')
    _uploaded_run(tmp_path / "a", url, [4, 8, 12])
    assert "checkpoint of step 12 reached" in capsys.readouterr().out
    store = ObjectStore(url, tmp_path / "b")
    # The last two complete checkpoints are kept; the run's own files are copied beside them.
    assert [tag for tag, _ in complete_checkpoints(store)] == ["step00000012", "step00000008"]
    assert not [k for k in store.keys("checkpoints/") if "step00000004" in k]
    pull_run_files(store)
    assert (tmp_path / "b" / "metrics.jsonl").read_text() == '{"step": 1, "loss": 2.5}\n'
    assert pull_checkpoint(store) == "step00000012"
    local = tmp_path / "b" / "checkpoints"
    assert (local / "latest").read_text() == "step00000012"
    assert sorted(p.name for p in local.iterdir()) == ["latest", "step00000012"]
    assert damage(local / "step00000012", 0, 1) is None
    assert torch.load(local / "step00000012" / "rank0.pt")["step"] == 12


def test_a_half_uploaded_checkpoint_is_passed_over(s3_env, tmp_path):
    url = f"s3://{BUCKET}/runs/half"
    _uploaded_run(tmp_path / "a", url, [4, 8])
    # A rank killed during its copy: the manifest is there, one of the files it lists is not.
    s3_env.client().delete_object(Bucket=BUCKET, Key="runs/half/checkpoints/step00000008/rank0.pt")
    store = ObjectStore(url, tmp_path / "b")
    assert [tag for tag, _ in complete_checkpoints(store)] == ["step00000004"]
    assert pull_checkpoint(store) == "step00000004"


def test_a_damaged_checkpoint_in_the_store_is_reported_and_the_one_before_it_taken(s3_env, tmp_path, capsys):
    url = f"s3://{BUCKET}/runs/damaged"
    _uploaded_run(tmp_path / "a", url, [4, 8])
    # Bytes changed in the store, size kept: only the zip archive's CRC can tell.
    good = tmp_path / "a" / "checkpoints" / "step00000008" / "mp_rank_00_model_states.pt"
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad = tmp_path / "bad.pt"
    bad.write_bytes(bytes(data))
    s3_env.client().upload_file(str(bad), BUCKET, "runs/damaged/checkpoints/step00000008/mp_rank_00_model_states.pt")
    staging = tmp_path / "b"
    (staging / "checkpoints" / "step00000016").mkdir(parents=True)  # left from another run: removed
    assert pull_checkpoint(ObjectStore(url, staging)) == "step00000004"
    out = capsys.readouterr().out
    assert "step00000008 is damaged in the store" in out and "CRC" in out
    assert sorted(p.name for p in (staging / "checkpoints").iterdir()) == ["latest", "step00000004"]


def test_a_store_without_checkpoints_is_a_fresh_run(s3_env, tmp_path):
    staging = tmp_path / "b"
    (staging / "checkpoints" / "step00000008").mkdir(parents=True)
    (staging / "plan.json").write_text("{}")  # a staging folder left from an older run of this URL
    store = ObjectStore(f"s3://{BUCKET}/runs/new", staging)
    pull_run_files(store)
    assert pull_checkpoint(store) is None
    assert not (staging / "plan.json").exists() and list((staging / "checkpoints").iterdir()) == []


def test_store_objects_round_trip_and_a_missing_one_is_file_not_found(s3_env, tmp_path):
    store = ObjectStore(f"s3://{BUCKET}/objects", tmp_path)
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "c.bin").write_bytes(os.urandom(5000))
    store.put("a/b/c.bin")
    assert store.keys() == ["a/b/c.bin"]
    assert store.get("a/b/c.bin", tmp_path / "copy").read_bytes() == (tmp_path / "a" / "b" / "c.bin").read_bytes()
    with pytest.raises(FileNotFoundError):
        store.get("a/missing", tmp_path / "missing")
    assert not list(tmp_path.glob("missing*"))  # no partial file left
    store.check_writable()
    store.delete(["a/b/c.bin"])
    assert store.keys() == []


def test_store_failures_name_what_to_change(s3_env, tmp_path, monkeypatch):
    with pytest.raises(StoreError, match="the bucket 'no-such-bucket' does not exist: create it or fix the URL"):
        ObjectStore("s3://no-such-bucket/run", tmp_path)
    monkeypatch.setenv("S3_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(StoreError, match="the store did not answer .endpoint http://127.0.0.1:9.: check S3_ENDPOINT_URL"):
        ObjectStore(f"s3://{BUCKET}/run", tmp_path)
    monkeypatch.setenv("S3_ENDPOINT_URL", s3_env.endpoint)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StoreError, match="no credentials were found: set AWS_ACCESS_KEY_ID"):
        ObjectStore(f"s3://{BUCKET}/run", tmp_path)


def test_a_checkpoint_complete_only_on_this_disk_is_copied_before_the_resume_chooses(s3_env, tmp_path):
    """A copy cut short (the store failed, the job was killed while copying) loses nothing: the
    next start on this machine copies the checkpoint and the log that reaches it first."""
    url = f"s3://{BUCKET}/runs/unfinished"
    staging = tmp_path / "a"
    staging.mkdir()
    (staging / "plan.json").write_text('{"method": "clip"}')
    store = ObjectStore(url, staging)
    store.put("plan.json")
    _uploaded_run(staging, url, [4, 8])
    _write_checkpoint(staging, 12)  # complete here, never copied
    (staging / "metrics.jsonl").write_text('{"step": 12, "loss": 1.0}\n')
    push_unfinished_checkpoint(store)
    assert [tag for tag, _ in complete_checkpoints(store)][0] == "step00000012"
    fresh = ObjectStore(url, tmp_path / "b")
    pull_run_files(fresh)
    assert (tmp_path / "b" / "metrics.jsonl").read_text() == '{"step": 12, "loss": 1.0}\n'
    assert pull_checkpoint(fresh) == "step00000012"

    # Another run's staging folder (its plan is not the store's) is never copied up.
    other = tmp_path / "c"
    other.mkdir()
    (other / "plan.json").write_text('{"method": "declip"}')
    _write_checkpoint(other, 16)
    push_unfinished_checkpoint(ObjectStore(url, other))
    assert [tag for tag, _ in complete_checkpoints(store)][0] == "step00000012"


def test_a_step_saved_again_first_takes_the_old_checkpoint_of_that_step_out_of_the_choice(s3_env, tmp_path):
    """A resume that went back past a damaged checkpoint trains its step again: before any rank
    copies, the old manifest is replaced, so a copy cut short never mixes old and new files."""
    url = f"s3://{BUCKET}/runs/again"
    _uploaded_run(tmp_path / "a", url, [4, 8])
    uploads = StoreUpload(ObjectStore(url, tmp_path / "a"), writer=None)
    assert uploads._invalidate(f"step00000008/{MANIFEST}")
    assert [tag for tag, _ in complete_checkpoints(ObjectStore(url, tmp_path / "b"))] == ["step00000004"]


@pytest.fixture(scope="module")
def store_with_users(tmp_path_factory):
    """A second moto server that checks credentials (INITIAL_NO_AUTH_ACTION_COUNT: the first
    requests set it up unchecked): a bucket and a user who may do anything there but write."""
    import boto3

    from engine.dist import free_port
    from loud_skip import skip_loudly
    from s3_server import _wait_until_serving, moto_server_command

    command = moto_server_command()
    if command is None:
        skip_loudly("moto_server not found: install the test extra (pip install -e '.[test]')")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("moto-auth") / "moto_server.log"
    setup_requests = 6  # the start check's GET, then the five requests below
    with open(log, "w") as output:
        process = subprocess.Popen([command, "-H", "127.0.0.1", "-p", str(port)], stdout=output, stderr=subprocess.STDOUT,
                                   env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(setup_requests)})
    try:
        _wait_until_serving(process, endpoint, log)
        anyone = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup",
                      aws_secret_access_key="setup")
        boto3.client("s3", **anyone).create_bucket(Bucket="guarded")
        iam = boto3.client("iam", **anyone)
        iam.create_user(UserName="reader")
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        policy = iam.create_policy(PolicyName="no-writes", PolicyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"},
                          {"Effect": "Deny", "Action": "s3:PutObject", "Resource": "*"}]}))
        iam.attach_user_policy(UserName="reader", PolicyArn=policy["Policy"]["Arn"])
        yield endpoint, key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_wrong_credentials_and_no_write_permission_are_named(store_with_users, tmp_path, monkeypatch):
    endpoint, reader_key, reader_secret = store_with_users
    monkeypatch.setenv("S3_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(StoreError, match="the store refused these credentials .403 on the bucket.: check AWS_ACCESS_KEY_ID"):
        ObjectStore("s3://guarded/run", tmp_path)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", reader_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", reader_secret)
    store = ObjectStore("s3://guarded/run", tmp_path)  # may read
    assert store.keys() == []
    with pytest.raises(StoreError, match="permission denied: give these credentials read and write access to the prefix"):
        store.check_writable()
