"""The HTTP server with the official openai client against a live server on a tiny checkpoint."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from nanoseek.errors import ConfigError
from nanoseek.serve.app import ServeConfig
from nanoseek.serve.policy import Policy
from nanoseek.serve.pricing import Prices
import procs
from serving import free_port, live_server, wait_until
from tiny import SPECIAL_TOKENS

MSG = [{"role": "user", "content": "What is 2 + 2?"}]
THINK_CLOSE_ID = SPECIAL_TOKENS.index("</think>")  # the tiny tokenizer makes its special tokens first


@pytest.fixture(scope="module")
def server(chat_checkpoint):
    directory, _ = chat_checkpoint("deepseek_v3")
    prices = Prices(cost_per_hour=2.0, cache_miss_tokens_per_s=1000, cache_hit_tokens_per_s=50000,
                    output_tokens_per_s=200)
    with live_server(directory, ServeConfig(model_name="tiny", prices=prices, keepalive_seconds=0.2),
                     max_num_seqs=4) as s:
        yield s


def client(base):
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)


def test_chat_completion_fields_and_usage(server):
    base, llm, _ = server
    r = client(base).chat.completions.create(model="tiny", messages=MSG, max_tokens=8, temperature=0)
    assert r.object == "chat.completion" and r.model == "tiny" and r.system_fingerprint.startswith("fp_")
    choice = r.choices[0]
    assert choice.finish_reason in ("stop", "length") and choice.message.role == "assistant"
    extra = choice.message.model_extra
    assert "reasoning_content" in extra  # R1 template opened <think>: output is reasoning until </think>
    u = r.usage.model_dump()
    assert u["prompt_cache_hit_tokens"] + u["prompt_cache_miss_tokens"] == u["prompt_tokens"]
    assert u["completion_tokens"] == 8 or choice.finish_reason == "stop"
    assert "reasoning_tokens" in u["completion_tokens_details"] and u["cost"] > 0
    # A repeated long prompt hits the prefix cache.
    long = [{"role": "system", "content": "You are a careful assistant who explains every step. " * 3}] + MSG
    first = client(base).chat.completions.create(model="tiny", messages=long, max_tokens=2, temperature=0)
    again = client(base).chat.completions.create(model="tiny", messages=long, max_tokens=2, temperature=0)
    assert first.usage.model_dump()["prompt_cache_hit_tokens"] == 0
    # Every whole block but the one holding the last prompt token (which must be computed for its logits).
    assert again.usage.model_dump()["prompt_cache_hit_tokens"] == (again.usage.prompt_tokens - 1) // 16 * 16 > 0


def test_streaming_with_usage_and_the_async_client(server):
    base, _, _ = server
    stream = client(base).chat.completions.create(model="tiny", messages=MSG, max_tokens=10, temperature=0,
                                                  stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    text = "".join((c.choices[0].delta.model_extra.get("reasoning_content") or "") + (c.choices[0].delta.content or "")
                   for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish and finish[-1] in ("stop", "length")
    full = client(base).chat.completions.create(model="tiny", messages=MSG, max_tokens=10, temperature=0)
    m = full.choices[0].message
    assert text == (m.model_extra.get("reasoning_content") or "") + (m.content or "")

    async def run():
        ac = openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
        r = await ac.chat.completions.create(model="tiny", messages=MSG, max_tokens=5, temperature=0)
        s = await ac.chat.completions.create(model="tiny", messages=MSG, max_tokens=5, temperature=0, stream=True)
        n = 0
        async for _ in s:
            n += 1
        return r, n

    r, n = asyncio.run(run())
    assert r.choices[0].finish_reason in ("stop", "length") and n >= 2


def test_completions_endpoint_and_fim_refusal(server):
    base, _, _ = server
    r = client(base).completions.create(model="tiny", prompt="The quick brown", max_tokens=6, temperature=0)
    assert r.object == "text_completion" and r.usage.prompt_tokens > 0
    with pytest.raises(openai.UnprocessableEntityError, match="fill-in-the-middle"):
        client(base).completions.create(model="tiny", prompt="def f(", suffix="return x", max_tokens=4)
    ids = client(base).completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=3, temperature=0)
    assert ids.choices[0].finish_reason in ("stop", "length")


def test_errors_the_deepseek_way(server):
    base, _, _ = server
    h = {"Content-Type": "application/json"}
    r = httpx.post(base + "/v1/chat/completions", content=b"{not json", headers=h)
    assert r.status_code == 400 and r.json()["error"]["message"]
    r = httpx.post(base + "/v1/chat/completions", json={"messages": MSG, "temperature": 3})
    assert r.status_code == 422 and "temperature" in r.json()["error"]["message"] and "2" in r.json()["error"]["message"]
    r = httpx.post(base + "/v1/chat/completions", json={"messages": MSG, "stream_options": {"include_usage": True}})
    assert r.status_code == 400 and "stream_options" in r.json()["error"]["message"]
    r = httpx.post(base + "/v1/chat/completions", json={"messages": MSG, "tools": [{"type": "function"}]})
    assert r.status_code == 422 and "tool" in r.json()["error"]["message"]
    r = httpx.post(base + "/v1/chat/completions", json={"messages": MSG, "max_tokens": 10 ** 6})
    assert r.status_code == 422 and "max_tokens" in r.json()["error"]["message"]
    r = httpx.post(base + "/v1/chat/completions", json={"messages": MSG, "top_logprobs": 21, "logprobs": True})
    assert r.status_code == 422 and "top_logprobs" in r.json()["error"]["message"]
    r = httpx.post(base + "/v1/chat/completions", json={"messages": MSG, "model": "gpt-5"})
    assert r.status_code == 404
    r = httpx.post(base + "/v1/chat/completions", content=b"x" * (2 << 20), headers=h)
    assert r.status_code == 413
    assert set(r.json()["error"]) == {"message", "type", "code"}

    def chunked(total, piece=1 << 16):  # no Content-Length: the limit must hold on the bytes received
        for _ in range(total // piece):
            yield b" " * piece

    r = httpx.post(base + "/v1/chat/completions", content=chunked(8 << 20), headers=h)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large", r.text
    # Unknown routes and wrong methods answer in the same shape.
    for method, path, status in (("GET", "/v1/nope", 404), ("GET", "/v1/chat/completions", 405),
                                 ("DELETE", "/v1/models", 405)):
        r = httpx.request(method, base + path)
        assert r.status_code == status and set(r.json()) == {"error"}, (path, r.text)
        assert set(r.json()["error"]) == {"message", "type", "code"} and path in r.json()["error"]["message"]


DEEP = '{"messages": ' + "[" * 400_000 + "]" * 400_000 + "}"
MALFORMED = {  # name -> (route, raw JSON body, status): each once answered 500
    "400k-deep arrays": ("chat", DEEP, 400),
    "5000-digit max_tokens": ("chat", '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": ' + "1" * 5000 + "}", 400),
    "5000-digit seed": ("chat", '{"messages": [{"role": "user", "content": "hi"}], "seed": ' + "9" * 5000 + "}", 400),
    "text part of 123": ("chat", '{"messages": [{"role": "user", "content": [{"type": "text", "text": 123}]}]}', 422),
    "text part of null": ("chat", '{"messages": [{"role": "user", "content": [{"type": "text", "text": null}]}]}', 422),
    "text part of an object": ("chat", '{"messages": [{"role": "user", "content": [{"type": "text", "text": {}}]}]}', 422),
    "image part": ("chat", '{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}', 422),
    "lone surrogate in content": ("chat", '{"messages": [{"role": "user", "content": "a\\ud800b"}]}', 400),
    "lone surrogate in prompt": ("completions", '{"prompt": "\\ud800"}', 400),
    "seed 2^64": ("chat", '{"messages": [{"role": "user", "content": "hi"}], "seed": 18446744073709551616}', 422),
    "seed -2^63-1": ("chat", '{"messages": [{"role": "user", "content": "hi"}], "seed": -9223372036854775809}', 422),
    "token id -1": ("completions", '{"prompt": [-1]}', 422),
    "token id 2^63": ("completions", '{"prompt": [9223372036854775808]}', 422),
    "stream as a string": ("chat", '{"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}', 422),
    "seed as a bool": ("chat", '{"messages": [{"role": "user", "content": "hi"}], "seed": true}', 422),
    "suffix with token ids": ("completions", '{"prompt": [5, 6], "suffix": "x"}', 422),
    "17 stop strings": ("chat", json.dumps({"messages": MSG, "stop": [f"s{i}" for i in range(17)]}), 422),
    "a 257-character stop": ("completions", json.dumps({"prompt": "hi", "stop": "x" * 257}), 422),
    "2049 messages": ("chat", json.dumps({"messages": MSG * 2049}), 422),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_requests_get_a_clear_4xx(server, case):
    base, _, _ = server
    route, raw, status = MALFORMED[case]
    r = httpx.post(f"{base}/v1/{'chat/completions' if route == 'chat' else 'completions'}", content=raw,
                   headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == status, (case, r.text[:300])
    error = r.json()["error"]
    assert set(error) == {"message", "type", "code"} and error["type"] == "invalid_request_error" and error["message"]
    t = httpx.post(base + "/v1/chat/completions", json={"messages": MSG, "max_tokens": 2}, timeout=30)
    assert t.status_code == 200 and t.elapsed.total_seconds() < 1


def test_a_large_request_never_stalls_the_event_loop(server):
    """Parsing, validation, the chat template and tokenization of a near-limit request run off the loop."""
    import threading

    base, _, _ = server
    big = {"messages": [{"role": "user", "content": "a " * 220} for _ in range(2000)], "max_tokens": 1}
    done = []
    sender = threading.Thread(target=lambda: done.append(httpx.post(base + "/v1/chat/completions", json=big,
                                                                    timeout=60)))
    sender.start()
    worst = 0.0
    while sender.is_alive():
        worst = max(worst, httpx.get(base + "/health", timeout=10).elapsed.total_seconds())
    sender.join()
    assert done[0].status_code in (200, 422), done[0].text[:200]  # too long for the context is a clear 422
    assert worst < 0.5


def test_logprobs_and_json_mode(server):
    base, _, _ = server
    r = client(base).chat.completions.create(model="tiny", messages=MSG, max_tokens=4, temperature=0, logprobs=True,
                                             top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens and len(content[0].top_logprobs) == 3
    assert isinstance(content[0].bytes, list)
    # JSON mode on a reasoning model: the thinking is free, the answer after </think> is a JSON object.
    r = client(base).chat.completions.create(model="tiny", messages=MSG, max_tokens=200, temperature=1.0, seed=1,
                                             response_format={"type": "json_object"},
                                             logit_bias={str(THINK_CLOSE_ID): 100})
    content = r.choices[0].message.content
    assert r.choices[0].message.model_extra["reasoning_content"] == "" and content.startswith('{"')
    if r.choices[0].finish_reason == "stop":  # a random model's keys may run to max_tokens
        assert isinstance(json.loads(content), dict)


def test_models_metrics_pricing_health(server):
    base, _, _ = server
    assert [m.id for m in client(base).models.list()] == ["tiny"]
    text = httpx.get(base + "/metrics").text
    for name in ("nanoseek_requests_total", "nanoseek_queue_depth", "nanoseek_running_sequences",
                 "nanoseek_prompt_cache_hit_rate", "nanoseek_time_to_first_token_seconds_bucket",
                 "nanoseek_inter_token_latency_seconds_bucket", "nanoseek_prompt_tokens_total"):
        assert name in text, name
    p = httpx.get(base + "/v1/pricing").json()
    assert p["input_cache_hit_per_1m"] < p["input_cache_miss_per_1m"] < p["output_per_1m"]
    assert p["output_per_1m"] == pytest.approx(2.0 / 3600 / 200 * 1e6)
    assert httpx.get(base + "/health").json()["status"] == "ok"
    assert "nanoseek" in httpx.get(base + "/").text


def test_disconnects_abort_the_request_and_free_every_block(server):
    base, llm, _ = server
    free = llm.engine.blocks.num_free
    before = llm.engine.stats()
    max_tokens = 4000  # far more than the seconds below can generate: only an abort ends these requests in time
    body = {"model": "tiny", "messages": MSG, "max_tokens": max_tokens, "temperature": 1.0, "ignore_eos": True}

    async def disconnect_midway(stream: bool):
        async with httpx.AsyncClient(base_url=base, timeout=30) as c:
            if stream:
                async with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
                    n = 0
                    async for _ in r.aiter_lines():
                        n += 1
                        if n > 5:
                            break  # closes the connection mid-stream
            else:
                task = asyncio.create_task(c.post("/v1/chat/completions", json=body))
                await asyncio.sleep(0.5)
                task.cancel()  # drops the connection mid-request
                await asyncio.gather(task, return_exceptions=True)

    async def run():
        await asyncio.gather(*(disconnect_midway(i % 2 == 0) for i in range(6)))

    asyncio.run(run())
    assert wait_until(lambda: llm.engine.blocks.num_free == free and not llm.engine.requests, timeout=1.0), \
        (llm.engine.blocks.num_free, free, list(llm.engine.requests))
    after = llm.engine.stats()
    assert after["requests_aborted"] - before["requests_aborted"] == 6
    assert after["generation_tokens"] - before["generation_tokens"] < 6 * max_tokens // 4


def test_a_request_that_broke_the_engine_no_longer_can(server):
    """The seed that overflowed a fork's generator inside engine.step() and took the service down."""
    base, _, _ = server
    r = httpx.post(base + "/v1/chat/completions", json={"messages": MSG, "max_tokens": 4, "n": 2,
                                                         "seed": 18446744073709551615})
    assert r.status_code == 200 and len(r.json()["choices"]) == 2
    for seed in (1 << 64, -(1 << 63) - 1):
        r = httpx.post(base + "/v1/chat/completions", json={"messages": MSG, "max_tokens": 4, "seed": seed})
        assert 400 <= r.status_code < 500 and "seed" in r.json()["error"]["message"], r.text
    assert httpx.get(base + "/health").status_code == 200


