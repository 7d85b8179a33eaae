"""Pricing at cost: the machine's hourly price divided by what it measurably serves.

At startup the server times its own engine on three workloads (synthetic token prompts, no model changes):
  * cache-miss prefill: prompts computed from scratch (tokens / second of prefill);
  * cache hits: the same prompts again, now served from the prefix cache (tokens / second of "prefill");
  * decode: many concurrent sequences generating (aggregate output tokens / second).
Price per 1M tokens of a kind = cost_per_hour / 3600 / (tokens per second of that kind) * 1e6. Each response's
usage adds its own cost: hit, miss and output tokens at those prices. Like DeepSeek's list prices, this assumes
the machine is kept busy with each kind of work; an idle server costs the same per hour and serves nothing.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass


@dataclass
class Prices:
    cost_per_hour: float
    cache_miss_tokens_per_s: float
    cache_hit_tokens_per_s: float
    output_tokens_per_s: float

    def per_million(self, tokens_per_s: float) -> float:
        return self.cost_per_hour / 3600.0 / max(tokens_per_s, 1e-9) * 1e6

    def table(self) -> dict:
        return {
            "currency": "USD",
            "cost_per_hour": self.cost_per_hour,
            "input_cache_hit_per_1m": self.per_million(self.cache_hit_tokens_per_s),
            "input_cache_miss_per_1m": self.per_million(self.cache_miss_tokens_per_s),
            "output_per_1m": self.per_million(self.output_tokens_per_s),
            "measured": asdict(self),
            "method": "cost_per_hour / 3600 / measured tokens per second x 1e6, per kind of work",
        }

    def cost(self, hit: int, miss: int, output: int) -> float:
        return (hit * self.per_million(self.cache_hit_tokens_per_s) + miss * self.per_million(
            self.cache_miss_tokens_per_s) + output * self.per_million(self.output_tokens_per_s)) / 1e6


def calibrate(engine, cost_per_hour: float, prompt_tokens: int = 256, prompts: int = 4, decode_seqs: int = 16,
              decode_tokens: int = 32) -> Prices:
    """Times the engine (an LLMEngine, idle) on miss prefill, hit prefill and batched decode."""
    from ..engine import LLM, SamplingParams

    llm = LLM.__new__(LLM)
    llm.engine = engine
    vocab = engine.config.vocab_size
    rng = random.Random(0)
    length = min(prompt_tokens, engine.max_model_len - 2)
    batch = [[rng.randrange(vocab) for _ in range(length)] for _ in range(prompts)]
    one = SamplingParams(temperature=0, max_tokens=1)
    t = time.perf_counter()
    llm.generate(batch, one)
    miss_s = time.perf_counter() - t
    t = time.perf_counter()
    outs = llm.generate(batch, one)
    hit_s = time.perf_counter() - t
    hits = sum(o.metrics.prompt_cache_hit_tokens for o in outs)
    decode_prompts = [[rng.randrange(vocab) for _ in range(8)] for _ in range(decode_seqs)]
    t = time.perf_counter()
    outs = llm.generate(decode_prompts, SamplingParams(temperature=0, max_tokens=decode_tokens, ignore_eos=True))
    decode_s = time.perf_counter() - t
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    engine.blocks.reset_prefix_cache()  # calibration prompts must not look like anyone's cache hits
    return Prices(cost_per_hour, length * prompts / miss_s, max(hits, 1) / hit_s, produced / decode_s)
