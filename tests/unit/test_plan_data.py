"""The data part of the planner (engine/plan/data.py): streams, the shard cache limit, the order."""
import dataclasses
import io
from pathlib import Path

import pytest
from PIL import Image
from streaming import MDSWriter

from engine.data.loader import LoaderSettings, TrainLoader
from engine.data.mds import MdsInfo
from engine.data.spec import DataSpec
from engine.data.text import ClipTokenizer
from engine.data.streams import SHUFFLE_ALGO, SHUFFLE_BLOCK, DataFacts, StreamFacts, data_facts, streaming_arguments
from engine.errors import UserError
from engine.plan.dials import Dials
from engine.plan.resolve import resolve
from engine.plan.data import CACHE_DISK_SHARE, data_decisions
from engine.objectives.method import lookup
from tests.unit.test_plan import CPU_ONLY, NO_FUSED

MB, GB = 2**20, 2**30


def _stream(location, *, shards=100, shard_mb=64, proportion=None):
    info = MdsInfo(location=location, num_samples=shards * 1000, columns={"jpg": "bytes", "txt": "str"},
                   classes=None, index_bytes=MB, shard_bytes=shards * shard_mb * MB, largest_shard_bytes=shard_mb * MB)
    return StreamFacts(location=location, remote="://" in location, local=Path("/cache") / location[-3:],
                       proportion=proportion, info=info)


def _facts(*streams, free=1000 * GB, per_epoch=None):
    return DataFacts(streams=streams, per_epoch=per_epoch or tuple(s.info.num_samples for s in streams),
                     cache_dir=Path("/cache"), cache_free_bytes=free)


def _decide(facts, cache_limit=None, local_world_size=1, workers=4):
    dataset_size = facts.epoch_size if facts is not None else 1000
    rows = data_decisions(Dials(cache_limit=cache_limit), facts, dataset_size=dataset_size,
                          local_world_size=local_world_size, workers=workers, seed=7)
    return {name: (value, reason) for name, value, reason in rows}


def test_local_data_is_read_in_place_without_a_limit():
    assert _decide(_facts(_stream("/data/pairs")))["cache_limit"] == (None, "local data: read in place")
    assert _decide(None)["cache_limit"][0] is None
    with pytest.raises(UserError, match=r"--cache-limit applies to remote data; /data/pairs is read in place.*"
                                        r"drop --cache-limit"):
        _decide(_facts(_stream("/data/pairs")), cache_limit="20gb")


def test_remote_data_that_fits_is_cached_whole():
    stream = _stream("s3://bucket/pairs")  # 100 shards of 64 MB: 6.25 GB
    value, reason = _decide(_facts(stream, free=100 * GB))["cache_limit"]
    assert value == stream.info.full_copy_bytes == MB + 100 * 64 * MB + 64 * MB
    assert reason == "the whole remote data fits: 6.31 GB, within half of the 100 GB free at /cache"


def test_remote_data_larger_than_the_disk_share_gets_half_the_free_space_and_says_it_refetches():
    value, reason = _decide(_facts(_stream("s3://bucket/pairs"), free=8 * GB))["cache_limit"]
    assert value == int(8 * GB * CACHE_DISK_SHARE)
    assert reason.startswith("half of the 8 GB free at /cache; the remote data needs 6.31 GB, so the least "
                             "recently used shards are evicted")
    # 100,000 samples, all inside one shuffle window: every shard is live all epoch long.
    assert reason.endswith("below the 6.31 GB a shuffle window of 100,000 samples spans, so shards are "
                           "downloaded again within an epoch")


def test_a_cache_within_one_shuffle_window_does_not_refetch():
    # 40M samples of 64 KB over 40,000 shards: a window of 4M samples spans about a tenth of them.
    stream = dataclasses.replace(_stream("s3://bucket/laion", shards=40_000), info=dataclasses.replace(
        _stream("s3://bucket/laion", shards=40_000).info, num_samples=40_000_000))
    value, reason = _decide(_facts(stream, free=1000 * GB))["cache_limit"]
    assert value == 500 * GB and "evicted" in reason and "downloaded again" not in reason


