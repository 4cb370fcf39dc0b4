"""launchers/convert.py from and to the object store (moto's real S3 server, s3_server.py):
webdataset tars and img2dataset parquet read from s3://, MDS written to s3:// in parts that a
merge publishes (index.json last), read back by streaming's StreamingDataset with exactly the
samples of a local conversion, in order; reruns convert only the missing files; bad input stops
before any work with a message naming what to change."""
import json
import os
import re
import signal
import subprocess

import pyarrow as pa
import pytest
from streaming import StreamingDataset

from engine.data.convert import convert, merge, remote, staged, writer
from engine.errors import UserError
from launchers.convert import main as convert_main
from tests.small_disk import mount_tmpfs
from s3_server import BUCKET, s3_server  # noqa: F401  (the session fixture)
from tests.unit.test_convert_sources import (_img2dataset_columns, _image, _samples, _write_parquet,
                                             _write_tar)

BLOCK = 16  # pairs per block: several blocks and shards per file, in a small source


def _tars(folder, sizes, side: int = 8):
    """img2dataset-like tars of `sizes` samples (every 7th without its caption): the good pairs in order."""
    folder.mkdir(parents=True)
    pairs, n = [], 0
    for t, size in enumerate(sizes):
        members = []
        for _ in range(size):
            encoded, caption = _image(n, size=(side, side)), f"sample {n}"
            members.append((f"{n:09d}.jpg", encoded))
            if n % 7:
                members.append((f"{n:09d}.txt", caption.encode()))
                pairs.append((encoded, caption))
            members.append((f"{n:09d}.json", b"{}"))
            n += 1
        _write_tar(folder / f"{t:05d}.tar", members)
        _write_parquet(folder / f"{t:05d}.parquet", {"key": [str(i) for i in range(size)]})  # metadata: ignored
    return pairs


def _streamed(url, cache) -> list[tuple[bytes, str]]:
    dataset = StreamingDataset(remote=url, local=str(cache), shuffle=False, batch_size=1)
    return [(sample["jpg"], sample["txt"]) for sample in dataset]


@pytest.fixture
def s3_env(s3_server, monkeypatch):  # noqa: F811
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(writer, "ENTRIES_PER_BLOCK", BLOCK)
    return s3_server


def _keys(server, prefix):
    pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/")
    return sorted(item["Key"][len(prefix) + 1:] for page in pages for item in page.get("Contents", []))


def test_tars_in_parts_merge_into_one_dataset_that_streams_like_a_local_conversion(s3_env, tmp_path, monkeypatch):
    pairs = _tars(tmp_path / "src", [40, 25, 3, 30])
    local = convert(tmp_path / "src", tmp_path / "local", workers=1, log=lambda line: None)
    assert _samples(tmp_path / "local") == pairs and local.written == len(pairs)
    source = s3_env.upload(tmp_path / "src", "tars")
    out = f"s3://{BUCKET}/mds/tars"
    lines = []

    # Part 0 of 2 (files 0 and 2) dies after its first file is in the store.
    upload = staged.upload_file

    def die_after_one(store, plan, index, marker):
        upload(store, plan, index, marker)
        raise RuntimeError("killed")
    monkeypatch.setattr(staged, "upload_file", die_after_one)
    with pytest.raises(RuntimeError, match="killed"):
        convert(source, out, workers=1, part=(0, 2), staging=tmp_path / "staging", log=lines.append)
    monkeypatch.setattr(staged, "upload_file", upload)
    keys = _keys(s3_env, "mds/tars")
    assert "index.json" not in keys and [k for k in keys if k.startswith(".converting/done/")][0][:22] == \
        ".converting/done/00000"
    assert not list((tmp_path / "staging").iterdir())  # the staging folder goes with the run

    with pytest.raises(UserError, match=r"3 of 4 source files are not converted yet \(part\(s\) 0, 1 of 2\).*"
                                        r"--part 0/2"):
        merge(out)
    lines.clear()
    report = convert(source, out, workers=1, part=(0, 2), log=lines.append)  # only file 2 is left
    assert any("resuming: 1 of the 2 source file(s)" in line for line in lines)
    assert [line.split(":")[0].strip() for line in lines if "pairs written" in line] == ["00002.tar"]
    assert report.written == 3  # samples 65, 66 and 67 all have captions
    with pytest.raises(UserError, match=r"part\(s\) 1 of 2"):
        merge(out)
    convert(source, out, workers=2, part=(1, 2), log=lambda line: None)  # files 1 and 3, one per worker
    assert "index.json" not in _keys(s3_env, "mds/tars")  # no dataset before the merge

    assert convert_main(["--merge", out]) == 0
    keys = _keys(s3_env, "mds/tars")
    assert not [k for k in keys if k.startswith(".converting")] and "convert_report.json" in keys
    assert _streamed(out, tmp_path / "cache") == pairs
    report = json.loads((s3_env.client().get_object(Bucket=BUCKET, Key="mds/tars/convert_report.json")
                         ["Body"].read()))
    assert report["written"] == len(pairs) and report["skipped"]["missing caption file"]["count"] == 98 - len(pairs)
    with pytest.raises(UserError, match="holds a published dataset and no converted files"):
        merge(out)
    with pytest.raises(UserError, match="already holds a published dataset.*--overwrite"):
        convert(source, out, workers=1, log=lambda line: None)


