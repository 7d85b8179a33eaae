"""Rotary position embeddings: default, linear, Llama-3 and YaRN frequencies; interleaved and half-split layouts.

DeepSeek checkpoints rotate interleaved pairs (x[2i], x[2i+1]); Llama/Qwen2 rotate (x[i], x[i + d/2]).
YaRN follows the DeepSeek reference (and transformers): frequencies blended between interpolation and
extrapolation over a linear ramp, cos/sin scaled by mscale(factor, mscale) / mscale(factor, mscale_all_dim);
the softmax-scale part of YaRN lives in `ModelConfig.softmax_scale`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ModelConfig


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_frequencies(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] and the cos/sin amplitude for the config's rope type."""
    dim, base = config.rope_dim, config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rs = config.rope_scaling or {}
    kind = config.rope_type
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / rs["factor"], 1.0
    if kind == "llama3":
        factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old_len = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled), 1.0
    # yarn
    original = rs.get("original_max_position_embeddings") or config.max_position_embeddings
    factor = rs.get("factor") or config.max_position_embeddings / original
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp  # 1 keeps the original frequency (high-frequency dims)
    inv_freq = inv_freq / factor * (1 - extrapolation) + inv_freq * extrapolation
    amplitude = rs.get("attention_factor")
    if amplitude is None:
        mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            amplitude = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            amplitude = _yarn_mscale(factor)
    return inv_freq, float(amplitude)


class Rope:
    """cos/sin of one batch of positions, applied to any number of heads in the config's layout."""

    def __init__(self, freqs: torch.Tensor, amplitude: float, interleaved: bool):
        self.cos, self.sin = freqs.cos() * amplitude, freqs.sin() * amplitude  # [..., T, dim/2] float32
        self.interleaved = interleaved
        self._cis = None

    def __getitem__(self, index) -> "Rope":
        """The table for a subset of positions (leading dims)."""
        sub = Rope.__new__(Rope)
        sub.cos, sub.sin, sub.interleaved, sub._cis = self.cos[index], self.sin[index], self.interleaved, None
        return sub

    def half_split(self) -> "Rope":
        """The same angles in the half-split layout (V3.2's indexer rotates that way beside interleaved MLA)."""
        if not self.interleaved:
            return self
        sub = Rope.__new__(Rope)
        sub.cos, sub.sin, sub.interleaved, sub._cis = self.cos, self.sin, False, None
        return sub

    def inverse(self) -> "Rope":
        """The opposite rotation (DeepSeek-V4 rotates its attention output back by the query's angle)."""
        sub = Rope.__new__(Rope)
        sub.cos, sub.sin, sub.interleaved, sub._cis = self.cos, -self.sin, self.interleaved, None
        return sub

    def rotate_tail(self, x: torch.Tensor) -> torch.Tensor:
        """Rotates the last rope dims of x [..., T, heads, dim] and leaves the rest (V4's [nope | rope] heads)."""
        d = 2 * self.cos.shape[-1]
        return torch.cat((x[..., :-d], self.rotate(x[..., -d:])), dim=-1)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """Rotates x [..., T, heads, dim] (positions broadcast over heads)."""
        if self.interleaved:
            # Interleaved pairs are complex numbers: one complex multiply in float32 (as DeepSeek's reference
            # does), fewer kernels than the real-arithmetic form.
            if self._cis is None:
                self._cis = torch.complex(self.cos, self.sin).unsqueeze(-2)
            pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
            return torch.view_as_real(pairs * self._cis).flatten(-2).to(x.dtype)
        cos, sin = self.cos.unsqueeze(-2).to(x.dtype), self.sin.unsqueeze(-2).to(x.dtype)
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class RotaryEmbedding(nn.Module):
    """Frequencies for the config; `rotary(positions)` gives the Rope table for those positions."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        inv_freq, amplitude = rope_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.amplitude = amplitude
        self.interleaved = config.rope_interleave

    def _apply(self, fn, recurse=True):
        # The frequencies stay float32 when the model is cast (model.to(bfloat16)): bf16 would move the angles
        # of far positions by whole radians.
        original = self.inv_freq
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            self.inv_freq = original.to(self.inv_freq.device)
        return self

    def forward(self, positions: torch.Tensor) -> Rope:
        freqs = positions.to(torch.float32)[..., None] * self.inv_freq
        return Rope(freqs, self.amplitude, self.interleaved)
