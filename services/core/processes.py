"""Process-level helpers: children that never outlive their parent (Linux PR_SET_PDEATHSIG), and handing the C
heap's free pages back to the kernel after a model load."""

from __future__ import annotations

import ctypes
import ctypes.util
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask the kernel to SIGTERM this process when its parent dies (preexec_fn)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def release_free_heap() -> None:
    """Return the C heap's free pages to the kernel (glibc's malloc_trim; nothing elsewhere).

    Loading a checkpoint allocates and frees large temporaries (each tensor read, then laid out for the kernels);
    glibc keeps the freed pages in its arenas, where they count in the process's resident memory for good (about
    60 MiB on the benchmark model's expert shard).
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim): nothing to hand back
        pass
