"""Each node downloads only its share of remote data (issue 30, item 1), on the real pieces: an
S3-API server (moto's, as s3_server.py starts it) and two, then four "hosts" in network
namespaces (two_hosts.py), one small training-loader rank in each, each with its own shard cache and
temporary directory. The rank takes the canonical node count the plan decides
(engine/plan/data.py) and streams one epoch; the bytes each host fetched are counted on the
server's side, from its request log (client address and object of every GET) and the objects'
sizes.

The server runs inside the first host's namespace, bound to its veth address (which exists only
inside the namespaces, as 127.0.0.1 keeps s3_server.py's off the network), since the machine's
own 127.0.0.1 is out of the namespaces' reach: the other hosts fetch across the
link, the first from its own address; the log tells them apart by that address.
"""
import json
import re
import subprocess
import sys
import textwrap
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from streaming import LocalDataset, MDSWriter

from s3_server import BUCKET, CREDENTIALS, moto_server_command
from launching import ROOT
from loud_skip import skip_loudly

SAMPLES, SHARD_LIMIT = 480, 1 << 13  # 8 KB shards of about 5 digits: some 90 shards
PORT, MASTER_PORT = 9000, 29871      # inside the namespaces: nothing else listens there
PREFIX = "share"

UPLOAD = textwrap.dedent("""
    import sys
    from pathlib import Path
    import boto3
    endpoint, bucket, prefix, folder = sys.argv[1:]
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket=bucket)
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")
""")

# One rank: the canonical nodes as the plan decides them for this data on this many nodes, then
# one whole epoch of the training loader.
RANK = textwrap.dedent("""
    import json, os, sys
    from itertools import islice
    from pathlib import Path
    import torch.distributed as dist
    from engine.data.loader import LoaderSettings, TrainLoader
    from engine.data.spec import DataSpec
    from engine.data.streams import bytes_under, data_facts
    from engine.data.text import ClipTokenizer
    from engine.plan.data import canonical_nodes

    data, cache, out = sys.argv[1:]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    facts = data_facts(data, seed=3, local_cache=Path(cache))
    canonical, reason = canonical_nodes(facts, nodes=world)
    settings = LoaderSettings(micro_batch=8, image_size=8, seed=3, canonical_nodes=canonical)
    loader = TrainLoader(facts.streams, settings, spec=DataSpec(), tokenizer=ClipTokenizer(), rank=rank,
                         world_size=world)
    ids = [batch["sample_id"].tolist() for batch in islice(iter(loader), loader.batches_per_epoch)]
    dist.barrier()
    json.dump({"canonical": canonical, "reason": reason, "ids": ids, "cached": bytes_under(Path(cache))},
              open(out, "w"))
""")

LOG_LINE = re.compile(r'^(\S+) - - \[[^]]*\] "GET /' + BUCKET + r'/(\S+) HTTP/[\d.]+" (\d+)')


def _write_digits(digits_train: Path, out: Path) -> Path:
    source = LocalDataset(local=str(digits_train))
    with MDSWriter(out=str(out), columns={"jpg": "bytes", "txt": "str"}, size_limit=SHARD_LIMIT) as writer:
        for index in range(SAMPLES):
            writer.write({"jpg": source[index]["jpg"], "txt": source[index]["txt"]})
    return out


@dataclass(frozen=True)
class Served:
    hosts: object               # two_hosts.TwoHosts
    endpoint: str
    sizes: dict[str, int]       # bytes of each object of the dataset, by key
    log: Path                   # the server's request log
    most: float                 # the share of the data one node may fetch


