"""What a conversion did: a live progress line while it runs, a summary and `convert_report.json` at the end."""
from __future__ import annotations

import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tqdm import tqdm

EXAMPLES_PER_REASON = 3
PROGRESS_EVERY_S = 30.0  # a log line this often when stderr is not a terminal (a batch job's log)
REPORT_NAME = "convert_report.json"


@dataclass
class Report:
    out: Path
    written: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    reencoded: int = 0
    shards: int = 0
    bytes: int = 0
    seconds: float = 0.0         # this run's, a resumed run's included
    processed: int = 0           # listing entries this run handled (blocks an earlier run finished excluded)
    blocks: int = 0
    resumed_blocks: int = 0      # blocks an interrupted earlier run had finished
    workers: int = 1
    source: str = ""
    options: dict = field(default_factory=dict)
    classes: int | None = None   # number of classes when the dataset has labels
    max_side: int | None = None

    def add_block(self, record: dict) -> None:
        """Fold in one finished block's counts; called in block order, so the examples are the listing's first."""
        self.written += record["written"]
        self.reencoded += record["reencoded"]
        self.shards += len(record["shards"])
        for reason, count in record["skipped"].items():
            self.skipped[reason] += count
            shown = self.examples.setdefault(reason, [])
            shown.extend(record["examples"][reason][:EXAMPLES_PER_REASON - len(shown)])

    @property
    def pairs_per_s(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        lines = [f"wrote {self.written:,} samples to {self.out}: {self.shards} shard(s), "
                 f"{self.bytes / 2**20:,.1f} MiB, {self.seconds:.1f} s ({self.pairs_per_s:,.0f} pairs/s, "
                 f"{self.workers} worker(s))"]
        if self.resumed_blocks:
            lines.append(f"resumed: {self.resumed_blocks} of {self.blocks} block(s) came from the interrupted run")
        if self.max_side is not None:
            lines.append(f"re-encoded {self.reencoded:,} image(s) larger than {self.max_side} px as JPEG")
        if self.classes is not None:
            lines.append(f"labels: {self.classes} class(es) in classes.json, ids in the `cls` column")
        if self.skipped:
            lines.append(f"skipped {sum(self.skipped.values()):,}:")
            for reason, count in self.skipped.most_common():
                lines.append(f"  {count:,} {reason}, e.g. " + "; ".join(self.examples[reason]))
        return "\n".join(lines)

    def as_json(self) -> dict:
        return {
            "out": str(self.out), "source": self.source, "options": self.options, "workers": self.workers,
            "written": self.written, "skipped_total": sum(self.skipped.values()),
            "skipped": {reason: {"count": count, "examples": self.examples[reason]}
                        for reason, count in self.skipped.most_common()},
            "reencoded": self.reencoded, "shards": self.shards, "bytes": self.bytes,
            "seconds": round(self.seconds, 3), "pairs_per_s": round(self.pairs_per_s, 1),
            "processed_this_run": self.processed, "blocks": self.blocks, "resumed_blocks": self.resumed_blocks,
            "classes": self.classes,
        }

    def write(self, folder: Path) -> None:
        (folder / REPORT_NAME).write_text(json.dumps(self.as_json(), indent=1) + "\n")


class Progress:
    """Pairs handled and written so far: a tqdm bar on a terminal, else a log line every PROGRESS_EVERY_S."""

    def __init__(self, log: Callable[[str], None], total: int | None = None, stream=None):
        stream = stream if stream is not None else sys.stderr
        self.log = log
        self.started = self.last_line = time.monotonic()
        self.processed = self.written = 0
        self.bar = None
        if stream.isatty():
            self.bar = tqdm(total=total, unit="pair", file=stream, dynamic_ncols=True, mininterval=0.5)

    def add(self, processed: int, written: int) -> None:
        self.processed += processed
        self.written += written
        if self.bar is not None:
            self.bar.set_postfix(written=self.written, skipped=self.processed - self.written, refresh=False)
            self.bar.update(processed)
        elif time.monotonic() - self.last_line >= PROGRESS_EVERY_S:
            self.last_line = time.monotonic()
            rate = self.processed / max(self.last_line - self.started, 1e-9)
            self.log(f"  {self.processed:,} pairs handled ({self.written:,} written, "
                     f"{self.processed - self.written:,} skipped), {rate:,.0f} pairs/s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Ticker:
    """Counts pairs one by one and passes the sums on at most every `every_s` seconds (cheap per pair)."""

    def __init__(self, sink: Callable[[int, int], None], every_s: float = 0.5):
        self.sink, self.every_s = sink, every_s
        self.processed = self.written = 0
        self.last = time.monotonic()

    def __call__(self, written: bool) -> None:
        self.processed += 1
        self.written += written
        if time.monotonic() - self.last >= self.every_s:
            self.flush()

    def flush(self) -> None:
        if self.processed:
            self.sink(self.processed, self.written)
        self.processed = self.written = 0
        self.last = time.monotonic()
