"""Keep freed memory in the process so large activations are not page-faulted in anew.

A DBNet++ forward at 1x3x1024x1824 allocates and frees dozens of tensors of 30-120 MB. glibc's
malloc serves every block above 32 MB (and, with its adaptive threshold, most above 128 KiB)
with a fresh ``mmap`` and gives it back with ``munmap`` on free, so every forward pays the
kernel's page faults and zero-filling on each of them again: on the 2-core CPU of
``benchmarks/forward.py`` about 1.2 s of a 6.5 s forward.

``keep_freed_memory()`` tells glibc (``mallopt``) to serve large blocks from the heap
(``M_MMAP_MAX = 0``) and not to give freed heap memory back to the system
(``M_TRIM_THRESHOLD``), so the second and later forwards reuse pages already mapped. The same
as starting Python with ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647``.

The setting is process-wide and lasts until ``restore_default()``: the process keeps its
peak memory (one forward's working set) instead of returning it between calls, which is what
an inference or training process wants. Nothing happens outside Linux with glibc (macOS,
Windows, musl): the functions return False there.
"""

import ctypes
import sys
import threading
from typing import Optional

__all__ = ["keep_freed_memory", "is_keeping_freed_memory", "restore_default"]

# mallopt parameters (<malloc.h>)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
# glibc defaults (mallopt(3)): trim above 128 KiB, up to 65536 mmap'ed blocks
_DEFAULT_TRIM_THRESHOLD = 128 * 1024
_DEFAULT_MMAP_THRESHOLD = 128 * 1024
_DEFAULT_MMAP_MAX = 65536
_KEEP_TRIM_THRESHOLD = 2**31 - 1  # the largest value mallopt's int takes: 2 GiB of free heap top

_lock = threading.Lock()
_state = {"keeping": False}


def _glibc() -> Optional[ctypes.CDLL]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)  # the C library this process already runs on
    except OSError:
        return None
    # gnu_get_libc_version exists only in glibc (musl also has mallopt, as a no-op)
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (see the module docstring). Idempotent.

    Returns True when the setting is in effect (Linux with glibc), False elsewhere.
    """
    with _lock:
        if _state["keeping"]:
            return True
        libc = _glibc()
        if libc is None:
            return False
        ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, _KEEP_TRIM_THRESHOLD) == 1
        _state["keeping"] = ok
        return ok


def restore_default() -> bool:
    """Put glibc's initial values back: blocks of 128 KiB and more are mmap'ed again and a free
    heap top above 128 KiB is returned (the threshold stays fixed: glibc's dynamic adjustment of
    it is off once it has been set). Returns False where ``keep_freed_memory`` is a no-op."""
    with _lock:
        libc = _glibc()
        if libc is None:
            return False
        ok = (
            libc.mallopt(M_MMAP_MAX, _DEFAULT_MMAP_MAX) == 1
            and libc.mallopt(M_MMAP_THRESHOLD, _DEFAULT_MMAP_THRESHOLD) == 1
            and libc.mallopt(M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD) == 1
        )
        _state["keeping"] = False
        return ok


def is_keeping_freed_memory() -> bool:
    """Whether ``keep_freed_memory()`` is in effect in this process."""
    return _state["keeping"]
