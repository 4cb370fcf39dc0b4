"""Remote --data end to end: shards streamed from a real S3 endpoint (moto's server, s3_server.py)
by streaming's own S3 client, into a per-node cache under the plan's size limit."""
import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest
import torch
from streaming import LocalDataset, MDSWriter

from engine.data.loader import TrainLoader
from engine.data.mds import describe_mds, local_copy_dir
from engine.data.shared_memory import SHM, mapped_shared_memory
from engine.data.spec import DataSpec
from engine.data.streams import bytes_under
from engine.data.text import ClipTokenizer
from engine.errors import UserError
from tests.unit.test_loader import _assert_same_batches, _take
from launching import ROOT, check, launch, read_metrics, samples_by_step
from s3_server import s3_server  # noqa: F401  (the session fixture)

SAMPLES, OTHER = 240, 80  # digits in the two uploaded datasets (other: the next 80 digits)
SHARD_LIMIT = 1 << 14     # 16 KB shards: about 11 digits each, so the datasets span many shards


def _write_digits(digits_train: Path, out: Path, first: int, count: int) -> Path:
    source = LocalDataset(local=str(digits_train))
    with MDSWriter(out=str(out), columns={"jpg": "bytes", "txt": "str"}, size_limit=SHARD_LIMIT) as writer:
        for index in range(first, first + count):
            writer.write({"jpg": source[index]["jpg"], "txt": source[index]["txt"]})
    shutil.copyfile(digits_train / "classes.json", out / "classes.json")
    return out


@pytest.fixture(scope="module")
def remote(s3_server, digits, tmp_path_factory):  # noqa: F811
    """URLs of two small MDS datasets uploaded to the S3 server: digits 0..239 and 240..319."""
    root = tmp_path_factory.mktemp("upload")
    return {"digits": s3_server.upload(_write_digits(digits.train, root / "digits", 0, SAMPLES), "digits"),
            "other": s3_server.upload(_write_digits(digits.train, root / "other", SAMPLES, OTHER), "other")}


@pytest.fixture
def s3_env(s3_server, monkeypatch):  # noqa: F811
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)


def _loader(data, cache, **options):
    settings = dict(micro_batch=8, image_size=16, spec=DataSpec(crop_scale=(0.5, 1.0)), seed=1, workers=2,
                    decode_device="cpu", tokenizer=ClipTokenizer(), rank=0, world_size=1, local_cache=cache)
    return TrainLoader.from_data(data, **(settings | options))