def test_a_fault_inside_a_step_fails_that_request_only(server, monkeypatch):
    base, llm, _ = server
    runner, real_run, armed = llm.engine.runner, llm.engine.runner.run, [True]

    def faulty(plan):
        if armed and armed.pop():
            raise RuntimeError("injected fault")
        return real_run(plan)

    monkeypatch.setattr(runner, "run", faulty)
    r = httpx.post(base + "/v1/chat/completions", json={"messages": MSG, "max_tokens": 4})
    assert r.status_code == 500 and r.json()["error"]["code"] == "engine_fault", r.text
    assert "injected fault" in r.json()["error"]["message"]
    armed.append(True)
    with httpx.stream("POST", base + "/v1/chat/completions",
                      json={"messages": MSG, "max_tokens": 4, "stream": True}) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert s.status_code == 200 and events[-1]["error"]["code"] == "engine_fault"
    assert httpx.get(base + "/health").status_code == 200
    r = httpx.post(base + "/v1/chat/completions", json={"messages": MSG, "max_tokens": 4})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert wait_until(lambda: llm.engine.blocks.num_free == llm.engine.blocks.num_blocks and not llm.engine.requests)


def test_the_watchdog_restarts_an_engine_loop_that_failed(server):
    base, llm, _ = server
    scheduler = llm.engine.scheduler

    def broken(only=None):
        raise RuntimeError("scheduler bookkeeping broke")

    scheduler.schedule = broken  # outside any one request's step: the watchdog's case
    r = httpx.post(base + "/v1/chat/completions", json={"messages": MSG, "max_tokens": 4})
    assert r.status_code == 500 and r.json()["error"]["code"] == "engine_fault", r.text
    assert wait_until(lambda: httpx.get(base + "/health").status_code == 200, timeout=5)
    assert llm.stats()["engine_restarts"] == 1 and llm.engine.scheduler is not scheduler
    r = httpx.post(base + "/v1/chat/completions", json={"messages": MSG, "max_tokens": 4})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_keep_alive_while_queued_and_429_when_full(chat_checkpoint):
    directory, _ = chat_checkpoint("deepseek_v3")
    with live_server(directory, ServeConfig(keepalive_seconds=0.1, max_queue=1), max_num_seqs=1) as (base, llm, _):
        long = {"messages": MSG, "max_tokens": 8000, "temperature": 1.0, "ignore_eos": True}

        async def run():
            async with httpx.AsyncClient(base_url=base, timeout=60) as c:
                first = asyncio.create_task(c.post("/v1/chat/completions", json=long))
                await asyncio.sleep(0.3)
                lines = []
                async with c.stream("POST", "/v1/chat/completions", json={**long, "stream": True}) as r:
                    # Held in a name: a dropped line iterator is finalized, which closes the stream (a hang-up).
                    stream_lines = r.aiter_lines()
                    async for line in stream_lines:
                        lines.append(line)
                        if line.startswith(": keep-alive") and len(lines) > 3:
                            break
                        if len(lines) > 200:
                            break
                    # one request runs, this one waits: the queue is full and a third request is refused
                    for _ in range(200):
                        stats = llm.engine.stats()
                        if stats["num_running"] == 1 and stats["num_waiting"] == 1:
                            break
                        await asyncio.sleep(0.05)
                    stats = llm.engine.stats()
                    assert (stats["num_running"], stats["num_waiting"]) == (1, 1), (stats, first.done() and
                                                                                     first.result().text[:300])
                    full = await c.post("/v1/chat/completions", json=long, timeout=10)
                first.cancel()
                return lines, full

        lines, full = asyncio.run(run())
        assert any(line.startswith(": keep-alive") for line in lines)
        assert full.status_code == 429 and full.headers["retry-after"] == "1"


