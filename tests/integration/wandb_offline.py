"""What wandb's offline mode (WANDB_MODE=offline) left in a run directory, read back without a
network or a mock: the records of each RUN/wandb/offline-run-*/run-<id>.wandb.

That file is wandb's transaction log: a 7-byte header (":W&B", magic 0xBEE1, version 0), then
LevelDB-log records in 32 KiB blocks, each chunk with a 7-byte header (CRC-32 of its type byte
and data, length, type: full, first, middle or last), a block's tail too short for a header
left as zeros. A whole record is one wandb_internal_pb2.Record (run, config, history, ...).
wandb 0.31 has no Python reader of its own (its service, wandb-core, reads and writes them).
"""
import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

BLOCK = 32 * 1024
HEADER = struct.Struct("<IHB")   # crc32, length, type
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


@dataclass
class OfflineRun:
    path: Path
    run_id: str
    project: str
    config: dict            # the latest value of each key
    history: dict[int, dict]  # step -> the row logged at it, wandb's own keys (_step, _runtime, ...) left out


def offline_runs(run_dir: Path) -> list[OfflineRun]:
    """Every offline run under RUN/wandb/, oldest first."""
    return [_read(path) for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))]


def _read(path: Path) -> OfflineRun:
    from wandb.proto import wandb_internal_pb2

    run = OfflineRun(path, "", "", {}, {})
    for data in _records(path.read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.run_id, run.project = record.run.run_id, record.run.project
            run.config.update(_items(record.run.config.update))
        elif kind == "config":
            run.config.update(_items(record.config.update))
        elif kind == "history":
            row = _items(record.history.item)
            run.history.setdefault(row["_step"], {}).update(
                {key: value for key, value in row.items() if not key.startswith("_")})
    run.config.pop("_wandb", None)
    return run


def _items(items) -> dict:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def _records(data: bytes):
    ident, magic, version = struct.unpack_from("<4sHB", data)
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), (ident, magic, version)
    pos, pending = 7, b""
    while pos + HEADER.size <= len(data):
        if BLOCK - pos % BLOCK < HEADER.size:   # a block's zero-filled tail
            pos += BLOCK - pos % BLOCK
            continue
        crc, length, kind = HEADER.unpack_from(data, pos)
        if kind == 0:   # zeros: the rest of the block is padding
            pos += BLOCK - pos % BLOCK
            continue
        chunk = data[pos + HEADER.size:pos + HEADER.size + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"a damaged record at byte {pos}"
        pos += HEADER.size + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            yield pending