def test_an_epoch_streams_through_a_cache_smaller_than_the_data(remote, s3_env, tmp_path):
    cache = tmp_path / "cache"
    info = describe_mds(remote["digits"], cache)
    shards = len(json.loads((local_copy_dir(remote["digits"], cache) / "index.json").read_text())["shards"])
    # Room for 10 of the largest shards of 22: 2 workers fetch up to 6 at once, 5 of them beside
    # the one streaming makes room for, which leaves streaming 5 (it needs 4).
    limit = info.index_bytes + 10 * info.largest_shard_bytes
    assert shards >= 20 and limit < info.full_copy_bytes / 2
    loader = _loader(remote["digits"], cache, cache_limit=limit)
    assert loader.batches_per_epoch * 8 == SAMPLES

    folder, largest, done = local_copy_dir(remote["digits"], cache), [0], threading.Event()

    def watch():  # the cache's size, sampled while the epoch streams
        while not done.is_set():
            largest[0] = max(largest[0], bytes_under(folder))
            done.wait(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        ids = [i for batch in islice(iter(loader), loader.batches_per_epoch) for i in batch["sample_id"].tolist()]
    finally:
        done.set()
        watcher.join()
    assert sorted(ids) == list(range(SAMPLES))  # every sample of the epoch, exactly once
    assert 0 < largest[0] <= limit and bytes_under(folder) <= limit
    kept = len(list(folder.glob("shard.*.mds")))
    assert 4 <= kept < shards  # shards were evicted and fetched again as the epoch went on
    # classes.json lies beside the cache, not in it: streaming would not count it against the limit.
    assert (cache / f"{folder.name}.classes.json").is_file() and not (folder / "classes.json").exists()


def test_a_remote_mixture_resumes_exactly_mid_epoch_on_a_fresh_cache(remote, s3_env, tmp_path):
    # As a restart on other nodes: the resumed loader starts from an empty cache, with fewer data
    # workers, under a cache limit that makes both evict shards. Its batches must be those the
    # first loader went on to give, across the epoch's end: no sample replayed, none skipped.
    mixture = f"{remote['digits']}:0.6,{remote['other']}:0.4"
    infos = [describe_mds(remote[name], tmp_path / "probe") for name in ("digits", "other")]
    limit = sum(info.index_bytes for info in infos) + 10 * max(info.largest_shard_bytes for info in infos)
    first = _loader(mixture, tmp_path / "first", cache_limit=limit)
    assert first.batches_per_epoch == (SAMPLES + OTHER) // 8
    take, resume_at = first.batches_per_epoch + 4, first.batches_per_epoch - 6
    batches, states = [], []
    for batch in islice(iter(first), take):
        batches.append({key: value.clone() for key, value in batch.items()})
        states.append(first.state_dict())
    del first
    resumed = _loader(mixture, tmp_path / "second", cache_limit=limit, workers=1)
    resumed.load_state_dict(json.loads(json.dumps(states[resume_at - 1])))
    _assert_same_batches(_take(resumed, take - resume_at), batches[resume_at:])


def _streaming_elsewhere(data: str, cache: Path, take_batch: bool) -> subprocess.Popen:
    """Another run on this machine: a process that builds a loader of `data` over `cache` (and,
    with `take_batch`, takes a batch, so that streaming's file locks exist) and then waits. In
    a session of its own, to be killed whole, as a scheduler or the OOM killer ends a job:
    Python's resource tracker then dies with the run instead of unlinking its shared memory."""
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from engine.data.loader import TrainLoader
        from engine.data.spec import DataSpec
        from engine.data.text import ClipTokenizer
        loader = TrainLoader.from_data({data!r}, micro_batch=8, image_size=16, spec=DataSpec(), seed=1, workers=0,
                                       decode_device="cpu", tokenizer=ClipTokenizer(), rank=0, world_size=1,
                                       local_cache={str(cache)!r})
        if {take_batch!r}:
            batches = iter(loader)
            next(batches)
        print("streaming", flush=True)
        time.sleep(600)
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=os.environ.copy(), start_new_session=True)
    try:
        _wait_for_line(process, "streaming")
    except BaseException:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise
    return process


def test_a_run_killed_on_a_remote_mixture_leaves_shared_memory_the_next_run_clears(remote, s3_env, tmp_path):
    cache, mixture = tmp_path / "cache", f"{remote['digits']}:0.6,{remote['other']}:0.4"
    crashed = _streaming_elsewhere(mixture, cache, take_batch=False)
    os.killpg(crashed.pid, signal.SIGKILL)
    crashed.wait()
    left = _unmapped_streaming_memory()
    assert any(name.endswith("_locals") for name in left), left  # streaming's registry of the cache dirs

    # Killed before its first batch (no file locks yet), the run's registry still claims the cache
    # directories, and streaming refuses them ("reused local directory") unless it is cleaned.
    loader = _loader(mixture, cache, workers=1)
    counts = Counter("digits" if i < SAMPLES else "other" for i in next(iter(loader))["sample_id"].tolist())
    assert sum(counts.values()) == 8
    assert not left & _unmapped_streaming_memory()  # gone, or (the same prefix taken again) live