def test_api_key_protects_every_api_route(chat_checkpoint):
    directory, _ = chat_checkpoint("deepseek_v3")
    with live_server(directory, ServeConfig(api_key="s3cret")) as (base, _, _):
        for method, path in [("POST", "/v1/chat/completions"), ("POST", "/chat/completions"), ("GET", "/v1/models"),
                             ("GET", "/models"), ("POST", "/v1/completions"), ("GET", "/metrics"),
                             ("GET", "/v1/pricing"), ("GET", "/v1/nope")]:
            r = httpx.request(method, base + path, json={"messages": MSG})
            assert r.status_code == 401, path
            assert r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(base + "/health").status_code == 200
        assert httpx.get(base + "/").status_code == 200
        ok = openai.OpenAI(base_url=base + "/v1", api_key="s3cret", max_retries=0)
        assert ok.chat.completions.create(messages=MSG, model="nanoseek", max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()


def test_policy_filters_input_and_output_and_audits(chat_checkpoint, tmp_path):
    directory, _ = chat_checkpoint("deepseek_v3")
    # Find text the model will produce, to write an output rule that must fire.
    with live_server(directory) as (base, _, _):
        probe = client(base).chat.completions.create(model="nanoseek", messages=MSG, max_tokens=40, temperature=0)
        m = probe.choices[0].message
        produced = (m.model_extra.get("reasoning_content") or "") + (m.content or "")
    assert len(produced) > 24
    # A secret longer than holdback_chars: streaming must hold back for the longest match, not only 4 characters.
    secret = produced[6:20]
    before = produced[:produced.index(secret)]
    (tmp_path / "policy.toml").write_text(f'''
name = "house"
audit_log = "audit.jsonl"
holdback_chars = 4
[[input]]
name = "no-passwords"
pattern = "(?i)password"
[[output]]
name = "no-secret"
pattern = {json.dumps(__import__("re").escape(secret))}
''')
    policy = Policy.from_file(tmp_path / "policy.toml")
    assert policy.holdback == len(secret)
    with live_server(directory, ServeConfig(policy=policy)) as (base, _, _):
        r = httpx.post(base + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "my password is x"}]})
        assert r.json()["choices"][0]["finish_reason"] == "content_filter"
        assert r.headers["x-nanoseek-policy"] == "house/no-passwords"
        r = httpx.post(base + "/v1/chat/completions", json={"messages": MSG, "max_tokens": 40, "temperature": 0})
        choice = r.json()["choices"][0]
        text = (choice["message"]["reasoning_content"] or "") + (choice["message"]["content"] or "")
        assert choice["finish_reason"] == "content_filter" and text == before
        assert r.headers["x-nanoseek-policy"] == "house/no-secret"
        streamed, chunks = "", []
        with httpx.stream("POST", base + "/v1/chat/completions",
                          json={"messages": MSG, "max_tokens": 40, "temperature": 0, "stream": True}) as s:
            for line in s.iter_lines():
                if line.startswith("data: {"):
                    for c in json.loads(line[6:])["choices"]:
                        d = c["delta"]
                        streamed += (d.get("reasoning_content") or "") + (d.get("content") or "")
                        chunks.append(streamed)
                        last_finish = c["finish_reason"] or None
        # Not one character of the match was ever sent, and the text before it was (streamed, not withheld).
        assert streamed == before and last_finish == "content_filter"
        assert all(before.startswith(sent) for sent in chunks)
    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert {a["rule"] for a in audit} == {"no-passwords", "no-secret"}
    assert all("text" not in a for a in audit) and all(a["request_id"] for a in audit)


