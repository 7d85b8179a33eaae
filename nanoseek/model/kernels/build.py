"""Building nanoseek's compiled CPU kernels (csrc/*.cpp) for the CPU at hand.

Each kernel set is built on first use by torch.utils.cpp_extension into torch's extension cache (~25-40 s once
per machine on 2 cores) and loaded at most once per process. The compiler targets the ISA level runtime.cpu()
reports (the native one, or the NANOSEEK_ISA ceiling) with explicit flags -- never -march=native -- and the
extension's name carries that level and a hash of the sources, so a cache shared between machines (an NFS home,
a container image) can never hand an AVX-512 build to an AVX2 CPU, nor a stale build to new sources.

A kernel set that cannot be built (no C++ compiler, no ninja, an ISA it does not support) or that is switched
off with NANOSEEK_CPU_KERNELS=0 is simply absent: every caller keeps an eager PyTorch path for that case.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

from ...runtime import cpu

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
# -fopenmp: at::parallel_for is a header template that runs serially unless compiled with OpenMP; the symbols
# then resolve to the libgomp torch has already loaded (one thread pool).
COMMON_FLAGS = ["-O3", "-fopenmp"]
# Exactly the instructions each level may use (runtime.py's _FLAGS say which CPU flags imply them).
ISA_FLAGS = {
    "scalar": [],
    "neon": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"],
    "avx512_bf16": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
                    "-mavx512bf16", "-mavx512vnni"],
}
ISA_FLAGS["amx"] = ISA_FLAGS["avx512_bf16"]  # AMX tiles are oneDNN's business; the kernels use AVX512-BF16


@contextmanager
def build_lock(build_dir: Path):
    """Holds an OS lock on one extension's build directory, which the kernel releases when its holder dies.

    torch serialises builds with a plain `lock` file: a build killed midway (Ctrl-C during the first, silent
    half-minute; a timeout) leaves it behind, and every later load of that extension -- a built one too -- then
    waits for it forever. Every nanoseek process builds and loads under this lock, so a `lock` file found while
    holding it belongs to no live build and is removed."""
    try:
        import fcntl
    except ImportError:  # Windows: torch's lock file alone
        yield
        return
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / "nanoseek.lock", "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            stale = build_dir / "lock"
            if stale.exists():
                log.warning("nanoseek: removing %s, left by a kernel build that was killed", stale)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def kernels_enabled() -> bool:
    return os.environ.get("NANOSEEK_CPU_KERNELS", "1") != "0"


class CompiledKernels:
    """One extension module built from `csrc/<source>` for the CPU's ISA level; `get()` returns it, or None
    where it is unavailable. `isas` lists the levels the source supports."""

    def __init__(self, name: str, source: str, isas: tuple[str, ...]):
        self.name, self.source, self.isas = name, source, isas
        self._module = None
        self._tried = False
        self._lock = threading.Lock()  # the engine may pack from its own thread while another builds

    @property
    def isa(self) -> str | None:
        """The level this set builds for here, or None where it does not apply."""
        level = cpu().isa
        return level if level in self.isas else None

    def get(self):
        with self._lock:
            if not self._tried:
                self._tried = True
                if kernels_enabled() and self.isa is not None:
                    self._module = self._build(self.isa)
            return self._module

    def reset(self) -> None:
        """Forget the outcome of the last `get()` (tests switch the kernels off and on)."""
        with self._lock:
            self._module, self._tried = None, False

    def status(self) -> str:
        if not kernels_enabled():
            return "off (NANOSEEK_CPU_KERNELS=0)"
        if self.isa is None:
            return f"not for this CPU ({cpu().isa})"
        if not self._tried:
            return f"{self.isa} (built on first use)"
        return self.isa if self._module is not None else f"{self.isa}: build failed (eager PyTorch runs)"

    def extension_name(self, isa: str) -> str:
        digest = hashlib.sha256()
        for path in sorted(CSRC.iterdir()):
            if path.suffix in (".cpp", ".h"):
                digest.update(path.name.encode() + path.read_bytes())
        return f"{self.name}_{isa}_{digest.hexdigest()[:10]}"

    def _build(self, isa: str):
        try:
            from torch.utils.cpp_extension import _get_build_directory, load

            name = self.extension_name(isa)
            build_dir = Path(_get_build_directory(name, verbose=False))  # torch's own choice (python, torch, name)
            with build_lock(build_dir):
                if not any(build_dir.glob(f"{name}*.so")):  # the first use on this machine: say why it pauses
                    print(f"nanoseek: building the {self.name} CPU kernels for {isa}, once on this machine "
                          "(under a minute)", file=sys.stderr, flush=True)
                return load(name=name, sources=[str(CSRC / self.source)], verbose=False,
                            extra_cflags=[*COMMON_FLAGS, *ISA_FLAGS[isa]], extra_include_paths=[str(CSRC)],
                            extra_ldflags=["-fopenmp"])
        except Exception as exc:  # no compiler, no ninja, ...: eager PyTorch still runs everything
            log.warning("nanoseek: CPU kernels %s unavailable (%s); using eager PyTorch", self.name,
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            return None
