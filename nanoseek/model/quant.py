"""Weight-only quantization: int8 per output channel, int4 in groups of 32 or 128 inputs (symmetric, like
llama.cpp's q8_0/q4_0 blocks: w = q * scale, q in [-127, 127] or [-8, 7]).

Which weights: every linear product of the decoder -- attention projections (MLA's absorbed ones are derived
from kv_b_proj), dense MLPs, shared and routed experts, MTP's projection and the LM head. Embeddings, norms and
the MoE router (its float32 scores choose the experts) stay as they are.

A quantized model keeps, per weight, its integers and scales (`module.quantized[name]`, what `nanoseek quantize`
writes and loads back as is) and, in the parameter itself, their dequantized values in the model's dtype: any
path without a quantized kernel (prefill through oneDNN, the eager fallback, GPUs) computes the same model, and
the decode kernel (model/kernels/csrc/decode.cpp) streams the integers. int8 multiplies them with the float
activations (the dequantized product, up to summation order); int4 quantizes the activations to int8 per group
of inputs and multiplies in integers, as llama.cpp's q4_0 does (within ~1% of the dequantized product): widening
nibbles to float costs more than streaming them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError

SCHEMES = ("int8", "int4", "int4-g128")


@dataclass(frozen=True)
class Scheme:
    """bits 8 (one scale per output channel) or 4 (one scale per `group` inputs)."""

    bits: int
    group: int | None

    @property
    def name(self) -> str:
        if self.bits == 8:
            return "int8"
        return "int4" if self.group == 32 else f"int4-g{self.group}"

    def group_for(self, in_features: int) -> int | None:
        """The group size a weight with this many inputs gets, or None where it cannot be quantized (the kernel
        reads inputs in pairs; int4 groups must divide the width: 128 falls back to 32 where it does not)."""
        if in_features % 2:
            return None
        if self.bits == 8:
            return in_features
        for group in (self.group, 32):
            if in_features % group == 0:
                return group
        return None

    def config(self) -> dict:
        """The checkpoint's `quantization_config`."""
        return {"quant_method": "nanoseek", "bits": self.bits, "group_size": self.group or -1}


def scheme(name: str | Scheme | None) -> Scheme | None:
    """"int8", "int4" (groups of 32), "int4-g128" or "int4-g32" -> Scheme; None/"none" -> None."""
    if name is None or isinstance(name, Scheme):
        return name
    text = str(name).lower()
    if text in ("none", "", "float"):
        return None
    if text == "int8":
        return Scheme(8, None)
    match = re.fullmatch(r"int4(?:-g(32|128))?", text)
    if match is None:
        raise ConfigError(f"unknown quantization {name!r}: use one of {', '.join(SCHEMES)}")
    return Scheme(4, int(match.group(1) or 32))


def scheme_from_config(config: dict | None) -> Scheme | None:
    """The Scheme of a checkpoint's `quantization_config` written by nanoseek, else None."""
    if not config or config.get("quant_method") != "nanoseek":
        return None
    bits, group = int(config["bits"]), int(config.get("group_size", -1))
    if bits not in (4, 8) or (bits == 4 and group not in (32, 128)):
        raise ConfigError(f"unsupported nanoseek quantization_config {config}: bits 8, or bits 4 with "
                          "group_size 32 or 128")
    return Scheme(bits, None if bits == 8 else group)


@dataclass
class QuantizedWeight:
    """A weight [..., N, K] as integers q (int8 tensor of the same shape, int4 values in [-8, 7]) and float32
    scales [..., N, K / group]."""

    q: torch.Tensor
    scales: torch.Tensor
    bits: int
    version: int | None = None  # the parameter's _version when its values were set from these integers

    def attached_to(self, param: torch.Tensor) -> "QuantizedWeight":
        self.version = param._version
        return self

    def current(self, param: torch.Tensor) -> bool:
        """Whether the parameter still holds these integers' values (no in-place update since)."""
        return self.version == param._version

    @property
    def group(self) -> int:
        return self.q.shape[-1] // self.scales.shape[-1]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        groups = self.q.float().unflatten(-1, (self.scales.shape[-1], self.group))
        return (groups * self.scales.unsqueeze(-1)).flatten(-2).to(dtype)

    # Storage: int4 values two to a byte along K (low nibble first), as `nanoseek quantize` writes them.
    def stored(self) -> torch.Tensor:
        if self.bits == 8:
            return self.q
        u = (self.q + 8).to(torch.uint8).unflatten(-1, (-1, 2))
        return u[..., 0] | (u[..., 1] << 4)

    @classmethod
    def from_stored(cls, stored: torch.Tensor, scales: torch.Tensor, bits: int) -> "QuantizedWeight":
        if bits == 8:
            return cls(stored.to(torch.int8), scales.float(), 8)
        u = stored.to(torch.uint8)
        q = torch.stack(((u & 15).to(torch.int8) - 8, (u >> 4).to(torch.int8) - 8), dim=-1).flatten(-2)
        return cls(q, scales.float(), 4)


