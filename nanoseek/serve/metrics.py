"""Prometheus metrics: requests, tokens in/out, queue depth, running sequences, cache hit rate, time to first
token and inter-token latency histograms, MTP speculation's acceptance. Rendered from the engine's own counters plus per-request outputs."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class ServerMetrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("nanoseek_requests", "HTTP API requests by route and status", ["route", "status"],
                                registry=r)
        self.requests_started = Counter("nanoseek_requests_started", "generation requests accepted", registry=r)
        self.prompt_tokens = Counter("nanoseek_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.completion_tokens = Counter("nanoseek_completion_tokens", "generated tokens", registry=r)
        self.ttft = Histogram("nanoseek_time_to_first_token_seconds", "time to first token", buckets=_LATENCY,
                              registry=r)
        self.itl = Histogram("nanoseek_inter_token_latency_seconds", "time between tokens of a sequence",
                             buckets=_LATENCY, registry=r)
        self.queue = Gauge("nanoseek_queue_depth", "requests waiting for the engine", registry=r)
        self.running = Gauge("nanoseek_running_sequences", "sequences being decoded", registry=r)
        self.cache_usage = Gauge("nanoseek_kv_cache_usage", "fraction of KV-cache blocks in use", registry=r)
        self.hit_rate = Gauge("nanoseek_prompt_cache_hit_rate", "prompt tokens served from the prefix cache / all",
                              registry=r)
        self.spec_drafted = Gauge("nanoseek_spec_draft_tokens_total", "MTP draft tokens verified", registry=r)
        self.spec_accepted = Gauge("nanoseek_spec_accepted_tokens_total", "MTP draft tokens accepted", registry=r)
        self.spec_rate = Gauge("nanoseek_spec_acceptance_rate", "accepted / verified MTP draft tokens", registry=r)

    def observe_request(self, out, prompt_tokens: int, completion_tokens: int, start: float) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.completion_tokens.inc(completion_tokens)
        m = out.metrics
        if m.time_to_first_token is not None:
            self.ttft.observe(m.time_to_first_token)
        times = m.token_times
        if len(times) > 1 and len(out.outputs) == 1:
            for a, b in zip(times, times[1:]):
                self.itl.observe(b - a)

    def render(self, stats: dict) -> bytes:
        self.queue.set(stats["num_waiting"])
        self.running.set(stats["num_running"])
        self.cache_usage.set(stats["kv_cache_usage"])
        prompt = stats.get("prompt_tokens", 0)
        self.hit_rate.set(stats.get("prompt_cache_hit_tokens", 0) / prompt if prompt else 0.0)
        drafted, accepted = stats.get("spec_draft_tokens", 0), stats.get("spec_accepted_tokens", 0)
        self.spec_drafted.set(drafted)
        self.spec_accepted.set(accepted)
        self.spec_rate.set(accepted / drafted if drafted else 0.0)
        return generate_latest(self.registry)
