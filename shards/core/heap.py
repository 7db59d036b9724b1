"""Giving the memory a worker has freed back to the operating system between batches.

glibc's ``malloc`` raises its mmap threshold each time a large block is freed (up to
32 MiB), so the batch-sized arrays that follow (decoded audio, features) come from the heap;
freed, they leave holes that the process keeps as resident memory. Over a shard of
thousands of batches a label worker's peak grew about 20% for a 4x larger shard that way.
Fixing the threshold low instead sends every such array through ``mmap`` and cost 16-25% of
the worker's time.

``malloc_trim`` keeps the peak flat, but each trim hands back pages that the next batch
faults in again: trimmed after every batch, a label worker took 1.45x as long per shard as
untrimmed (in process, 4 shards of 0.5 audio hours), while a trim freed only about 25 MB of
its 550. So a process trims only once it is :data:`TRIM_SLACK_BYTES` above its size at the
first call (which holds one batch's working set): memory stays within that bound whatever the
shard's size, and the batches in between reuse the pages the last one faulted in. A process
whose size grows for good (a stage that loads a model) trims once and takes its new size as
the bound.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

#: Resident memory a process may gain over its bound before it trims: about 10% of a label
#: worker's (some 550 MB, README "Sizing"), twice what a batch leaves free.
TRIM_SLACK_BYTES = 48 << 20

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_limit = [0]  # Resident bytes above which the next call trims (0: not set yet).


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def resident_bytes() -> int:
    """This process's resident memory (``/proc/self/statm``), or 0 where there is none."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def release_free_memory(force: bool = False) -> None:
    """Returns the free pages of every malloc arena to the OS (glibc; a no-op elsewhere) when
    the process has grown past its bound (see the module's docstring), or ``force``."""
    trim = _malloc_trim()
    if trim is None:
        return
    if not force:
        size = resident_bytes()
        if not _limit[0]:
            _limit[0] = size + TRIM_SLACK_BYTES
        if size <= _limit[0]:
            return
    trim(0)
    _limit[0] = max(_limit[0], resident_bytes() + TRIM_SLACK_BYTES)
