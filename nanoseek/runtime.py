"""The one place that knows the machine: its CPU class, its devices, the dtype policy they imply, and the
process settings applied on `import nanoseek`. Nobody else reads /proc/cpuinfo, picks CUDA or decides bf16.

CPU classes (docs/LOG.md and ../REFERENCE figures, 2-core VMs):
  * avx2 (most laptops, AMD Zen 2 servers): bf16 arithmetic is emulated, ~45x slower than float32 in a GEMM,
    and oneDNN refuses to pack bf16 weights. Compute in float32; bf16 checkpoints keep their bf16 weights,
    which nanoseek's kernels widen to float32 in registers (half the bytes streamed per decoded token).
  * avx512 (no bf16 instructions): oneDNN runs bf16 GEMMs, but emulated: measured 34 vs 91 GFLOP/s in float32
    (an AVX512-BF16 host capped with NANOSEEK_ISA=avx512). Compute in float32, as on AVX2.
  * avx512_bf16 / amx: bf16 is native (~6x float32's GEMM rate): compute in bf16.
  * neon (arm64) and scalar (anything else): float32, eager PyTorch; kernels that need x86 are simply absent.

The ISA ceiling NANOSEEK_ISA=avx2|avx512|avx512_bf16|amx|scalar makes an AVX-512 host behave like a smaller
CPU: nanoseek's own kernels and dtype choices follow it, and it is passed on to torch (ATEN_CPU_CAPABILITY),
oneDNN (ONEDNN_MAX_CPU_ISA) and MKL (MKL_ENABLE_INSTRUCTIONS), which read those once, at their first use.
Correctness and crashes are reproduced that way; speed only approximately (the host's clock and bandwidth stay).

Process settings (NANOSEEK_CPU_RUNTIME=0 leaves them alone), measured on a 2-core VM (docs/LOG.md):
  * THP_MEM_ALLOC_ENABLE=1 and glibc's mallopt (mmap threshold at its 32 MiB maximum, heap never trimmed):
    a training step allocates and frees hundreds of MB; glibc handed large blocks back to the OS and the next
    step faulted them in again, ~20,000 minor faults and a quarter of the CPU time per step. The cost: the
    process keeps its peak heap.
  * ONEDNN_PRIMITIVE_CACHE_CAPACITY=16384: oneDNN JIT-compiles a kernel per GEMM shape and keeps 1,024 by
    default; a GRPO step uses more, so the default cache thrashed (2.35 -> 2.06 s per GRPO step).
A value the user set in the environment always wins.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    import torch

# x86 levels in order: each implies the ones before it.
X86_LEVELS = ("avx2", "avx512", "avx512_bf16", "amx")
ISAS = ("scalar", "neon", *X86_LEVELS)
_FLAGS = {"avx2": ("avx2", "fma", "f16c"), "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq"),
          "avx512_bf16": ("avx512_bf16", "avx512_vnni"), "amx": ("amx_tile", "amx_bf16")}
# What a ceiling tells torch's own kernels and oneDNN.
_ATEN_CAPABILITY = {"scalar": "default", "avx2": "avx2", "avx512": "avx512", "avx512_bf16": "avx512"}
_ONEDNN_ISA = {"scalar": "SSE41", "avx2": "AVX2", "avx512": "AVX512_CORE", "avx512_bf16": "AVX512_CORE_BF16"}
# ...and MKL, which runs torch's float32 GEMMs: without the cap it kept AVX-512 under NANOSEEK_ISA=avx2 (a 2048^3
# float32 product at 397 GFLOP/s on an AMX host, 212 capped), so the "AVX2" figures of training and of
# transformers' float32 side were an AVX-512 machine's.
_MKL_ISA = {"scalar": "SSE4_2", "avx2": "AVX2", "avx512": "AVX512", "avx512_bf16": "AVX512"}


@dataclass(frozen=True)
class CPUInfo:
    """arch: the machine (x86_64, arm64, ...); native_isa: what the CPU has; isa: what runs (native_isa under
    the NANOSEEK_ISA ceiling); cores: the CPUs this process may use."""

    arch: str
    model: str
    native_isa: str
    isa: str
    ceiling: str | None
    cores: int

    @property
    def bf16_native(self) -> bool:
        """bf16 arithmetic in hardware (AVX512-BF16 or AMX): the only CPUs where bf16 is the fast dtype."""
        return self.isa in ("avx512_bf16", "amx")

    @property
    def x86(self) -> bool:
        return self.isa in X86_LEVELS


def _cpuinfo() -> tuple[set[str], str]:
    """(feature flags, model name) from /proc/cpuinfo; empty where there is none (macOS, Windows)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set(), platform.processor()
    flags, model = set(), platform.processor()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("flags", "Features") and not flags:
            flags = set(value.split())
        elif key in ("model name", "Model") and value.strip():
            model = value.strip()
    return flags, model


