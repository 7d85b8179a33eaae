"""Device and dtype selection: the only place that knows which accelerators exist."""

from __future__ import annotations

import torch

from .errors import ConfigError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """None/"auto" picks cuda, then xpu, then mps, then cpu."""
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


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, checkpoint_dtype: str | None = None
                  ) -> torch.dtype:
    """"auto" takes the checkpoint's dtype. float16 is refused on CPU: it runs ~1000x slower there than bf16."""
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif dtype in (None, "auto"):
        resolved = DTYPES.get(str(checkpoint_dtype or "float32").removeprefix("torch."), torch.float32)
        if resolved == torch.float16 and device.type == "cpu":
            resolved = torch.bfloat16
    else:
        if dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {dtype!r}: use float32, bfloat16, float16 or auto")
        resolved = DTYPES[dtype]
    if resolved == torch.float16 and device.type == "cpu":
        raise ConfigError("float16 on CPU is about 1000x slower than bfloat16: use --dtype bfloat16")
    return resolved
