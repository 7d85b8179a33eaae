"""Process-wide CPU runtime settings, applied when nanoseek is imported (before any tensor exists).

Host memory: keep CPU training and inference off the kernel's page-fault path.

Measured on this 2-core VM (docs/LOG.md): every training step allocates and frees hundreds of MB of activations;
glibc hands large freed blocks back to the OS and torch's allocator touches fresh 4 KiB pages again on the next
step, ~20,000 minor faults and a quarter of the CPU time per step of the 20M-parameter benchmark model. Two
settings remove them:
  * THP_MEM_ALLOC_ENABLE=1: torch aligns allocations of 2 MiB and more to huge pages and asks for them
    (read by torch on its first allocation, so it is set before any tensor exists);
  * glibc's mallopt: large blocks come from the heap (mmap threshold at its 32 MiB maximum) and the heap is
    never trimmed, so freed activations are reused by the next step instead of faulted in again.
The cost: the process keeps its peak heap.

oneDNN's primitive cache: oneDNN JIT-compiles a kernel for every new GEMM shape (~0.1-0.4 ms each) and keeps
1,024 of them by default. A GRPO step (rollout prefills of many prompt lengths, updates over several sequence
widths) uses more than that, so the default cache thrashes and recompiles every step (2.35 -> 2.06 s per step of
bench/grpo.py with 16,384); each entry is a few KB. ONEDNN_PRIMITIVE_CACHE_CAPACITY set by the user wins.

NANOSEEK_CPU_RUNTIME=0 leaves all of this alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_applied: bool | None = None


def configure() -> bool:
    """Applies the settings once per process; returns whether glibc accepted them."""
    global _applied
    if _applied is None:
        _applied = os.environ.get("NANOSEEK_CPU_RUNTIME", "1") != "0" and _apply()
    return _applied


def _apply() -> bool:
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16384")
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20) and mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1)
                and mallopt(_M_TOP_PAD, 64 << 20))
