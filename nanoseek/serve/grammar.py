"""Constrained decoding through llguidance (the grammar engine vLLM and SGLang use as their `guidance` backend).

A grammar (a JSON Schema, or a Lark grammar for tool calls) becomes a per-request logits processor: before each
token, llguidance computes the set of tokens that keep the output a prefix of some string of the grammar; the
others get -inf. The matcher works on token ids against the served tokenizer itself, so a token that spans a
JSON boundary is judged by its bytes, not by a guess. End-of-sequence is allowed only where the grammar accepts,
and is the only choice once it cannot continue, so a constrained answer always parses unless it stops for length.

Reasoning models: when the prompt leaves a `<think>` block open, the reasoning is free and the grammar starts
after the model closes it with `</think>` (what DeepSeek's API constrains is the answer, not the thoughts).
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import torch

from .errors import APIError

# Compact JSON: no free whitespace between tokens, so a model cannot wander in blanks instead of closing the
# document, and separators like Python's json.dumps defaults.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _llguidance():
    try:
        import llguidance
    except ImportError:  # a dependency of the package; only a broken install gets here
        raise APIError(501, "constrained decoding needs the llguidance package: pip install llguidance",
                       "server_error", "grammar_unavailable") from None
    return llguidance


class Grammars:
    """Compiles grammars for one served tokenizer and makes their logits processors. Building llguidance's view
    of the tokenizer takes ~1 s on a 150k vocabulary, so it is done once, on first use (thread-safe)."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: set[int]):
        self.tokenizer, self.vocab_size, self.eos_ids = tokenizer, vocab_size, sorted(eos_ids)
        self._lock = threading.Lock()
        self._ll_tokenizer = None

    @property
    def ll_tokenizer(self):
        with self._lock:
            if self._ll_tokenizer is None:
                ll = _llguidance()
                n_vocab = max(self.vocab_size, self.tokenizer.vocab_size)
                self._ll_tokenizer = ll.LLTokenizer(self.tokenizer.backend.to_str(), n_vocab=n_vocab,
                                                    eos_token=self.eos_ids or None)
            return self._ll_tokenizer

    # ---- grammars ----
    @staticmethod
    def json_schema(schema: dict) -> str:
        """The llguidance grammar of a JSON Schema (not yet checked: see `check`)."""
        ll = _llguidance()
        try:
            return ll.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=JSON_OPTIONS)
        except ValueError as e:
            raise APIError(400, f"invalid JSON schema: {e}", "invalid_request_error", "invalid_json_schema") from None

    @staticmethod
    def lark(text: str) -> str:
        return _llguidance().LLMatcher.grammar_from_lark(text)

    def check(self, grammar: str, what: str = "response_format.json_schema") -> None:
        """A 400 naming what the grammar library cannot do (e.g. 'Unimplemented keys: ["if"]')."""
        ll = _llguidance()
        error = ll.LLMatcher.validate_grammar(grammar, self.ll_tokenizer)
        if error:
            first = error.strip().splitlines()[0]
            raise APIError(400, f"invalid parameter '{what}': {first} (supported: type, properties, required, "
                                "items, enum, const, anyOf/oneOf, $ref, min/max bounds, pattern, format)",
                           "invalid_request_error", "unsupported_schema")

    def processor(self, grammar: str, reasoning: bool = False, think_close_id: int | None = None) -> "GrammarProcessor":
        matcher = _llguidance().LLMatcher(self.ll_tokenizer, grammar)
        if matcher.is_error():
            raise APIError(400, f"grammar error: {matcher.get_error()}", "invalid_request_error", "invalid_grammar")
        return GrammarProcessor(matcher, self.eos_ids, gated=reasoning and think_close_id is not None,
                                think_close_id=think_close_id)


class GrammarProcessor:
    """The engine's logits-processor hook around one llguidance matcher (one sequence: n = 1).

    Fed the tokens generated since its last call; `seconds` accumulates its own time (the share of the decode
    step constrained decoding costs, reported by bench/structured.py)."""

    def __init__(self, matcher, eos_ids: list[int], gated: bool = False, think_close_id: int | None = None):
        self.matcher, self.eos_ids = matcher, eos_ids
        self.gated, self.think_close_id = gated, think_close_id
        self.consumed = 0
        self.seconds = 0.0
        self.calls = 0

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        try:
            return self._mask(output_ids, logits)
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1

    def _mask(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        new = output_ids[self.consumed:]
        self.consumed = len(output_ids)
        if self.gated:
            if self.think_close_id not in new:
                return logits  # still reasoning: free text
            self.gated = False
            new = new[new.index(self.think_close_id) + 1:]
        matcher = self.matcher
        if new and not matcher.consume_tokens(new):
            return self._only(logits, self.eos_ids)  # cannot happen with its own masks; end rather than go on
        if matcher.is_stopped() or matcher.is_error():
            return self._only(logits, self.eos_ids)
        mask = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        allowed = torch.from_numpy(mask[: logits.shape[-1]].astype(bool))
        if len(allowed) < logits.shape[-1]:
            allowed = torch.cat([allowed, torch.zeros(logits.shape[-1] - len(allowed), dtype=torch.bool)])
        return logits.masked_fill_(~allowed.to(logits.device), float("-inf"))

    @staticmethod
    def _only(logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
        keep = logits[ids].clone()
        logits.fill_(float("-inf"))
        logits[ids] = keep
        return logits
