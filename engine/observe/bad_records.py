"""The bad records every rank met, summed over ranks and over the restarts of one run.

Each rank's loader counts the bad records in the batches it took (engine/data/records.py).
This loop hook adds up those counts across ranks at the steps where the loop logs or saves, and
carries the total in every checkpoint, so that metrics.jsonl, TensorBoard and the end-of-run
summary report the whole run, not the part since the last restart.
"""
from __future__ import annotations

import re
from collections import Counter

import torch
import torch.distributed as torch_dist

from engine import dist
from engine.data.records import REASONS
from engine.observe.hooks import LoopHook

METRIC_PREFIX = "data/bad_records"


class BadRecordTally(LoopHook):
    def __init__(self, rank_counts: Counter, device: torch.device, carried: dict[str, int] | None = None):
        """`rank_counts`: this rank's loader's counts, which it keeps adding to (engine/data/loader.py's
        `bad_records`); `carried`: the totals saved in the checkpoint this run resumed from."""
        self.totals: Counter[str] = Counter({reason: int(n) for reason, n in (carried or {}).items() if n})
        self._rank_counts, self._device = rank_counts, device
        self._counted: Counter[str] = Counter()  # of this process's loader counts, those already in totals

    def scalars(self, step: int) -> dict[str, int]:
        self.update()
        return self.metrics()

    def rank_state(self) -> dict:
        self.update()
        return {"bad_records": dict(self.totals)}

    def update(self) -> None:
        """Add what every rank counted since the last update. A collective: every rank calls it at the same step."""
        fresh = torch.tensor([self._rank_counts[reason] - self._counted[reason] for reason in REASONS],
                             dtype=torch.float64, device=self._device)  # float64: exact to 2**53, and NCCL sums it
        self._counted = Counter(self._rank_counts)
        if dist.world_size() > 1:
            torch_dist.all_reduce(fresh)
        self.totals.update({reason: round(n) for reason, n in zip(REASONS, fresh.tolist()) if n})

    def metrics(self) -> dict[str, int]:
        """{'data/bad_records': total, 'data/bad_records/<reason>': count, ...}; empty while there are none."""
        if not self.totals:
            return {}
        return {METRIC_PREFIX: sum(self.totals.values()),
                **{f"{METRIC_PREFIX}/{metric_name(reason)}": n for reason, n in sorted(self.totals.items())}}

    def summary(self) -> str:
        if not self.totals:
            return "bad records: none met"
        reasons = ", ".join(f"{n:,} {reason}" for reason, n in self.totals.most_common())
        return (f"bad records replaced by stand-ins: {sum(self.totals.values()):,} ({reasons}); "
                f"convert the data with launchers/convert.py to leave them out for good")


def metric_name(reason: str) -> str:
    """'image under 8 px' -> 'image_under_8_px': a name TensorBoard groups and plots cleanly."""
    return re.sub(r"[^0-9a-z]+", "_", reason.lower()).strip("_")