def quantize(weight: torch.Tensor, bits: int, group: int) -> QuantizedWeight:
    """Round-to-nearest symmetric quantization of weight [..., N, K] in groups of `group` inputs. int4 takes
    the scale from the group's largest-magnitude value mapped to -8 (q4_0's choice: one more level than a
    +-7 range)."""
    w = weight.detach().float().unflatten(-1, (weight.shape[-1] // group, group))
    if bits == 8:
        scales = w.abs().amax(-1) / 127.0
        qmin, qmax = -127, 127
    else:
        index = w.abs().argmax(-1, keepdim=True)
        scales = w.gather(-1, index).squeeze(-1) / -8.0
        qmin, qmax = -8, 7
    safe = torch.where(scales == 0, torch.ones_like(scales), scales)
    q = (w / safe.unsqueeze(-1)).round().clamp(qmin, qmax).to(torch.int8).flatten(-2)
    return QuantizedWeight(q, scales.abs() if bits == 8 else scales, bits)


def quantizable(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, parameter name) of every weight quantization covers, in module order; a weight shared with
    the embedding is left out (quantize_model unties the LM head first)."""
    from .layers import Linear
    from .moe import Experts

    embedding = model.model.embed_tokens.weight
    found = []
    for module in model.modules():
        if isinstance(module, Linear) and module.weight is not embedding:
            found.append((module, "weight"))
        elif isinstance(module, Experts):
            found += [(module, "gate_up_proj"), (module, "down_proj")]
    return found


@torch.no_grad()
def quantize_model(model: nn.Module, chosen: Scheme | str) -> nn.Module:
    """Quantizes every weight `quantizable` lists in place: integers and scales kept in `module.quantized`,
    the parameter overwritten with their dequantized values. A weight whose width does not fit the scheme
    stays in float (reported by `quantization_summary`)."""
    chosen = scheme(chosen)
    if model.lm_head.weight is model.model.embed_tokens.weight:
        # A tied head is the largest matrix a small model streams per token: it gets its own quantized copy
        # and the embedding stays as it is (the checkpoint then stores both, untied).
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone(), requires_grad=False)
        model.config = model.config.replace(tie_word_embeddings=False)
    for module, name in quantizable(model):
        param = getattr(module, name)
        group = chosen.group_for(param.shape[-1])
        if group is None:
            continue
        qw = quantize(param, chosen.bits, group)
        set_quantized(module, name, qw)
    model.quantization = chosen
    return model


def set_quantized(module: nn.Module, name: str, qw: QuantizedWeight) -> None:
    """Attaches qw to module's parameter `name` and overwrites the parameter with its dequantized values."""
    param = getattr(module, name)
    if tuple(qw.q.shape) != tuple(param.shape):
        raise ConfigError(f"quantized weight {tuple(qw.q.shape)} does not fit {name} {tuple(param.shape)}")
    if not hasattr(module, "quantized") or module.quantized is None:
        module.quantized = {}
    param.data.copy_(qw.dequantize(torch.float32).to(param.device, param.dtype))
    module.quantized[name] = qw.attached_to(param)


def quantized_of(module: nn.Module, name: str = "weight") -> QuantizedWeight | None:
    """The integers behind module's parameter `name`, if it still holds their values."""
    qw = (getattr(module, "quantized", None) or {}).get(name)
    return qw if qw is not None and qw.current(getattr(module, name)) else None


def quantization_summary(model: nn.Module) -> dict:
    """Counts of quantized and float parameters among the quantizable weights, and their bytes."""
    done = left = qbytes = 0
    for module, name in quantizable(model):
        param = getattr(module, name)
        qw = quantized_of(module, name)
        if qw is None:
            left += param.numel()
        else:
            done += param.numel()
            qbytes += qw.q.numel() * qw.bits // 8 + qw.scales.numel() * 4
    return {"quantized_params": done, "float_params": left, "quantized_bytes": qbytes}
