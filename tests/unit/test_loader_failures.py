"""TrainLoader when streaming fails under it: a shard that cannot be prepared, file descriptors
over many epochs, and ranks of a node starting after a killed run. Real streaming, real worker
processes, real /dev/shm."""
import gc
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from itertools import islice
from pathlib import Path

import pytest
from streaming import LocalDataset, MDSWriter

from engine.data.loader import TrainLoader
from engine.data.mds import local_copy_dir
from engine.data.streaming_dataset import ShardUnavailable
from engine.data.spec import DataSpec
from engine.data.text import ClipTokenizer

REPO = Path(__file__).resolve().parents[2]
MICRO_BATCH = 64  # 23 batches an epoch on one rank


@pytest.fixture(scope="module")
def tokenizer():
    return ClipTokenizer()


def _copy_digits(digits, out: Path, samples: int | None = None, **writer_options) -> Path:
    stored = LocalDataset(local=str(digits.train))
    with MDSWriter(out=str(out), columns={"jpg": "bytes", "txt": "str"}, **writer_options) as writer:
        for index in range(samples or len(stored)):
            sample = stored[index]
            writer.write({"jpg": sample["jpg"], "txt": sample["txt"]})
    return out


@pytest.fixture(scope="module")
def zstd_digits(digits, tmp_path_factory):
    """The digits in six zstd-compressed shards: streaming decompresses each when first needed,
    in a data worker's background thread."""
    out = _copy_digits(digits, tmp_path_factory.mktemp("zstd") / "train", compression="zstd", size_limit="400kb")
    assert len(list(out.glob("shard.*.mds.zstd"))) == 6
    return out


def _loader(data, tokenizer, workers, **overrides):
    options = dict(micro_batch=MICRO_BATCH, image_size=16, spec=DataSpec(), seed=5, workers=workers,
                   decode_device="cpu", tokenizer=tokenizer, rank=0, world_size=1, collective_timeout_s=60)
    options.update(overrides)
    return TrainLoader.from_data(str(data), **options)


def _truncate_a_zstd_shard(data: Path) -> str:
    shard = data / "shard.00003.mds.zstd"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return shard.name


def _remove_a_shard(data: Path) -> str:
    (data / "shard.00001.mds").unlink()  # a local dataset: streaming has nowhere to fetch it from
    return "shard.00001.mds"


@pytest.mark.parametrize("source, damage, workers", [("zstd", _truncate_a_zstd_shard, 2),
                                                     ("zstd", _truncate_a_zstd_shard, 0),
                                                     ("raw", _remove_a_shard, 1)])
def test_a_shard_that_cannot_be_prepared_stops_the_loader_in_order(source, damage, workers, zstd_digits, digits,
                                                                    tokenizer, tmp_path):
    # Streaming prepares the shard in a background thread of one data worker and, when that
    # fails, ends that worker's share quietly: the loader went on with the other workers'
    # batches out of order, or waited for the shard until the batch timeout.
    original = zstd_digits if source == "zstd" else digits.train
    intact, damaged = tmp_path / "intact", tmp_path / "damaged"
    shutil.copytree(original, intact)
    shutil.copytree(original, damaged)
    shard = damage(damaged)
    expected = [batch["sample_id"].tolist() for batch in islice(iter(_loader(intact, tokenizer, workers)), 23)]

    loader, taken = _loader(damaged, tokenizer, workers), []
    start = time.monotonic()
    with pytest.raises(ShardUnavailable) as raised:
        for batch in loader:
            taken.append(batch["sample_id"].tolist())
    assert time.monotonic() - start < 30  # at once, not after the batch timeout
    message = str(raised.value)
    assert shard in message and str(damaged) in message, message
    assert "credentials" in message and "free space" in message and "launchers/convert.py" in message
    assert taken == expected[:len(taken)]  # every batch yielded is the one due there
    assert loader.state_dict() == {"epoch": 0, "sample_in_epoch": len(taken) * MICRO_BATCH}


def _open_fds() -> list[str]:
    names = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            names.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # the descriptor listdir itself used, closed by now
            pass
    return names


@pytest.mark.parametrize("workers", [0, 1])
def test_open_file_descriptors_stay_flat_over_epochs(digits, tokenizer, workers, tmp_path):
    # Each epoch start hands streaming the resume point; it opened a new shared-memory handle
    # every time (2 fds an epoch; with no workers, 2 more as it read it back), which ended a
    # long run with "Too many open files". 160 digits: epochs of two batches.
    small = _copy_digits(digits, tmp_path / "small", samples=160)
    loader = _loader(small, tokenizer, workers, image_size=8)
    assert loader.batches_per_epoch == 2
    batches = iter(loader)
    for _ in range(2 * loader.batches_per_epoch):  # the first epochs open what stays open
        next(batches)
    gc.collect()  # the earlier tests' loaders, collected now rather than in the count below
    before = _open_fds()
    for _ in range(30 * loader.batches_per_epoch):
        next(batches)
    after = _open_fds()
    assert len(after) <= len(before), sorted(set(after) - set(before))
    resume = lambda names: sum(name.endswith("_resume") for name in names)  # streaming's resume segments
    assert resume(after) == resume(before)