def test_the_floor_is_streamings_four_shards_plus_those_the_nodes_other_readers_fetch_at_once():
    remote = _facts(_stream("s3://bucket/pairs"), free=40 * 64 * MB)  # room for 20 shards in its half
    assert _decide(remote, local_world_size=1, workers=1)["cache_limit"][0] == 20 * 64 * MB
    with pytest.raises(UserError) as refused:
        _decide(remote, local_world_size=8, workers=2)  # 16 readers, 48 fetches: 4 + 47 shards of 64 MB
    message = str(refused.value)
    assert "may take 1.25 GB (half of the 2.5 GB free there), less than the 3.19 GB this node reads at once" in message
    assert ("51 of the largest shard (64 MB): streaming's 4, plus 47 more fetched at once by 8 rank(s) x 2 worker(s) "
            "on the node, up to 3 each; and the indexes") in message
    assert message.endswith("free disk space there, or point CLIPZERO_CACHE at a directory on a larger disk.")


def test_a_given_cache_limit_is_checked_against_the_floor_and_the_disk():
    remote = _facts(_stream("s3://bucket/pairs"), free=10 * GB)
    assert _decide(remote, cache_limit="2gb")["cache_limit"][0] == 2 * GB
    assert _decide(remote, cache_limit="2gb")["cache_limit"][1].startswith("--cache-limit given; below the 6.31 GB")
    with pytest.raises(UserError, match=r"--cache-limit 100mb is below the 961 MB this node reads at once "
                                        r"\(15 of the largest shard.*give --cache-limit 962mb or more"):
        _decide(remote, cache_limit="100mb")
    # A limit that holds the whole data evicts nothing, so a small dataset needs no floor.
    small = _facts(_stream("s3://bucket/tiny", shards=2, shard_mb=1), free=10 * GB)
    assert _decide(small)["cache_limit"][0] == small.streams[0].info.full_copy_bytes < 11 * MB
    assert _decide(small, cache_limit="4mb")["cache_limit"] == (4 * MB, "--cache-limit given; the remote data "
                                                                         "(4 MB) fits whole")
    with pytest.raises(UserError, match=r"--cache-limit 20gb is more than the 10 GB free at /cache"):
        _decide(remote, cache_limit="20gb")
    for bad in ("lots", "-5gb", "0"):
        with pytest.raises(UserError, match=r"is not a size: give bytes or a size such as 500mb or 20gb"):
            _decide(remote, cache_limit=bad)


def test_a_mixture_with_local_data_is_never_limited():
    mixture = _facts(_stream("s3://bucket/web", proportion=0.7), _stream("/data/cc3m", proportion=0.3), free=20 * GB)
    value, reason = _decide(mixture)["cache_limit"]
    assert value is None and "evict shards of the local /data/cc3m" in reason
    with pytest.raises(UserError, match=r"--cache-limit applies to remote data; /data/cc3m is read in place"):
        _decide(mixture, cache_limit="1gb")
    with pytest.raises(UserError, match=r"need 6.31 GB of cache at /cache and 2 GB is free.*upload the local"):
        _decide(dataclasses.replace(mixture, cache_free_bytes=2 * GB))


def test_the_loader_hands_streaming_the_limit_less_the_fetches_it_does_not_count():
    remote = (_stream("s3://bucket/web"),)  # 6.31 GB whole, 64 MB shards
    arguments = streaming_arguments(remote, micro_batch=8, seed=0, cache_limit=2 * GB, in_flight=6)
    assert arguments["cache_limit"] == 2 * GB - 5 * 64 * MB
    whole = streaming_arguments(remote, micro_batch=8, seed=0, cache_limit=7 * GB, in_flight=6)
    assert whole["cache_limit"] is None  # holds every shard: nothing to evict, nothing to count
    with pytest.raises(UserError, match=r"below the .* that 48 shard fetches at once need: raise it"):
        streaming_arguments(remote, micro_batch=8, seed=0, cache_limit=2 * GB, in_flight=48)


def test_the_loader_refuses_a_limit_that_would_delete_local_shards():
    with pytest.raises(UserError, match=r"/data/cc3m is read in place and streaming would delete its shards"):
        streaming_arguments((_stream("s3://bucket/web"), _stream("/data/cc3m")), micro_batch=8, seed=0,
                            cache_limit=GB)


def test_the_order_rows_name_the_loaders_settings():
    rows = _decide(_facts(_stream("/data/pairs")))
    assert rows["shuffle_algo"][0] == SHUFFLE_ALGO == streaming_arguments(
        (_stream("/data/pairs"),), micro_batch=8, seed=7, cache_limit=None)["shuffle_algo"]
    assert rows["shuffle_seed"][0] == 7 and rows["shuffle_block"][0] == SHUFFLE_BLOCK
    assert rows["canonical_nodes"] == (1, "local data, read in place: one canonical node (partition 'orig'), the "
                                          "sample order is the same on any number of nodes")