def test_an_output_rule_of_unbounded_length_is_refused(tmp_path):
    (tmp_path / "policy.toml").write_text('[[output]]\nname = "ids"\npattern = "id-\\\\d+"\n')
    with pytest.raises(ConfigError, match=r"output rule ids can match text of any length.*\\w\{1,40\}"):
        Policy.from_file(tmp_path / "policy.toml")


def test_policy_rules_need_distinct_names(tmp_path):
    (tmp_path / "policy.toml").write_text('[[output]]\nname = "x"\npattern = "a"\n[[output]]\nname = "x"\npattern = "b"\n')
    with pytest.raises(ConfigError, match=r"two \[\[output\]\] rules are named x"):
        Policy.from_file(tmp_path / "policy.toml")


def test_policy_patterns_run_in_linear_time(chat_checkpoint, tmp_path):
    (tmp_path / "bad.toml").write_text('[[input]]\nname = "ahead"\npattern = "secret(?=!)"\n')
    with pytest.raises(ConfigError, match="rule ahead pattern is not valid RE2.*lookaround"):
        Policy.from_file(tmp_path / "bad.toml")
    # The pattern that stalled the event loop 6.3 s on 26 characters under Python's backtracking engine.
    (tmp_path / "policy.toml").write_text('[[input]]\nname = "as"\npattern = "(a+)+$"\n'
                                          '[[output]]\nname = "bs"\npattern = "b{1,4}c"\n')
    policy = Policy.from_file(tmp_path / "policy.toml")
    directory, _ = chat_checkpoint("deepseek_v3")
    with live_server(directory, ServeConfig(policy=policy)) as (base, _, _):
        hostile = "a" * 26 + "!"
        r = httpx.post(base + "/v1/chat/completions",
                       json={"messages": [{"role": "user", "content": hostile * 50}], "max_tokens": 2}, timeout=30)
        assert r.status_code == 200 and r.elapsed.total_seconds() < 2
        r = httpx.post(base + "/v1/chat/completions",
                       json={"messages": [{"role": "user", "content": "aaaa"}], "max_tokens": 2})
        assert r.json()["choices"][0]["finish_reason"] == "content_filter"
    assert policy.check_output("x" * 10 + "bbbbc", searched=12) == (policy.output_rules[0], 10)
    assert policy.check_output("bbbc" + "x" * 30, searched=30) is None  # already searched: not re-reported