def _arch() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "aarch64": "arm64"}.get(machine, machine)


def _native_isa(arch: str, flags: set[str]) -> str:
    if arch == "arm64":
        return "neon"  # Advanced SIMD is part of every arm64 CPU
    if arch != "x86_64":
        return "scalar"
    level = "scalar"
    for name in X86_LEVELS:
        if not all(f in flags for f in _FLAGS[name]):
            break
        level = name
    return level


def _ceiling() -> str | None:
    value = os.environ.get("NANOSEEK_ISA", "").strip().lower()
    if not value:
        return None
    if value not in ISAS:
        raise ConfigError(f"NANOSEEK_ISA={value!r} is not an ISA level: use one of {', '.join(ISAS)} (or unset it)")
    return value


def _capped(native: str, ceiling: str | None) -> str:
    if ceiling is None or ceiling == native:
        return native
    if ceiling == "scalar":
        return "scalar"
    if native in X86_LEVELS and ceiling in X86_LEVELS:
        return X86_LEVELS[min(X86_LEVELS.index(native), X86_LEVELS.index(ceiling))]
    return native  # a ceiling of another architecture (neon on x86, avx2 on arm64) does not apply


@functools.lru_cache(maxsize=1)
def cpu() -> CPUInfo:
    """This machine's CPU class (raises ConfigError for a malformed NANOSEEK_ISA)."""
    flags, model = _cpuinfo()
    arch = _arch()
    native = _native_isa(arch, flags)
    ceiling = _ceiling()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return CPUInfo(arch, model, native, _capped(native, ceiling), ceiling, cores)


# ---- process settings ----

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_applied: bool | None = None


def configure() -> bool:
    """Applies the ISA ceiling and the process settings once per process (before torch's first operation);
    returns whether glibc accepted the heap settings."""
    global _applied
    if _applied is None:
        _apply_ceiling()
        _applied = os.environ.get("NANOSEEK_CPU_RUNTIME", "1") != "0" and _apply_settings()
    return _applied


def _apply_ceiling() -> None:
    try:
        info = cpu()
    except ConfigError:
        return  # reported where the CPU is first asked about (the CLI turns it into one line, exit code 2)
    if info.ceiling is None or info.isa == info.native_isa or info.isa not in _ATEN_CAPABILITY:
        return
    os.environ.setdefault("ATEN_CPU_CAPABILITY", _ATEN_CAPABILITY[info.isa])
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", _ONEDNN_ISA[info.isa])
    os.environ.setdefault("MKL_ENABLE_INSTRUCTIONS", _MKL_ISA[info.isa])


def _apply_settings() -> bool:
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


# ---- devices ----

def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """None/"auto" picks cuda, then xpu, then mps, then cpu."""
    import torch

    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if hasattr(torch, "xpu") and torch.xpu.is_available():
            return torch.device("xpu")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}: use cpu, cuda, cuda:N, xpu, mps or auto") from None


def bf16_native(device: torch.device) -> bool:
    """Whether bf16 is the fast dtype on `device`."""
    import torch

    if device.type == "cpu":
        return cpu().bf16_native
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return True


# ---- the dtype policy ----

DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")
_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}


