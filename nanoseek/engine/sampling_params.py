"""SamplingParams: how one request is decoded (vLLM's names and defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

from ..errors import NanoseekError


class InvalidRequestError(NanoseekError):
    """A request parameter is out of range; the message names it and the allowed range."""


# A logits processor sees the token ids generated so far and the next-token logits [vocab] (float32) and
# returns logits (it may modify them in place). JSON mode and the server's policy layer plug in here.
LogitsProcessor = Callable[[list[int], "torch.Tensor"], "torch.Tensor"]  # noqa: F821


class OutputFilter(Protocol):
    """Cuts generated text where forbidden content starts (the server's policy layer plugs in here).

    The engine calls `find(text, searched)` as text arrives: it returns (name, index) for the earliest match
    that ends past `searched` (text before it was searched already), or None. A match finishes the sequence with
    finish_reason `content_filter`, its text cut at `index`, stop_reason `name`. Until a sequence finishes, its
    last `holdback` characters are not shown: they might still become part of a match."""
    holdback: int

    def find(self, text: str, searched: int) -> tuple[str, int] | None: ...


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16  # None = up to the context limit
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # None = off; k >= 0 = the sampled token's logprob plus the top k
    logprobs_mode: str = "raw"  # raw: model distribution; processed: after penalties and temperature
    skip_special_tokens: bool = True
    logits_processors: list[LogitsProcessor] = field(default_factory=list)
    output_filter: OutputFilter | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        def bad(name, allowed):
            raise InvalidRequestError(f"{name}={getattr(self, name)!r} is out of range: {allowed}")

        if not isinstance(self.n, int) or self.n < 1:
            bad("n", "an integer >= 1")
        if self.temperature < 0:
            bad("temperature", "must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if self.top_k < 0:
            bad("top_k", "must be >= 0 (0 or -1 = off)")
        if not 0 <= self.min_p <= 1:
            bad("min_p", "must be in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                bad(name, "must be in [-2, 2]")
        if self.repetition_penalty <= 0:
            bad("repetition_penalty", "must be > 0 (1 = off)")
        if self.max_tokens is not None and self.max_tokens < 1:
            bad("max_tokens", "must be >= 1")
        if self.min_tokens < 0 or (self.max_tokens is not None and self.min_tokens > self.max_tokens):
            bad("min_tokens", "must be in [0, max_tokens]")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            bad("logprobs", "must be in [0, 20]")
        if self.logprobs_mode not in ("raw", "processed"):
            bad("logprobs_mode", "raw or processed")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not -(1 << 63) <= self.seed < (1 << 64)):
            bad("seed", "must be an integer in [-2^63, 2^64)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