def test_policy_system_prompt_goes_first_and_keeps_the_clients_own(chat_checkpoint, tmp_path):
    directory, _ = chat_checkpoint("deepseek_v3")
    (tmp_path / "policy.toml").write_text('name = "house"\naudit_log = "audit.jsonl"\n'
                                          'system_prompt = "Answer in one line."\n')
    policy = Policy.from_file(tmp_path / "policy.toml")
    own = [{"role": "system", "content": "You are a pirate."}] + MSG
    with live_server(directory, ServeConfig(policy=policy)) as (base, llm, _):
        tok = llm.tokenizer

        def prompt_tokens(messages):
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return len(tok.encode(text, add_special_tokens=False))

        r = httpx.post(base + "/v1/chat/completions", json={"messages": own, "max_tokens": 1})
        merged = [{"role": "system", "content": "Answer in one line.\n\nYou are a pirate."}] + MSG
        assert r.json()["usage"]["prompt_tokens"] == prompt_tokens(merged)
        assert r.headers["x-nanoseek-policy"] == "house/system_prompt"
        r = httpx.post(base + "/v1/chat/completions", json={"messages": MSG, "max_tokens": 1})
        assert r.json()["usage"]["prompt_tokens"] == prompt_tokens([{"role": "system",
                                                                      "content": "Answer in one line."}] + MSG)
    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [(a["rule"], a["action"]) for a in audit] == [("system_prompt", "merged"), ("system_prompt", "prepended")]


