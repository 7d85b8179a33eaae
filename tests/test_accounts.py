"""Many users: API keys from a TOML file, per-key limits and quotas (429 with Retry-After), and the SQLite usage
ledger (GET /v1/usage, `nanoseek usage`), including a SIGKILL and restart in the middle of a load."""

import json
import os
import signal
import subprocess
import sys
import threading

import httpx
import pytest

import procs
from nanoseek.errors import ConfigError
from nanoseek.serve.accounts import Accounts, key_hash
from nanoseek.serve.errors import APIError
from nanoseek.serve.ledger import Ledger
from nanoseek.serve.service import ServeConfig
from serving import free_port, live_server, wait_until

MSG = [{"role": "user", "content": "What is 2 + 2?"}]
KEYS = """
[[key]]
name = "alice"
key_sha256 = "{alice}"
requests_per_minute = 3

[[key]]
name = "bob"
key = "bob-key"
requests_per_minute = 5
models = ["nanoseek"]

[[key]]
name = "carol"
key = "carol-key"
tokens_per_minute = 100

[[key]]
name = "root"
key = "root-key"
admin = true
""".replace("{alice}", key_hash("alice-key"))
USAGE_FIELDS = ("prompt_tokens", "completion_tokens", "prompt_cache_hit_tokens", "prompt_cache_miss_tokens")


def write_keys(tmp_path, text=KEYS):
    path = tmp_path / "keys.toml"
    path.write_text(text)
    return path


def test_keys_file_errors_name_the_problem(tmp_path):
    cases = [("", "no [[key]] tables"),
             ('[[key]]\nname = "a"\nkey = "k"\nspeed = 3\n', "unknown field(s) speed"),
             ('[[key]]\nkey = "k"\n', "needs a name"),
             ('[[key]]\nname = "a"\n', "exactly one of key or key_sha256"),
             ('[[key]]\nname = "a"\nkey_sha256 = "abc"\n', "64 hex digits"),
             ('[[key]]\nname = "a"\nkey = "k"\n[[key]]\nname = "a"\nkey = "j"\n', "used twice"),
             ('[[key]]\nname = "a"\nkey = "k"\n[[key]]\nname = "b"\nkey = "k"\n', "same key appears twice"),
             ('[[key]]\nname = "a"\nkey = "k"\nrequests_per_minute = 0\n', "positive integer"),
             ('[[key]]\nname = "a"\nkey = "k"\nmonthly_cost = "lots"\n', "positive number"),
             ("[[key]\n", "not valid TOML")]
    for text, words in cases:
        with pytest.raises(ConfigError, match=None) as e:
            Accounts.load(write_keys(tmp_path, text))
        assert words in str(e.value), (text, str(e.value))
    with pytest.raises(ConfigError, match="does not exist"):
        Accounts.load(tmp_path / "missing.toml")


def test_keys_are_found_by_hash_and_limits_refuse_with_retry_after(tmp_path):
    accounts = Accounts.load(write_keys(tmp_path))
    assert accounts.find("alice-key").name == "alice" and accounts.find("bob-key").name == "bob"
    assert accounts.find("alice-key ") is None and accounts.find("") is None
    assert all(len(a.digest) == 32 for a in accounts.accounts)  # only hashes are kept
    alice, bob, carol = (accounts.by_name(n) for n in ("alice", "bob", "carol"))
    for t in range(3):
        accounts.admit(alice, "nanoseek", 10, now=100.0 + t)
    with pytest.raises(APIError) as e:
        accounts.admit(alice, "nanoseek", 10, now=110.0)
    assert e.value.status == 429 and e.value.headers["Retry-After"] == "50"  # the first request leaves at 160
    accounts.admit(alice, "nanoseek", 10, now=160.5)  # the window rolled on
    with pytest.raises(APIError) as e:
        accounts.admit(bob, "other-model", 10, now=100.0)
    assert e.value.status == 403 and "may not use model 'other-model'" in e.value.message
    accounts.admit(carol, "nanoseek", 200, now=100.0)
    accounts.charge(carol, 150, 350, 0.0, now=101.0)  # 350 tokens in the window, limit 100
    with pytest.raises(APIError) as e:
        accounts.admit(carol, "nanoseek", 10, now=102.0)
    assert e.value.status == 429 and "100 tokens per minute (350 used)" in e.value.message
    assert e.value.headers["Retry-After"] == "59"  # until the completion's 150 tokens leave too (161 - 102)


def test_monthly_quota_survives_a_restart_through_the_ledger(tmp_path):
    keys = write_keys(tmp_path, '[[key]]\nname = "q"\nkey = "q-key"\nmonthly_tokens = 100\n')
    ledger = Ledger(tmp_path / "usage.sqlite3")
    ledger.record("r1", "q", "nanoseek", "/v1/chat/completions", 200,
                  {"prompt_tokens": 70, "prompt_cache_hit_tokens": 0, "prompt_cache_miss_tokens": 70,
                   "completion_tokens": 40}, started=0.0)
    ledger.record("r1", "q", "nanoseek", "/v1/chat/completions", 200, {"prompt_tokens": 70}, started=0.0)  # again
    assert ledger.totals()["q"]["total_tokens"] == 110 and ledger.totals()["q"]["requests"] == 1
    accounts = Accounts.load(keys)
    accounts.seed_month(ledger.month_totals())
    with pytest.raises(APIError) as e:
        accounts.admit(accounts.by_name("q"), "nanoseek", 1)
    assert e.value.status == 429 and e.value.code == "quota_exceeded" and int(e.value.headers["Retry-After"]) > 0