def _canonical(facts, nodes):
    rows = data_decisions(Dials(), facts, dataset_size=facts.epoch_size, local_world_size=1, workers=0, seed=7,
                          nodes=nodes)
    return next((value, reason) for name, value, reason in rows if name == "canonical_nodes")


def test_remote_data_is_split_over_the_nodes_and_local_data_is_not():
    remote, local = _facts(_stream("s3://bucket/pairs"), free=100 * GB), _facts(_stream("/data/pairs"))
    assert _canonical(remote, 6) == (6, "remote data on 6 nodes: each node downloads only its 1/6 of the shards; the "
                                        "sample order is exact on 1, 2, 3, 6 or a multiple of 6 (12, 18, ...) nodes, "
                                        "which a resume may use, and no other count")
    assert _canonical(remote, 1)[0] == _canonical(local, 6)[0] == 1
    assert _canonical(remote, 1)[1].startswith("one node reads all of the remote data: one canonical node")
    # A mixture with one remote dataset downloads: it is split too.
    mixture = _facts(_stream("s3://bucket/web", proportion=0.7), _stream("/data/cc3m", proportion=0.3),
                     free=100 * GB)
    assert _canonical(mixture, 2)[0] == 2


def _write(out: Path, count: int) -> Path:
    image = io.BytesIO()
    Image.new("RGB", (4, 4), (9, 9, 9)).save(image, format="PNG")
    with MDSWriter(out=str(out), columns={"jpg": "bytes", "txt": "str"}) as writer:
        for index in range(count):
            writer.write({"jpg": image.getvalue(), "txt": f"{out.name} {index}"})
    return out


def test_a_mixture_plan_shows_each_stream_and_the_epoch_streaming_draws(tmp_path):
    big, small = _write(tmp_path / "big", 300), _write(tmp_path / "small", 101)
    facts = data_facts(f"{big}:2,{small}:1", seed=3, local_cache=tmp_path / "cache")
    plan = resolve(Dials(data=f"{big}:2,{small}:1", global_batch=64), CPU_ONLY, lookup("clip", "debug"),
                   n_params=1000, dataset_size=facts.epoch_size, optimizer_support=NO_FUSED, image_size=32, data=facts)
    assert plan.dataset_size == 401
    (first, p_first, n_first), (second, p_second, n_second) = plan.data_streams
    assert (first, second) == (str(big), str(small))
    assert (p_first, p_second) == (round(2 / 3, 6), round(1 / 3, 6))
    # floor(401 x 2/3) = 267 and floor(401 / 3) = 133; the one left over goes to a stream the seed picks.
    assert n_first + n_second == 401 and {n_first, n_second} & {267, 268} and n_second in (133, 134)
    assert "as many samples as its 2 datasets hold together (401)" in dict(
        (d.name, d.reason) for d in plan.decisions)["dataset_size"]
    assert plan.cache_limit is None and "samples repeat within an epoch: " + str(small) in dict(
        (d.name, d.reason) for d in plan.decisions)["data_streams"]


def test_a_mixture_is_checked_dataset_by_dataset(tmp_path):
    good = _write(tmp_path / "good", 4)
    with MDSWriter(out=str(tmp_path / "captionless"), columns={"jpg": "bytes"}) as writer:
        writer.write({"jpg": b"x"})
    with pytest.raises(UserError, match=r"dataset .*captionless: missing column\(s\) \['txt'\]"):
        data_facts(f"{good}:0.5,{tmp_path / 'captionless'}:0.5", seed=0)
    with pytest.raises(UserError, match=r"dataset .*nowhere: no such file or directory"):
        data_facts(f"{good}:0.5,{tmp_path / 'nowhere'}:0.5", seed=0)


def test_the_plan_refuses_a_dataset_size_that_is_not_the_datas_epoch(tmp_path):
    facts = data_facts(str(_write(tmp_path / "one", 40)), seed=0)
    with pytest.raises(ValueError, match="dataset_size 39 is not the data's epoch of 40"):
        resolve(Dials(global_batch=8), CPU_ONLY, lookup("clip", "debug"), n_params=1000, dataset_size=39,
                optimizer_support=NO_FUSED, image_size=32, data=facts)


