"""The usage ledger: one SQLite row per answered request (who, which model, cache-hit and miss prompt tokens,
completion and reasoning tokens, cost at the server's at-cost price, status, times).

SQLite in WAL mode: a row is committed before its answer (or a stream's usage chunk) leaves the server, so
a SIGKILL never loses what a client was told it used; rows are keyed by request id (INSERT OR IGNORE), so
nothing is counted twice. Writes run on one connection under a lock from worker threads, never on the event
loop. `totals` serves GET /v1/usage and `nanoseek usage DB`.
"""

from __future__ import annotations

import calendar
import sqlite3
import threading
import time
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    request_id TEXT PRIMARY KEY,
    key_name TEXT NOT NULL,
    model TEXT NOT NULL,
    route TEXT NOT NULL,
    status INTEGER NOT NULL,
    prompt_cache_hit_tokens INTEGER NOT NULL,
    prompt_cache_miss_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    reasoning_tokens INTEGER NOT NULL,
    cost REAL NOT NULL,
    started REAL NOT NULL,
    finished REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_by_key_time ON usage (key_name, finished);
"""
COLUMNS = ("requests", "prompt_tokens", "prompt_cache_hit_tokens", "prompt_cache_miss_tokens", "completion_tokens",
           "reasoning_tokens", "total_tokens", "cost")


class Ledger:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across a process crash
        self.db.executescript(SCHEMA)

    def record(self, request_id: str, key_name: str, model: str, route: str, status: int, usage: dict,
               started: float, finished: float | None = None) -> None:
        hit = usage.get("prompt_cache_hit_tokens", 0)
        miss = usage.get("prompt_cache_miss_tokens", usage.get("prompt_tokens", 0) - hit)
        reasoning = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens", 0)
        row = (request_id, key_name, model, route, status, hit, miss, usage.get("completion_tokens", 0), reasoning,
               float(usage.get("cost", 0.0)), started, finished or time.time())
        with self.lock:
            self.db.execute("INSERT OR IGNORE INTO usage VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", row)

    def totals(self, start: float | None = None, end: float | None = None, key_name: str | None = None,
               status: int = 200) -> dict[str, dict]:
        """Per key name: requests, prompt (hit/miss), completion, reasoning and total tokens, cost."""
        where, args = ["status = ?"], [status]
        if start is not None:
            where.append("finished >= ?")
            args.append(start)
        if end is not None:
            where.append("finished < ?")
            args.append(end)
        if key_name is not None:
            where.append("key_name = ?")
            args.append(key_name)
        query = ("SELECT key_name, COUNT(*), SUM(prompt_cache_hit_tokens + prompt_cache_miss_tokens), "
                 "SUM(prompt_cache_hit_tokens), SUM(prompt_cache_miss_tokens), SUM(completion_tokens), "
                 "SUM(reasoning_tokens), SUM(prompt_cache_hit_tokens + prompt_cache_miss_tokens + completion_tokens), "
                 f"SUM(cost) FROM usage WHERE {' AND '.join(where)} GROUP BY key_name ORDER BY key_name")
        with self.lock:
            rows = self.db.execute(query, args).fetchall()
        return {r[0]: dict(zip(COLUMNS, (int(x) if i < 7 else round(float(x), 10) for i, x in enumerate(r[1:]))))
                for r in rows}

    def month_totals(self, now: float | None = None) -> dict[str, tuple[int, float]]:
        """This calendar month's (UTC) total tokens and cost per key: what quotas start from after a restart."""
        g = time.gmtime(now or time.time())
        start = calendar.timegm((g.tm_year, g.tm_mon, 1, 0, 0, 0))
        return {k: (v["total_tokens"], v["cost"]) for k, v in self.totals(start=start).items()}

    def close(self) -> None:
        with self.lock:
            self.db.close()


def empty_totals() -> dict:
    return {c: 0 for c in COLUMNS}
