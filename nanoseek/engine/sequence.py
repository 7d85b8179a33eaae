"""Requests, the sequences they decode, and what the engine reports about them."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

import torch

from .sampling_params import SamplingParams
from .text import IncrementalDetokenizer, find_stop, partial_suffix_len, split_reasoning


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestMetrics:
    """Per-request timings (time.monotonic seconds) and prompt-cache accounting."""
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    token_times: list[float] = field(default_factory=list)  # one per generated token, all sequences
    prompt_cache_hit_tokens: int = 0
    prompt_cache_miss_tokens: int = 0
    spec_draft_tokens: int = 0  # MTP speculation: draft tokens verified, and how many of them were accepted
    spec_accepted_tokens: int = 0

    @property
    def spec_acceptance_rate(self) -> float | None:
        return self.spec_accepted_tokens / self.spec_draft_tokens if self.spec_draft_tokens else None

    @property
    def time_in_queue(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass
class CompletionOutput:
    index: int
    text: str  # visible so far (held-back text excluded until final)
    token_ids: list[int]
    finish_reason: str | None = None  # stop | length | content_filter | abort | error
    stop_reason: str | int | None = None  # the stop string, stop token id or output filter match that ended it
    logprobs: list[dict] | None = None
    reasoning_content: str | None = None
    content: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    error: str | None = None  # set when a fault inside the engine ended this request


_seq_ids = itertools.count()


class Sequence:
    """One decoded continuation: its tokens, its KV-cache blocks and its text state."""

    def __init__(self, request: "Request", index: int, token_ids: list[int], generator: torch.Generator | None):
        self.seq_id = next(_seq_ids)
        self.request = request
        self.index = index
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(request.prompt_token_ids)
        self.num_computed = 0  # tokens whose K/V are in the cache
        self.block_table: list[int] = []
        self.status = Status.WAITING
        self.generator = generator
        self.detok = IncrementalDetokenizer(request.tokenizer, request.skip_ids) if request.tokenizer else None
        self._text = ""  # detokenized so far, cut at a stop string
        self._undecoded: list[int] = []  # generated ids not yet detokenized (see `text`)
        self.searched = 0  # text before this index was searched for stop strings
        self.filtered = 0  # text before this index was searched by the output filter
        self.logprobs: list[dict] | None = [] if request.params.logprobs is not None else None
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        # MTP speculation: tokens drafted after the last one, to be verified by the next step, and the
        # distributions they were drawn from ([len(draft), vocab]; None for greedy drafts).
        self.draft: list[int] = []
        self.draft_probs: torch.Tensor | None = None

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.status == Status.FINISHED

    @property
    def text(self) -> str:
        """The detokenized output. Without stop strings nothing needs the text while decoding, so tokens are
        detokenized when it is read (every step when streaming, once for offline generation) and in bulk."""
        if self._undecoded:
            self._text += self.detok.extend(self._undecoded)
            self._undecoded = []
        return self._text

    @text.setter
    def text(self, value: str) -> None:
        self._text = value

    def append(self, token_id: int) -> None:
        """Adds a sampled token and decides whether the sequence is done."""
        self.token_ids.append(token_id)
        params, request = self.params, self.request
        # (The sampler masks EOS and stop tokens until min_tokens are out.) The token that ends the sequence is
        # not part of its text, also when special tokens are kept (tool calls need theirs).
        if token_id in params.stop_token_ids:
            return self.finish("stop", token_id)
        if not params.ignore_eos and token_id in request.eos_ids:
            return self.finish("stop", None)
        if self.detok is not None:
            self._undecoded.append(token_id)
        if params.stop and self.detok is not None:
            hit = find_stop(self.text, params.stop, self.searched)
            self.searched = len(self.text)
            if hit is not None:
                at, stop = hit
                self.text = self.text[: at + (len(stop) if params.include_stop_str_in_output else 0)]
                return self.finish("stop", stop)
        if self.num_output >= request.max_tokens or len(self.token_ids) >= request.max_model_len:
            return self.finish("length", None)
        self.apply_output_filter()

    def finish(self, reason: str, stop_reason) -> None:
        self.finish_reason, self.stop_reason = reason, stop_reason
        self.status = Status.FINISHED
        if reason != "stop" and self.detok is not None:
            self.text = self.text + self.detok.flush()
        self.apply_output_filter()  # the text's last characters, never searched while held back

    def apply_output_filter(self) -> None:
        """Cuts the text at the output filter's first match and finishes the sequence there."""
        output_filter = self.params.output_filter
        if output_filter is None or self.detok is None or self.finish_reason == "content_filter":
            return
        hit = output_filter.find(self.text, self.filtered)
        self.filtered = len(self.text)
        if hit is not None:
            name, at = hit
            self.text = self.text[:at]
            if self.finish_reason not in ("abort", "error"):  # those keep their reason; the text is cut all the same
                self.finish_reason, self.stop_reason, self.status = "content_filter", name, Status.FINISHED

    def visible_text(self) -> str:
        """What a streaming client may see now: unfinished, the possible start of a stop string and the output
        filter's hold-back are held back."""
        if self.finished:
            return self.text
        text = self.text
        held = partial_suffix_len(text, self.params.stop) if self.params.stop else 0
        if self.params.output_filter is not None:
            held = max(held, self.params.output_filter.holdback)
        return text[: max(0, len(text) - held)]

    def output(self) -> CompletionOutput:
        text = self.visible_text()
        out = CompletionOutput(self.index, text, list(self.output_ids), self.finish_reason, self.stop_reason,
                               list(self.logprobs) if self.logprobs is not None else None)
        if self.request.reasoning:
            out.reasoning_content, out.content = split_reasoning(text, self.request.starts_in_reasoning,
                                                                 self.finished)
        return out


class Request:
    """A prompt and its n sequences (n > 1 forks from the first once the prompt is prefilled)."""

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                 tokenizer, eos_ids: set[int], max_model_len: int, skip_ids: set[int], reasoning: bool,
                 starts_in_reasoning: bool, arrival_time: float | None = None):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.skip_ids = skip_ids
        self.max_model_len = max_model_len
        remaining = max_model_len - len(prompt_token_ids)
        self.max_tokens = remaining if params.max_tokens is None else min(params.max_tokens, remaining)
        self.reasoning = reasoning
        self.starts_in_reasoning = starts_in_reasoning
        self.metrics = RequestMetrics(arrival_time if arrival_time is not None else time.monotonic())
        self.seqs: list[Sequence] = [Sequence(self, 0, prompt_token_ids, self.generator_for(0))]
        self.forked = params.n == 1
        self.aborted = False
        self.error: str | None = None

    def generator_for(self, index: int) -> torch.Generator | None:
        """Each seeded sequence has its own generator: reproducible, and no other request draws from it."""
        if self.params.seed is None:
            return None
        # Sibling i of an n > 1 request draws from seed + i, wrapped into the generator's 64-bit range.
        return torch.Generator().manual_seed((self.params.seed + index) % (1 << 64))

    @property
    def finished(self) -> bool:
        return self.forked and all(s.finished for s in self.seqs) or self.aborted or self.error is not None

    def output(self) -> RequestOutput:
        outs = [s.output() for s in self.seqs]
        if self.aborted:
            for o in outs:
                o.finish_reason = o.finish_reason or "abort"
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, outs, self.finished, self.metrics,
                             self.error)