def test_a_cache_on_a_file_system_the_nodes_share_is_refused_for_several_nodes():
    remote = _stream("s3://bucket/pairs")
    on_nfs = dataclasses.replace(_facts(remote), cache_filesystem="nfs4")
    with pytest.raises(UserError, match=r"shard cache /cache is on a nfs4 file system.*2 nodes.*"
                                        r"CLIPZERO_CACHE at a disk of each node's own"):
        data_decisions(Dials(), on_nfs, dataset_size=on_nfs.epoch_size, local_world_size=8, workers=4, seed=7, nodes=2)
    assert _decide(on_nfs)["cache_limit"][0] is not None  # one node: its cache is its own
    on_disk = dataclasses.replace(on_nfs, cache_filesystem="ext4")
    rows = data_decisions(Dials(), on_disk, dataset_size=on_disk.epoch_size, local_world_size=8, workers=4, seed=7,
                          nodes=2)
    assert dict((name, value) for name, value, _ in rows)["cache_limit"] is not None
    local = dataclasses.replace(_facts(_stream("/data/pairs")), cache_filesystem="nfs4")  # read in place
    assert data_decisions(Dials(), local, dataset_size=local.epoch_size, local_world_size=8, workers=4, seed=7,
                          nodes=2)[1][1] is None


def test_the_file_system_type_is_that_of_the_deepest_mount_above_the_path(tmp_path):
    from engine.files import filesystem_type

    mounts = ("/dev/vda / ext4 rw 0 0\nserver:/home /home nfs4 rw 0 0\n"
              "tmpfs /home/me/fast\\040dir tmpfs rw 0 0\n/dev/vdb /homework xfs rw 0 0\n")
    assert filesystem_type(Path("/home/me/.cache"), mounts) == "nfs4"
    assert filesystem_type(Path("/home/me/fast dir/x"), mounts) == "tmpfs"
    assert filesystem_type(Path("/homework/a"), mounts) == "xfs"   # not under /home
    assert filesystem_type(Path("/var"), mounts) == "ext4"
    assert filesystem_type(tmp_path) not in ("", "proc")           # this machine's real /proc/mounts


def test_the_loader_reads_its_slice_of_the_plan_and_the_streams_prepare_checked(tmp_path):
    """The plan's data decisions are what the loader uses: its settings are the plan's fields of
    the same names, and the StreamingDataset it builds takes the plan's order (seed, algorithm,
    window, canonical nodes) and cache limit, not constants of its own."""
    data = _write(tmp_path / "pairs", 64)
    facts = data_facts(str(data), seed=5)
    plan = resolve(Dials(data=str(data), global_batch=16, seed=5), CPU_ONLY, lookup("clip", "debug"),
                   n_params=1000, dataset_size=facts.epoch_size, optimizer_support=NO_FUSED, image_size=32, data=facts)
    settings = plan.loader_settings()
    assert {f.name for f in dataclasses.fields(LoaderSettings)} <= {f.name for f in dataclasses.fields(plan)}
    for field in dataclasses.fields(LoaderSettings):
        assert getattr(settings, field.name) == getattr(plan, field.name), field.name
    # Another plan's order reaches streaming as that plan states it.
    other = dataclasses.replace(plan, shuffle_seed=9, shuffle_block=1 << 12, shuffle_algo="py1s")
    loader = TrainLoader(facts.streams, other.loader_settings(), spec=DataSpec(), tokenizer=ClipTokenizer(),
                         rank=0, world_size=1)
    dataset = loader._dataset
    assert (dataset.shuffle_seed, dataset.shuffle_block_size, dataset.shuffle_algo) == (9, 1 << 12, "py1s")
    assert dataset.num_canonical_nodes == plan.canonical_nodes and dataset.cache_limit is None
    assert loader.seed == 5 and loader.global_batch == plan.global_batch
    del loader, dataset


def test_loader_settings_refuse_what_no_loader_can_use():
    with pytest.raises(UserError, match=r"micro_batch \(0\).*must be positive"):
        LoaderSettings(micro_batch=0, image_size=16, seed=0)
    with pytest.raises(UserError, match="decode device 'tpu' is not one of 'cpu', 'gpu'"):
        LoaderSettings(micro_batch=8, image_size=16, seed=0, decode_device="tpu")
    assert LoaderSettings(micro_batch=8, image_size=16, seed=3).shuffle_seed == 3  # the run's seed by default