def test_img2dataset_parquet_with_workers_and_no_part_publishes_at_once(s3_env, tmp_path):
    folder, pairs = tmp_path / "laion", []
    folder.mkdir()
    for f in range(3):
        batch = [(_image(10 * f + i, size=(8, 8)), f"photo {f} {i}") for i in range(20 + f)]
        statuses = ["failed_to_download" if i % 5 == 3 else "success" for i in range(len(batch))]
        columns = _img2dataset_columns(batch, statuses)
        columns["jpg"] = pa.array([e if s == "success" else None for (e, _), s in zip(batch, statuses)],
                                  type=pa.binary())
        _write_parquet(folder / f"{f:05d}.parquet", columns)
        (folder / f"{f:05d}_stats.json").write_text("{}")
        pairs += [p for p, s in zip(batch, statuses) if s == "success"]
    convert(folder, tmp_path / "local", workers=1, log=lambda line: None)
    assert _samples(tmp_path / "local") == pairs
    source, out = s3_env.upload(folder, "laion"), f"s3://{BUCKET}/mds/laion"
    report = convert(source, out, workers=2, log=lambda line: None)
    assert report.written == len(pairs) and report.skipped == {"download failed (img2dataset status)": 12}
    assert _streamed(out, tmp_path / "cache") == pairs

    # A local folder of the same files to the store: the same dataset.
    other = f"s3://{BUCKET}/mds/laion-from-disk"
    assert convert_main([str(folder), other, "--workers", "1"]) == 0
    assert _streamed(other, tmp_path / "cache2") == pairs


