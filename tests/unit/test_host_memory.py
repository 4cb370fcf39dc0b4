"""engine/host_memory.py: with glibc's thresholds raised, blocks freed by one step are reused by
the next without faulting their pages in again (each process is fresh: the setting is global)."""
import subprocess
import sys

import pytest

# Twelve tensors of 1 to 30 MiB made, filled and freed, six times over; the page faults of the
# last five rounds are printed. The first argument says whether to keep freed memory first.
ROUNDS = """
import resource, sys, torch
from engine.host_memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
torch.set_num_threads(1)
def one_round():
    tensors = [torch.empty(mib * 2**18).fill_(1.0) for mib in (1, 3, 7, 15, 2, 5, 11, 9, 30, 6, 4, 13)]
    del tensors
one_round()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    one_round()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", ROUNDS, mode], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_are_reused_without_faulting_their_pages_again():
    default, kept = _faults("default"), _faults("keep")
    # 106 MiB a round is 27,000 pages: by default several rounds' worth fault again.
    assert default > 15_000, default
    assert kept < default / 3, (kept, default)
