"""nanoseek's compiled CPU kernels (model/csrc/*.cpp), each built on first use by torch.utils.cpp_extension into
torch's per-machine extension cache (~25 s once on 2 cores), and loaded at most once per process.

A kernel that cannot be built (no C++ compiler, no ninja, an unsupported CPU) or that is switched off with
NANOSEEK_CPU_KERNELS=0 is simply absent: every caller keeps an eager PyTorch path for that case.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

# -fopenmp: at::parallel_for is a header template that runs serially unless compiled with OpenMP; the symbols
# then resolve to the libgomp torch has already loaded (one thread pool).
OPENMP = ["-O3", "-fopenmp"]


class CompiledKernels:
    """One extension module built from `csrc/<source>`; `get()` returns it, or None where it is unavailable."""

    def __init__(self, name: str, source: str, cflags: list[str], supported: Callable[[], bool] = lambda: True):
        self.name, self.source, self.cflags, self.supported = name, source, cflags, supported
        self._module = None
        self._tried = False
        self._lock = threading.Lock()  # the engine may pack from its own thread while another builds

    def get(self):
        with self._lock:
            if not self._tried:
                self._tried = True
                if os.environ.get("NANOSEEK_CPU_KERNELS", "1") != "0" and self.supported():
                    self._module = self._build()
            return self._module

    def reset(self) -> None:
        """Forget the outcome of the last `get()` (tests switch the kernels off and on)."""
        with self._lock:
            self._module, self._tried = None, False

    def _build(self):
        try:
            from torch.utils.cpp_extension import load

            source = Path(__file__).parent / "csrc" / self.source
            return load(name=self.name, sources=[str(source)], verbose=False, extra_cflags=self.cflags,
                        extra_ldflags=["-fopenmp"])
        except Exception as exc:  # no compiler, no ninja, ...: eager PyTorch still runs everything
            log.warning("nanoseek: CPU kernels %s unavailable (%s); using eager PyTorch", self.name,
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            return None


def cpu_flag(flag: str) -> bool:
    try:
        return flag in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