def test_bad_input_stops_before_any_work_naming_what_to_change(s3_env, tmp_path, monkeypatch, capsys):
    _tars(tmp_path / "src", [3])
    source = s3_env.upload(tmp_path / "src", "bad-src")
    out = f"s3://{BUCKET}/mds/bad"

    def refused(args, pattern):
        assert convert_main([*args, "--staging", str(tmp_path / "staging")]) == 2
        message = capsys.readouterr().err
        assert re.search(pattern, message), message
        print("MSG", message, file=__import__("sys").__stdout__)
        assert _keys(s3_env, "mds/bad") == []  # nothing written
        return message

    refused([f"s3://no-such-bucket-{BUCKET}/x", out], r"bucket 'no-such-bucket-clipzero-test' does not exist")
    refused([f"s3://{BUCKET}/nothing-here", out], r"nothing-here: no \.tar object .*prefix is empty or does not "
                                                  r"exist.*give the prefix")
    refused([source, f"s3://no-such-out-{BUCKET}/mds"], r"bucket 'no-such-out-clipzero-test' does not exist")
    refused([source, str(tmp_path / "local-out")], r"writes to the object store: give OUT as s3://")
    refused([source, f"s3://{BUCKET}/bad-src", "--overwrite"], r"output s3://clipzero-test/bad-src holds the source")
    assert _keys(s3_env, "bad-src") == ["00000.parquet", "00000.tar"]
    refused([source, out, "--label-column", "cls"], r"needs --classes")
    refused([source, out, "--split", "test"], r"drop --split")
    monkeypatch.setenv("S3_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    for key in s3_env.env:
        if key != "S3_ENDPOINT_URL":
            monkeypatch.setenv(key, s3_env.env[key])
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    refused([source, out], r"the store did not answer \(endpoint http://127.0.0.1:9\): check S3_ENDPOINT_URL")

    monkeypatch.setenv("S3_ENDPOINT_URL", s3_env.endpoint)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN",
                "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "empty-home"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    refused([source, out], r"no credentials were found: set AWS_ACCESS_KEY_ID")


def test_a_small_staging_disk_is_refused_before_work_and_a_full_one_resumes(s3_env, tmp_path, monkeypatch):
    """A real 1 MiB file system as --staging: refused up front (the source files' sizes are listed);
    with the check turned off, it fills up mid-run (the third tar alone is larger than the disk):
    one line naming --staging, and the rerun on a larger disk converts only the files not done."""
    pairs = _tars(tmp_path / "src", [30, 30, 200], side=64)
    assert (tmp_path / "src" / "00002.tar").stat().st_size > 2**20
    source, out = s3_env.upload(tmp_path / "src", "big-src"), f"s3://{BUCKET}/mds/full"
    disk = tmp_path / "disk"
    mount_tmpfs(disk, "size=1M")
    try:
        with pytest.raises(UserError, match=rf"the staging folder {disk} has 1 MiB free; 1 worker\(s\) need about "
                                            r"\d+ MiB there .*give --staging DIR on a disk with more room"):
            convert(source, out, workers=1, staging=disk, log=lambda line: None)
        monkeypatch.setattr(remote, "SPACE_PER_WORKER", 0)
        monkeypatch.setattr(remote, "SPACE_MARGIN", 0)
        with pytest.raises(UserError, match=rf"no space left in the staging folder {disk}/clipzero-convert-.*give "
                                            r"--staging DIR on a disk with more room.*converts only the files not done"):
            convert(source, out, workers=1, staging=disk, log=lambda line: None)
        assert not list(disk.iterdir())  # the run's staging folder went with it
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
    # File 0 is done; file 1 too unless file 2's download filled the disk while its shards were written.
    done = [f"{k[17:22]}.tar" for k in _keys(s3_env, "mds/full") if k.startswith(".converting/done/")]
    assert done in (["00000.tar"], ["00000.tar", "00001.tar"])
    lines = []
    convert(source, out, workers=1, staging=tmp_path / "roomy", log=lines.append)
    assert [line.split(":")[0].strip() for line in lines if "pairs written" in line] == \
        [name for name in ("00000.tar", "00001.tar", "00002.tar") if name not in done]
    assert _streamed(out, tmp_path / "cache") == pairs


def test_a_killed_worker_ends_the_run_with_a_message_and_the_rerun_finishes(s3_env, tmp_path, monkeypatch, capfd):
    pairs = _tars(tmp_path / "src", [20, 20, 20, 20])
    source, out = s3_env.upload(tmp_path / "src", "kill-src"), f"s3://{BUCKET}/mds/killed"
    convert_file = staged.convert_file

    def killed_on_file_1(plan, index, local, root):
        if index == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer would
        return convert_file(plan, index, local, root)
    monkeypatch.setattr(staged, "convert_file", killed_on_file_1)  # the forked workers inherit it
    with pytest.raises(UserError, match=r"a convert worker died .*run the same command again, it converts only"):
        convert(source, out, workers=2, log=lambda line: None)
    keys = _keys(s3_env, "mds/killed")
    done = {f"{k[17:22]}.tar" for k in keys if k.startswith(".converting/done/")}
    assert "index.json" not in keys and "00001.tar" not in done
    monkeypatch.setattr(staged, "convert_file", convert_file)
    capfd.readouterr()
    convert(source, out, workers=2, log=lambda line: None)
    rerun = capfd.readouterr().err  # the workers' lines, one per converted file
    converted = {line.split(":")[0].strip() for line in rerun.splitlines() if "pairs written" in line}
    # A marker whose PUT was in flight when the worker died may land after the listing above: whole anyway.
    assert "00001.tar" in converted and not converted & done
    assert _streamed(out, tmp_path / "cache") == pairs