def test_a_cost_quota_stops_a_key_once_its_month_is_spent(tmp_path):
    accounts = Accounts.load(write_keys(tmp_path, '[[key]]\nname = "c"\nkey = "c-key"\nmonthly_cost = 0.01\n'))
    c = accounts.by_name("c")
    accounts.admit(c, "nanoseek", 5)
    accounts.charge(c, 100, 105, 0.006)
    accounts.admit(c, "nanoseek", 5)  # 0.006 of 0.01 spent: still allowed
    accounts.charge(c, 100, 105, 0.006)
    with pytest.raises(APIError) as e:
        accounts.admit(c, "nanoseek", 5)
    assert e.value.status == 429 and "0.01 USD" in e.value.message and e.value.code == "quota_exceeded"
    assert accounts.needs_prices() and accounts.needs_ledger()


def test_serve_refuses_quotas_without_a_ledger_and_cost_quotas_without_prices(chat_checkpoint, tmp_path):
    directory, _ = chat_checkpoint("deepseek_v3")
    keys = write_keys(tmp_path, '[[key]]\nname = "c"\nkey = "c-key"\nmonthly_cost = 1.0\n')
    base = [sys.executable, "-m", "nanoseek.cli", "serve", "--model", str(directory), "--api-keys", str(keys)]
    r = procs.run(base, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "need a ledger" in r.stderr
    r = procs.run(base + ["--ledger", str(tmp_path / "u.sqlite3")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "needs prices: add --cost-per-hour" in r.stderr
    r = procs.run(base + ["--api-key", "k"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not both" in r.stderr


def _ask(base, key, body=None, stream=False):
    """One request; (status, usage the client received or None, Retry-After)."""
    body = {"messages": MSG, "max_tokens": 20, "ignore_eos": True, "temperature": 1.0, **(body or {})}
    headers = {"Authorization": f"Bearer {key}"}
    if not stream:
        r = httpx.post(base + "/v1/chat/completions", json=body, headers=headers, timeout=120)
        return r.status_code, r.json().get("usage") if r.status_code == 200 else None, r.headers.get("retry-after")
    usage, status = None, None
    with httpx.stream("POST", base + "/v1/chat/completions", headers=headers, timeout=120,
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        status = r.status_code
        for line in r.iter_lines():
            if line.startswith("data: {") and '"usage"' in line:
                usage = json.loads(line[6:]).get("usage") or usage
    return status, usage, r.headers.get("retry-after")


def _sum(usages):
    return {f: sum(u[f] for u in usages) for f in USAGE_FIELDS}


def test_four_keys_get_429_exactly_at_their_limits_and_the_ledger_matches(chat_checkpoint, tmp_path):
    directory, _ = chat_checkpoint("deepseek_v3")
    accounts, ledger = Accounts.load(write_keys(tmp_path)), Ledger(tmp_path / "usage.sqlite3")
    config = ServeConfig(model_name="nanoseek", accounts=accounts, ledger=ledger)
    results = {}
    with live_server(directory, config) as (base, llm, app):
        def load(name, key, n):
            results[name] = [_ask(base, key, stream=i % 2 == 1) for i in range(n)]

        threads = [threading.Thread(target=load, args=a) for a in
                   (("alice", "alice-key", 6), ("bob", "bob-key", 8), ("carol", "carol-key", 8),
                    ("root", "root-key", 4))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert httpx.post(base + "/v1/chat/completions", json={"messages": MSG}).status_code == 401
        assert httpx.post(base + "/v1/chat/completions", json={"messages": MSG},
                          headers={"Authorization": "Bearer nope"}).status_code == 401
        mine = httpx.get(base + "/v1/usage", headers={"Authorization": "Bearer alice-key"}).json()
        everyone = httpx.get(base + "/v1/usage", headers={"Authorization": "Bearer root-key"}).json()
        bad = httpx.get(base + "/v1/usage?start=yesterday", headers={"Authorization": "Bearer root-key"})
    statuses = {name: [s for s, _, _ in r] for name, r in results.items()}
    assert all(s in (200, 429) for ss in statuses.values() for s in ss), statuses  # never a 5xx
    assert statuses["alice"] == [200] * 3 + [429] * 3
    assert statuses["bob"] == [200] * 5 + [429] * 3
    assert statuses["root"] == [200] * 4
    # carol: 100 tokens per minute; each request uses its prompt + 20 completion tokens. Admitted while the
    # window holds fewer than 300 (prompt tokens count at admission, completions when done).
    per_request = results["carol"][0][1]["prompt_tokens"] + 20
    allowed = -(-100 // per_request)
    assert statuses["carol"] == [200] * allowed + [429] * (8 - allowed)
    assert all(int(ra) >= 1 for r in results.values() for s, _, ra in r if s == 429)
    # The ledger holds exactly what the clients were told.
    for name, r in results.items():
        got = _sum([u for s, u, _ in r if s == 200])
        row = everyone["data"][[d["key_name"] for d in everyone["data"]].index(name)]
        assert {f: row[f] for f in USAGE_FIELDS} == got, name
        assert row["requests"] == statuses[name].count(200)
    assert [d["key_name"] for d in mine["data"]] == ["alice"] and mine["key"] == "alice"
    assert bad.status_code == 400 and "neither unix seconds nor an ISO date" in bad.json()["error"]["message"]


def _serve(directory, port, keys, db):
    return procs.spawn([sys.executable, "-m", "nanoseek.cli", "serve", "--model", str(directory), "--port", str(port),
                        "--kv-cache-memory", "64MiB", "--api-keys", str(keys), "--ledger", str(db),
                        "--served-model-name", "nanoseek"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _up(base):
    try:
        return httpx.get(base + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_the_ledger_survives_a_sigkill_mid_load(chat_checkpoint, tmp_path):
    """Answered requests are all in the ledger and none twice, across a SIGKILL and a restart under load; a
    request cut by the kill is either absent or, if its row was committed as its answer left, the one extra."""
    directory, _ = chat_checkpoint("deepseek_v3")
    keys = write_keys(tmp_path, KEYS.replace("requests_per_minute = 3", "requests_per_minute = 1000")
                      .replace("requests_per_minute = 5", "requests_per_minute = 1000")
                      .replace("tokens_per_minute = 100", "tokens_per_minute = 1000000"))
    db = tmp_path / "usage.sqlite3"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    answered, failed, stop = [], [], threading.Event()

    def client(key, stream):
        while not stop.is_set():
            try:
                status, usage, _ = _ask(base, key, {"max_tokens": 12}, stream=stream)
            except httpx.HTTPError:
                failed.append(key)
                stop.wait(0.2)
                continue
            if status == 200 and usage is not None:
                answered.append((key, usage))
            elif status == 200:
                failed.append(key)  # a stream cut before its usage chunk

    threads = [threading.Thread(target=client, args=(k, s)) for k, s in
               (("alice-key", False), ("bob-key", True), ("carol-key", False), ("root-key", True))]
    with _serve(directory, port, keys, db) as proc:
        assert wait_until(lambda: _up(base), timeout=60)
        for t in threads:
            t.start()
        assert wait_until(lambda: len(answered) >= 12, timeout=120)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    in_flight = len(failed)
    with _serve(directory, port, keys, db) as proc:
        assert wait_until(lambda: _up(base), timeout=60)
        count = len(answered)
        assert wait_until(lambda: len(answered) >= count + 12, timeout=120)
        stop.set()
        for t in threads:
            t.join(60)
        everyone = httpx.get(base + "/v1/usage", headers={"Authorization": "Bearer root-key"}).json()
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    cli = procs.run([sys.executable, "-m", "nanoseek.cli", "usage", str(db), "--json"], capture_output=True,
                    check=True, text=True)
    table = procs.run([sys.executable, "-m", "nanoseek.cli", "usage", str(db)], capture_output=True, check=True, text=True)
    by_key = json.loads(cli.stdout)["keys"]
    assert {d["key_name"]: {f: d[f] for f in USAGE_FIELDS} for d in everyone["data"]} == \
           {k: {f: v[f] for f in USAGE_FIELDS} for k, v in by_key.items()}
    names = {"alice-key": "alice", "bob-key": "bob", "carol-key": "carol", "root-key": "root"}
    received = {}
    for key, usage in answered:
        received.setdefault(names[key], []).append(usage)
    extra_requests = 0
    for name, usages in received.items():
        got, row = _sum(usages), by_key[name]
        extra = row["requests"] - len(usages)
        assert 0 <= extra, name  # nothing answered is missing
        extra_requests += extra
        if extra == 0:  # nothing counted twice: equal to the last token
            assert {f: row[f] for f in USAGE_FIELDS} == got, name
    assert extra_requests <= in_flight  # at most the requests the kill cut, never a duplicate
    assert "TOTAL" in table.stdout and "alice" in table.stdout
    print(f"answered {len(answered)}, cut by the kill {in_flight}, ledger extras {extra_requests}")


def test_usage_and_keys_commands(tmp_path):
    assert procs.run([sys.executable, "-m", "nanoseek.cli", "keys", "hash", "abc"], capture_output=True,
                     check=True, text=True).stdout.strip() == key_hash("abc")
    out = procs.run([sys.executable, "-m", "nanoseek.cli", "keys", "new"], capture_output=True, check=True, text=True).stdout
    key, digest = (line.split()[1] for line in out.strip().splitlines())
    assert key.startswith("sk-") and key_hash(key) == digest
    r = procs.run([sys.executable, "-m", "nanoseek.cli", "usage", str(tmp_path / "none.sqlite3")], capture_output=True,
                  text=True)
    assert r.returncode == 2 and "no ledger at" in r.stderr