@pytest.fixture(scope="module", params=[(2, 0.6), (4, 0.35)], ids=["two_hosts", "four_hosts"])
def served(request, digits, tmp_path_factory):
    """The S3-API server in host 0's namespace, holding the dataset, for two or four hosts."""
    count, most = request.param
    hosts = request.getfixturevalue("two_hosts" if count == 2 else "four_hosts")
    command = moto_server_command()
    if command is None:
        skip_loudly("moto_server not found: install the test extra (pip install -e '.[test]')")
    tmp = tmp_path_factory.mktemp("node_share")
    folder = _write_digits(digits.train, tmp / "digits")
    endpoint, log = f"http://{hosts.addresses[0]}:{PORT}", tmp / "moto.log"
    server = hosts.popen(0, [command, "-H", hosts.addresses[0], "-p", str(PORT)], env=None,
                         stdout=log.open("w"), stderr=subprocess.STDOUT)
    env = {**CREDENTIALS, "PATH": "/usr/bin:/bin"}
    deadline = time.monotonic() + 60
    while True:  # uploads once the server answers (from inside the namespace: nothing else reaches it)
        upload = hosts.run(0, [sys.executable, "-c", UPLOAD, endpoint, BUCKET, PREFIX, folder], env=env)
        if upload.returncode == 0:
            break
        assert server.poll() is None and time.monotonic() < deadline, upload.stderr[-2000:] + log.read_text()[-2000:]
        time.sleep(0.5)
    sizes = {f"{PREFIX}/{path.relative_to(folder).as_posix()}": path.stat().st_size
             for path in folder.rglob("*") if path.is_file()}
    yield Served(hosts, endpoint, sizes, log, most)
    server.terminate()
    server.wait(timeout=10)


def _fetched(log: Path, sizes: dict[str, int]) -> Counter:
    """Bytes the server sent each client address: the size of every object it served whole."""
    served = Counter()
    for line in log.read_text().splitlines():
        match = LOG_LINE.match(line)
        if match and match.group(2) in sizes:
            client, key, status = match.groups()
            assert status == "200", line  # a whole object: a range request would be counted wrong
            served[client] += sizes[key]
    return served


def test_each_node_fetches_only_its_share_of_remote_data(served, tmp_path):
    hosts, count = served.hosts, len(served.hosts.namespaces)
    before = _fetched(served.log, served.sizes)  # the upload's own requests are PUTs: nothing yet
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    ranks = []
    for rank in range(count):
        host = tmp_path / f"host{rank}"
        (host / "tmp").mkdir(parents=True)
        env = {**CREDENTIALS, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "S3_ENDPOINT_URL": served.endpoint,
               **hosts.env(rank, MASTER_PORT), "RANK": str(rank), "WORLD_SIZE": str(count), "LOCAL_RANK": "0",
               "LOCAL_WORLD_SIZE": "1", "TMPDIR": str(host / "tmp")}  # streaming's file locks: each host its own
        ranks.append(hosts.popen(rank, [sys.executable, script, f"s3://{BUCKET}/{PREFIX}", host / "cache",
                                        host / "out.json"], env=env, stdout=(host / "log").open("w"),
                                 stderr=subprocess.STDOUT))
    for rank, process in enumerate(ranks):
        try:
            process.wait(timeout=300)
        except subprocess.TimeoutExpired:
            pytest.fail(f"rank {rank} did not finish its epoch in 300 s")
    logs = "".join((tmp_path / f"host{rank}" / "log").read_text()[-2000:] for rank in range(count))
    assert [process.returncode for process in ranks] == [0] * count, logs
    results = [json.loads((tmp_path / f"host{rank}" / "out.json").read_text()) for rank in range(count)]
    assert [result["canonical"] for result in results] == [count] * count, results[0]["reason"]
    # The epoch itself: every sample of its whole steps once, over all nodes.
    taken = [i for result in results for batch in result["ids"] for i in batch]
    assert len(taken) == len(set(taken)) == SAMPLES // (8 * count) * 8 * count

    fetched = _fetched(served.log, served.sizes) - before
    total = sum(served.sizes.values())
    shares = {client: fetched[client] / total for client in hosts.addresses}
    print(f"{count} nodes, bytes fetched per node of {total:,}: "
          + ", ".join(f"{client} {fetched[client]:,} ({share:.2f})" for client, share in shares.items()))
    assert set(fetched) <= set(hosts.addresses)
    assert all(share <= served.most for share in shares.values()), shares
    assert 0.95 <= sum(shares.values()) <= 1.15, shares  # the whole dataset about once, together
    # What landed in each host's own cache says the same.
    cached = [result["cached"] / total for result in results]
    assert all(share <= served.most for share in cached), cached