def test_a_second_run_on_a_cache_in_use_is_refused(remote, s3_env, tmp_path):
    # The live run has taken a batch, so streaming's file locks exist: streaming's own check then
    # passes over that run's registry, and the two runs would evict each other's shards.
    cache = tmp_path / "cache"
    live = _streaming_elsewhere(remote["digits"], cache, take_batch=True)
    try:
        with pytest.raises(UserError, match="another live run on this machine.*CLIPZERO_CACHE"):
            _loader(remote["digits"], cache, workers=0)
        other = _loader(remote["digits"], tmp_path / "another", workers=0)  # its own cache: fine
        assert next(iter(other))["image"].shape[0] == 8
        del other
    finally:
        os.killpg(live.pid, signal.SIGKILL)
        live.wait()
    # The run gone, its registry is stale: the same cache is free again.
    assert next(iter(_loader(remote["digits"], cache, workers=0)))["image"].shape[0] == 8


def _unmapped_streaming_memory() -> set[str]:
    """Streaming's segments in /dev/shm that no process maps: what a killed run leaves."""
    names = {path.name for path in SHM.iterdir() if re.fullmatch(r"\d{6}_[a-z_]+", path.name)}
    return names - mapped_shared_memory()


def _wait_for_line(process: subprocess.Popen, expected: str, timeout: float = 300) -> None:
    lines, deadline = [], time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline and selector.select(deadline - time.monotonic()):
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.strip() == expected:
                return
    raise AssertionError(f"no '{expected}' line from the run:\n{''.join(lines)[-3000:]}")


def test_an_unreachable_dataset_names_the_url_and_what_to_check(s3_env, tmp_path):
    with pytest.raises(UserError, match=r"dataset s3://clipzero-test/missing: could not download index\.json .*"
                                        r"Check the URL and your storage credentials"):
        describe_mds("s3://clipzero-test/missing", tmp_path / "cache")


def test_a_classes_file_missing_from_the_cache_is_fetched_again(remote, s3_env, tmp_path):
    # As after a failed request: the index is cached, classes.json is not. The next start asks
    # for it again, so a labelled set does not stay retrieval-only.
    cache = tmp_path / "cache"
    classes = cache / f"{local_copy_dir(remote['digits'], cache).name}.classes.json"
    assert describe_mds(remote["digits"], cache).classes is not None and classes.is_file()
    classes.unlink()
    assert describe_mds(remote["digits"], cache).classes is not None and classes.is_file()


def test_the_launcher_trains_from_a_bucket_within_its_cache_limit(remote, s3_server, s3_env, tmp_path):  # noqa: F811
    cache, out = tmp_path / "cache", tmp_path / "run"
    # Limit: 10 of the largest shards, as a --cache-limit in kb (2 ranks x 1 worker need 9).
    info = describe_mds(remote["digits"], tmp_path / "probe")
    limit_kb = -(-(info.index_bytes + 10 * info.largest_shard_bytes) // 1024)
    env = {**os.environ, **s3_server.env, "CLIPZERO_CACHE": str(cache), "CLIPZERO_SAMPLE_LOG": str(out / "samples")}
    steps = SAMPLES // 16  # one whole epoch: every sample once across both ranks
    result = launch(["--data", remote["digits"], "--cache-limit", f"{limit_kb}kb", "--steps", str(steps),
                     "--global-batch", "16", "--log-every", "5", "--eval-every", "100", "--checkpoint-every", str(steps),
                     "--out", str(out)],
                    env, ranks=2)
    check(result)
    plan = json.loads((out / "plan.json").read_text())
    assert plan["cache_limit"] == limit_kb * 1024 and plan["data_streams"] == [[remote["digits"], 1.0, SAMPLES]]
    assert "--cache-limit given" in result.stdout and "cache_limit" in result.stdout
    losses = [row["loss"] for row in read_metrics(out) if "loss" in row]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    taken = [i for ids in samples_by_step(out / "samples", 16).values() for i in ids]
    assert sorted(taken) == list(range(SAMPLES))
    assert 0 < bytes_under(local_copy_dir(remote["digits"], cache / "mds")) <= limit_kb * 1024