def dtype_from_name(name) -> torch.dtype | None:
    """A dtype name (or torch.dtype) -> torch.dtype; "auto"/None -> None. Unknown names are a ConfigError."""
    import torch

    if name is None or isinstance(name, torch.dtype):
        return name
    key = _ALIASES.get(str(name).removeprefix("torch."), str(name).removeprefix("torch."))
    if key == "auto":
        return None
    if key not in DTYPE_NAMES:
        raise ConfigError(f"unknown dtype {name!r}: use {', '.join(DTYPE_NAMES)}")
    return getattr(torch, key)


@dataclass(frozen=True)
class Precision:
    """How a model runs: `weights` is what its parameters are stored in, `compute` what its activations and
    arithmetic use; `note` is the one line to show when a request was adapted to the hardware."""

    compute: torch.dtype
    weights: torch.dtype
    note: str | None = None

    def describe(self) -> str:
        c, w = (str(d).removeprefix("torch.") for d in (self.compute, self.weights))
        return c if c == w else f"{w} weights, {c} compute"


def inference_precision(requested, device: torch.device, checkpoint_dtype: str | None = None) -> Precision:
    """The precision a model is loaded and run in for inference.

    "auto" keeps the checkpoint's dtype where the hardware computes in it natively; on a CPU without native
    bf16, a bf16 (or float16) checkpoint keeps bf16 weights and computes in float32 -- the same answer as a
    float32 copy, half its memory and bandwidth. An explicit bfloat16 there does the same and says so.
    float16 on a CPU is refused (it is slower than emulated bf16)."""
    import torch

    wanted = dtype_from_name(requested)
    explicit = wanted is not None
    if wanted is None:
        wanted = dtype_from_name(str(checkpoint_dtype or "float32")) if _known(checkpoint_dtype) else torch.float32
        if wanted == torch.float16 and device.type == "cpu":
            wanted = torch.bfloat16
    if wanted == torch.float16 and device.type == "cpu":
        raise ConfigError("float16 on a CPU is slower than emulated bf16 by orders of magnitude: use --dtype "
                          "bfloat16 or float32")
    if wanted == torch.bfloat16 and not bf16_native(device):
        note = None
        if explicit:
            note = (f"--dtype bfloat16 on this {device.type.upper()} ({cpu().isa if device.type == 'cpu' else device}, "
                    "no native bf16): weights stay bf16 (half the memory), arithmetic runs in float32 (emulated "
                    "bf16 GEMMs are several times slower, ~45x on AVX2); prefill widens each weight per call")
        return Precision(torch.float32, torch.bfloat16, note)
    return Precision(wanted, wanted)


def _known(name) -> bool:
    try:
        return dtype_from_name(name) is not None
    except ConfigError:
        return False


def fast_precision(requested, device: torch.device) -> Precision:
    """Precision of the engines nanoseek runs inside training (GRPO rollouts, the evaluator, distillation
    teachers) over float32 master weights: "auto" is bf16 where bf16 is native, and elsewhere bf16 weights
    computed in float32 -- the decode kernels stream half the bytes, and the trainer's importance-sampling
    correction absorbs the rounding, as it does bf16's on native CPUs. A dtype given explicitly is taken as
    inference_precision takes it."""
    import torch

    wanted = dtype_from_name(requested)
    if wanted is None:
        native = bf16_native(device)
        return Precision(torch.bfloat16 if native else torch.float32, torch.bfloat16)
    return inference_precision(wanted, device)


def training_autocast(requested, device: torch.device) -> tuple[torch.dtype | None, str | None]:
    """(autocast dtype or None for plain float32, the one line to show) for a training dtype setting:
    "auto" is bf16 autocast where bf16 is native, float32 elsewhere. An explicit bfloat16 is honoured
    everywhere, with its cost named where it is emulated."""
    import torch

    wanted = dtype_from_name(requested)
    if wanted is None:
        return (torch.bfloat16 if bf16_native(device) else None), None
    if wanted == torch.float32:
        return None, None
    if wanted == torch.float16 and device.type == "cpu":
        raise ConfigError("train.dtype=float16 on a CPU is emulated and very slow: use auto, float32 or bfloat16")
    note = None
    if not bf16_native(device):
        note = (f"train.dtype={str(wanted).removeprefix('torch.')} on this {device.type.upper()} "
                f"({cpu().isa if device.type == 'cpu' else device}, no native bf16): its GEMMs are emulated, several "
                "times slower than float32 (~45x on AVX2); train.dtype=auto picks float32 here")
    return wanted, note