# Remote data whose shards are all in the cache already: nothing is fetched (the endpoint is a
# closed port), but streaming treats the cache as a remote's, refusing one that a live dataset
# registered ("Reused local directory").
REMOTE = "s3://clipzero-test-unreachable/digits"

KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    from multiprocessing import resource_tracker
    from engine.data.loader import TrainLoader
    from engine.data.spec import DataSpec
    from engine.data.text import ClipTokenizer

    loader = TrainLoader.from_data(sys.argv[1], micro_batch=32, image_size=16, spec=DataSpec(), seed=0, workers=0,
                                   decode_device="cpu", tokenizer=ClipTokenizer(), rank=0, world_size=1, local_cache=sys.argv[2])
    print(f"{loader._dataset._shm_prefix_int:06d}", flush=True)
    # Killed with its whole process tree (SLURM, the OOM killer): the resource tracker that
    # would unlink the segments dies too, and nothing of streaming's cleaning runs.
    os.kill(resource_tracker._resource_tracker._pid, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)
""")

RANK = textwrap.dedent("""
    import os, sys
    import torch.distributed as dist
    from engine.data.loader import TrainLoader
    from engine.data.spec import DataSpec
    from engine.data.text import ClipTokenizer

    tokenizer = ClipTokenizer()  # before the rendezvous: the ranks then reach the loader together
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=2)
    loader = TrainLoader.from_data(sys.argv[1], micro_batch=32, image_size=16, spec=DataSpec(), seed=0, workers=0,
                                   decode_device="cpu", tokenizer=tokenizer, rank=rank, world_size=2, local_cache=sys.argv[2])
    print("batch of", len(next(iter(loader))["sample_id"]), flush=True)
    dist.barrier()
""")


def test_ranks_of_a_node_start_together_after_a_killed_run(digits, tmp_path):
    # A run killed between building its loader and its first batch leaves streaming's shared
    # memory and none of its lock files. Local rank 0 removes what no process maps, but rank 1,
    # not waiting for it, looked at /dev/shm meanwhile: mapping the leftovers as it went, so rank
    # 0 kept them as live, and both ranks refused the cache as another live run's.
    for name, text in (("killed.py", KILLED_RUN), ("rank.py", RANK)):
        (tmp_path / name).write_text(text)
    cache = tmp_path / "cache"
    shards = local_copy_dir(REMOTE, cache)
    shutil.copytree(digits.train, shards)
    shutil.move(shards / "classes.json", shards.with_name(f"{shards.name}.classes.json"))  # where a remote's goes
    locks = tmp_path / "tmp"  # streaming's lock files: none of the killed run's
    locks.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(locks), "S3_ENDPOINT_URL": "http://127.0.0.1:9",
           "AWS_ACCESS_KEY_ID": "none", "AWS_SECRET_ACCESS_KEY": "none"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        env.pop(key, None)
    killed = subprocess.run([sys.executable, str(tmp_path / "killed.py"), REMOTE, str(cache)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    prefix = killed.stdout.strip()
    assert Path(f"/dev/shm/{prefix}_locals").exists()  # left behind

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ranks = [subprocess.Popen([sys.executable, str(tmp_path / "rank.py"), REMOTE, str(cache)],
                              env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                                   "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    try:
        outputs = [process.communicate(timeout=120)[0] for process in ranks]
    finally:
        for process in ranks:
            process.kill()
    for process, output in zip(ranks, outputs):
        assert process.returncode == 0 and "batch of 32" in output, output[-3000:]
    assert not Path(f"/dev/shm/{prefix}_locals").exists()  # removed, not kept as a live run's


def test_a_tmpdir_too_long_for_the_workers_sockets_is_refused_with_the_fix(tmp_path, monkeypatch):
    """Found on a two-host test: with a long TMPDIR the workers' batches could not reach the rank
    (AF_UNIX path too long) and the run stalled until the collective timeout, blaming the data."""
    import tempfile

    from engine.data.workers import SOCKET_NAME_BEYOND_TMPDIR, SOCKET_PATH_MAX, temp_dir_problem

    # What the limit stands for, in a process of its own: the socket multiprocessing makes there.
    listen = ("import multiprocessing.connection as c\n"
              "c.Listener(c.arbitrary_address('AF_UNIX')).close()")
    longest = tmp_path / ("d" * (SOCKET_PATH_MAX - SOCKET_NAME_BEYOND_TMPDIR - len(str(tmp_path)) - 1))
    too_long = Path(str(longest) + "x")
    for folder, fits in ((longest, True), (too_long, False)):
        folder.mkdir()
        opened = subprocess.run([sys.executable, "-c", listen], env={**os.environ, "TMPDIR": str(folder)},
                                capture_output=True, text=True, timeout=60)
        assert (opened.returncode == 0) == fits, opened.stderr[-2000:]
        monkeypatch.setattr(tempfile, "tempdir", str(folder))
        problem = temp_dir_problem(workers=2)
        assert (problem is None) == fits
        assert temp_dir_problem(workers=0) is None
    assert f"TMPDIR {too_long} is {len(str(too_long))} characters long" in problem and "export TMPDIR=/tmp" in problem
