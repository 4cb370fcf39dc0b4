"""Stale streaming shared memory goes; a live run's stays (engine/data/shared_memory.py)."""
import mmap
import os
import signal
import subprocess
import sys
import threading
import time
from multiprocessing import shared_memory
from pathlib import Path

from engine.data.shared_memory import SHM, mapped_shared_memory, remove_stale_streaming_memory

# Prefixes far above what streaming hands out (it counts up from 0).
STALE, LIVE, KILLED = "987650", "987651", "987652"


def _segment(name: str) -> shared_memory.SharedMemory:
    segment = shared_memory.SharedMemory(name, create=True, size=64)
    # Not the resource tracker's to clean at exit: the test decides what is removed.
    from multiprocessing import resource_tracker
    resource_tracker.unregister(segment._name, "shared_memory")
    return segment


def test_only_segments_no_process_maps_are_removed():
    stale = [_segment(f"{STALE}_{what}") for what in ("locals", "barrier")]
    for segment in stale:
        segment.close()  # unmapped, not unlinked: what a killed run leaves
    live = _segment(f"{LIVE}_locals")  # mapped by this process, as a live dataset's
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from multiprocessing import shared_memory, resource_tracker;"
         f"s = shared_memory.SharedMemory('{KILLED}_locals', create=True, size=64);"
         "resource_tracker.unregister(s._name, 'shared_memory'); print('ready', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        assert f"{KILLED}_locals" in mapped_shared_memory()
        removed = remove_stale_streaming_memory()
        assert {f"{STALE}_locals", f"{STALE}_barrier"} <= set(removed)
        assert (SHM / f"{LIVE}_locals").exists() and (SHM / f"{KILLED}_locals").exists()

        os.kill(holder.pid, signal.SIGKILL)  # the holder dies without freeing its segment
        holder.wait()
        time.sleep(0.1)
        assert f"{KILLED}_locals" in remove_stale_streaming_memory()
        assert not (SHM / f"{KILLED}_locals").exists() and (SHM / f"{LIVE}_locals").exists()
    finally:
        holder.kill()
        live.close()
        live.unlink()
        for name in (f"{STALE}_locals", f"{STALE}_barrier", f"{KILLED}_locals"):
            Path(SHM / name).unlink(missing_ok=True)


STARTING = "987653"


def test_a_segment_mapped_just_after_the_first_look_is_kept():
    # What a run starting at the same moment holds: its leader created the segment and maps it
    # a moment later (a loaded machine can delay that between the two system calls).
    path = SHM / f"{STARTING}_locals"
    descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    os.ftruncate(descriptor, 64)
    mapped = []
    late = threading.Timer(0.3, lambda: mapped.append(mmap.mmap(descriptor, 64)))
    late.start()
    try:
        assert f"{STARTING}_locals" not in mapped_shared_memory()
        assert f"{STARTING}_locals" not in remove_stale_streaming_memory()
        assert mapped and path.exists()
    finally:
        late.join()
        for view in mapped:
            view.close()
        os.close(descriptor)
        path.unlink(missing_ok=True)