_NOTIFIED: set[str] = set()


def autocast(dtype: torch.dtype | None, device: torch.device):
    """The context a training forward runs in: autocast to `dtype` (training_autocast's choice), or none."""
    import torch

    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def notify(note: str) -> None:
    """Prints a one-line note about a hardware-driven choice to stderr, once per process."""
    if note not in _NOTIFIED:
        _NOTIFIED.add(note)
        print(f"nanoseek: {note}", file=sys.stderr, flush=True)


def dtype_name(dtype: torch.dtype | None) -> str:
    return "float32" if dtype is None else str(dtype).removeprefix("torch.")


# ---- measured peaks ----

_PEAK_CACHE: dict[str, float] = {}


def peak_flops(dtype: torch.dtype, device: torch.device, seconds: float = 0.3) -> float:
    """Matmul FLOP/s this machine reaches in `dtype` (best of a few square products), the MFU denominator.

    Bounded in time whatever the dtype costs here: a 512-wide product first (0.2 s even at the ~1.3 GFLOP/s of
    emulated bf16), larger ones only while the budget allows and the rate is high enough to need them."""
    import torch

    key = f"{device}/{dtype}"
    if key in _PEAK_CACHE:
        return _PEAK_CACHE[key]
    best_rate, n, start = 0.0, 512, time.perf_counter()
    while True:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        a @ b  # first call: kernel selection and JIT
        for _ in range(3):
            t = time.perf_counter()
            a @ b
            if device.type == "cuda":
                torch.cuda.synchronize()
            best_rate = max(best_rate, 2 * n ** 3 / max(time.perf_counter() - t, 1e-9))
        elapsed = time.perf_counter() - start
        # A product this small finishes in under a millisecond on a fast device: too short to measure well.
        next_cost = 4 * 2 * (2 * n) ** 3 / best_rate
        if n >= 4096 or elapsed + next_cost > seconds:
            break
        n *= 2
    _PEAK_CACHE[key] = best_rate
    return best_rate


def read_bandwidth(nbytes: int = 1 << 30) -> float:
    """Bytes per second of a float32 sum over `nbytes` (1 GiB: beyond any L3), best of 3."""
    import torch

    x = torch.ones(nbytes // 4)
    x.sum()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return nbytes / best


# ---- the report `nanoseek env` prints ----

def report(measure: bool = False) -> dict:
    """What this machine is and the choices nanoseek makes on it."""
    import torch

    from .model import kernels

    info = cpu()
    dev = resolve_device("auto")
    bf16 = inference_precision("bfloat16", torch.device("cpu"))
    auto_train, _ = training_autocast("auto", torch.device("cpu"))
    out = {
        "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
        "cpu": {"arch": info.arch, "model": info.model, "cores": info.cores, "native_isa": info.native_isa,
                "ceiling": info.ceiling, "isa": info.isa, "bf16_native": info.bf16_native,
                "torch_capability": torch.backends.cpu.get_cpu_capability(),
                "onednn_bf16": bool(torch.backends.mkldnn.is_available()
                                    and torch.ops.mkldnn._is_mkldnn_bf16_supported())},
        "accelerator": None if dev.type == "cpu" else str(dev),
        "cpu_policy": {"inference_bf16_checkpoint": bf16.describe(), "inference_float32_checkpoint": "float32",
                       "training": dtype_name(auto_train) if auto_train is None else
                       f"{dtype_name(auto_train)} autocast over float32 weights"},
        "kernels": kernels.status(),
        "process_settings": configure(),
    }
    if measure:
        cpu_dev = torch.device("cpu")
        out["measured"] = {"float32_gflops": round(peak_flops(torch.float32, cpu_dev) / 1e9, 1),
                           "bfloat16_gflops": round(peak_flops(torch.bfloat16, cpu_dev) / 1e9, 1),
                           "sum_read_gb_s": round(read_bandwidth() / 1e9, 1)}
    return out