def test_a_port_already_taken_is_a_one_line_error_before_the_model_loads(chat_checkpoint):
    directory, _ = chat_checkpoint("deepseek_v3")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = procs.run([sys.executable, "-m", "nanoseek.cli", "serve", "--model", str(directory), "--port", str(port)],
                      capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [f"nanoseek serve: error: cannot listen on 127.0.0.1:{port} (Address "
                                             "already in use): another server may hold it; pass --port N"]


def test_sigterm_shuts_down_cleanly(chat_checkpoint):
    directory, _ = chat_checkpoint("deepseek_v3")
    port = free_port()
    with procs.spawn([sys.executable, "-m", "nanoseek.cli", "serve", "--model", str(directory), "--port", str(port),
                      "--kv-cache-memory", "64MiB"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                     env={**os.environ, "PYTHONUNBUFFERED": "1"}) as proc:
        base = f"http://127.0.0.1:{port}"
        assert wait_until(lambda: _up(base), timeout=60)
        r = httpx.post(base + "/v1/chat/completions", json={"messages": MSG, "max_tokens": 4})
        assert r.status_code == 200
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert "Traceback" not in err


def test_sigterm_lets_in_flight_requests_finish_and_refuses_new_ones(chat_checkpoint):
    directory, _ = chat_checkpoint("deepseek_v3")
    port = free_port()
    with procs.spawn([sys.executable, "-m", "nanoseek.cli", "serve", "--model", str(directory), "--port", str(port),
                      "--kv-cache-memory", "64MiB", "--shutdown-grace", "60"], stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}) as proc:
        base = f"http://127.0.0.1:{port}"
        assert wait_until(lambda: _up(base), timeout=60)
        body = {"messages": MSG, "max_tokens": 300, "ignore_eos": True, "temperature": 1.0, "stream": True,
                "stream_options": {"include_usage": True}}
        events = []
        with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=60) as s:
            for line in s.iter_lines():
                if line.startswith("data: {"):
                    events.append(json.loads(line[6:]))
                    if len(events) == 5:
                        proc.send_signal(signal.SIGTERM)  # mid-answer
                        time.sleep(0.3)
                        try:  # nothing new is taken on while draining
                            refused = httpx.post(base + "/v1/chat/completions", json={"messages": MSG}).status_code
                        except httpx.HTTPError:
                            refused = "connection refused"
                        assert refused in (503, "connection refused")
        out, err = proc.communicate(timeout=60)
    assert events[-1]["usage"]["completion_tokens"] == 300  # the in-flight answer ran to its end
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "length"
    assert proc.returncode == 0 and "Traceback" not in err


def _up(base):
    try:
        return httpx.get(base + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
