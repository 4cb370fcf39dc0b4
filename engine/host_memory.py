"""Keep the training process's freed host memory mapped, so that each step does not fault its
working set back in.

A training step on the CPU allocates and frees the same activations and gradients every step,
many of them megabytes each. glibc's malloc hands such blocks back to the kernel when they are
freed (blocks above its mmap threshold are unmapped; the top of the heap is trimmed), so the
next step takes a page fault on every page again: the kernel zeroes and maps each one, in
system time that `benchmarks/e2e_openclip.py --step-times` shows as a slower step through the
launcher than in-process. Raising the mmap threshold to glibc's
ceiling and the trim threshold to its largest value keeps freed blocks in the heap for the next
step; the process's resident memory then stays at its high-water mark instead of shrinking
between steps (processes forked later, such as DataLoader workers, inherit the setting and keep
their own, much smaller, high-water mark).

This is what the MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ environment variables do,
set from inside the process: a user's command line stays as it is.
"""
import ctypes
import sys

# mallopt's parameters (malloc.h) and glibc's largest mmap threshold on 64-bit systems
# (DEFAULT_MMAP_THRESHOLD_MAX: 4 MiB x sizeof(long)); mallopt takes an int.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 * 1024 * 1024
TRIM_THRESHOLD = 2**31 - 1


def keep_freed_memory() -> bool:
    """Set glibc's thresholds for this process (and the ones it forks); False where the C
    library is not glibc (macOS, musl) or refuses, and nothing changes."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # Each returns 1 on success; both are tried, so that one refusal leaves the other set.
    mapped = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    trimmed = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return mapped and trimmed
