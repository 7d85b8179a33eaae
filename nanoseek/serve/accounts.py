"""Many users: API keys from a TOML file, each with its own limits, checked before a request reaches the engine.

    # keys.toml (one [[key]] table per key)
    [[key]]
    name = "alice"
    key_sha256 = "9f86d0..."        # sha256 of the key (`nanoseek keys hash KEY`); or key = "sk-..." in clear
    models = ["nanoseek"]           # optional: the models this key may use
    requests_per_minute = 60        # optional limits, per rolling 60 s
    tokens_per_minute = 20000       # prompt + completion tokens
    monthly_tokens = 5000000        # optional quotas per calendar month (UTC), read back from the ledger
    monthly_cost = 10.0             # USD at the server's at-cost prices (needs --cost-per-hour)
    admin = true                    # sees everyone's usage in GET /v1/usage

Only hashes are kept in memory. A presented key is hashed and compared with every entry in constant time
(hmac.compare_digest, no early exit), so response time says nothing about which key or how much of one matched.
Over a limit: 429 with `Retry-After` (seconds until the window frees enough) in DeepSeek's error shape. Windows
are rolling: requests and tokens of the last 60 s; a request's prompt tokens count when it is admitted, its
completion tokens when it finishes (what it really used), so a key overshoots its token limit by at most the
completions of the requests it has in flight (one, for a client that waits for each answer).
"""

from __future__ import annotations

import calendar
import collections
import hashlib
import hmac
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from .errors import APIError

WINDOW = 60.0
KNOWN_FIELDS = {"name", "key", "key_sha256", "models", "requests_per_minute", "tokens_per_minute", "monthly_tokens",
                "monthly_cost", "admin"}


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass
class Account:
    name: str
    digest: bytes  # sha256 of the key
    models: list[str] | None = None
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    monthly_tokens: int | None = None
    monthly_cost: float | None = None
    admin: bool = False
    # Rolling windows: request start times; (finish time, tokens) of finished requests.
    requests: collections.deque = field(default_factory=collections.deque, repr=False)
    tokens: collections.deque = field(default_factory=collections.deque, repr=False)
    month: str = ""
    month_tokens: int = 0
    month_cost: float = 0.0


def month_of(t: float) -> str:
    return time.strftime("%Y-%m", time.gmtime(t))


def seconds_to_next_month(t: float) -> int:
    g = time.gmtime(t)
    year, month = (g.tm_year + 1, 1) if g.tm_mon == 12 else (g.tm_year, g.tm_mon + 1)
    return max(1, int(calendar.timegm((year, month, 1, 0, 0, 0)) - t))


class Accounts:
    """The keys file: who a bearer token is, and whether that account may start one more request now."""

    def __init__(self, accounts: list[Account]):
        self.accounts = accounts
        self.lock = threading.Lock()

    @classmethod
    def single(cls, key: str) -> "Accounts":
        """`--api-key`: one admin account named "default", no limits."""
        return cls([Account("default", bytes.fromhex(key_hash(key)), admin=True)])

    @classmethod
    def load(cls, path: str | Path) -> "Accounts":
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"API keys file {path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"API keys file {path} is not valid TOML: {e}") from None
        entries = data.get("key")
        if not isinstance(entries, list) or not entries:
            raise ConfigError(f"API keys file {path} has no [[key]] tables: add one per key (name, key_sha256)")
        accounts, names, digests = [], set(), set()
        for i, entry in enumerate(entries):
            where = f"{path} [[key]] #{i + 1}"
            unknown = set(entry) - KNOWN_FIELDS
            if unknown:
                raise ConfigError(f"{where}: unknown field(s) {', '.join(sorted(unknown))} (known: "
                                  f"{', '.join(sorted(KNOWN_FIELDS))})")
            name = entry.get("name")
            if not isinstance(name, str) or not name:
                raise ConfigError(f"{where}: needs a name")
            if name in names:
                raise ConfigError(f"{where}: name {name!r} is used twice")
            if ("key" in entry) == ("key_sha256" in entry):
                raise ConfigError(f"{where} ({name}): give exactly one of key or key_sha256")
            digest = key_hash(entry["key"]) if "key" in entry else str(entry["key_sha256"]).lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ConfigError(f"{where} ({name}): key_sha256 must be 64 hex digits (nanoseek keys hash KEY)")
            if digest in digests:
                raise ConfigError(f"{where} ({name}): the same key appears twice")
            for limit in ("requests_per_minute", "tokens_per_minute", "monthly_tokens"):
                value = entry.get(limit)
                if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                    raise ConfigError(f"{where} ({name}): {limit} must be a positive integer")
            cost = entry.get("monthly_cost")
            if cost is not None and (not isinstance(cost, (int, float)) or isinstance(cost, bool) or cost <= 0):
                raise ConfigError(f"{where} ({name}): monthly_cost must be a positive number (USD)")
            models = entry.get("models")
            if models is not None and (not isinstance(models, list) or not all(isinstance(m, str) for m in models)):
                raise ConfigError(f"{where} ({name}): models must be a list of model names")
            names.add(name)
            digests.add(digest)
            accounts.append(Account(name, bytes.fromhex(digest), models, entry.get("requests_per_minute"),
                                    entry.get("tokens_per_minute"), entry.get("monthly_tokens"), cost,
                                    bool(entry.get("admin", False))))
        return cls(accounts)

    def needs_prices(self) -> bool:
        return any(a.monthly_cost is not None for a in self.accounts)

    def needs_ledger(self) -> bool:
        return any(a.monthly_tokens is not None or a.monthly_cost is not None for a in self.accounts)

    def find(self, token: str) -> Account | None:
        """The account whose key this is, compared against every entry in constant time."""
        presented = hashlib.sha256(token.encode()).digest()
        found = None
        for account in self.accounts:
            if hmac.compare_digest(presented, account.digest):
                found = account
        return found

    def by_name(self, name: str) -> Account | None:
        return next((a for a in self.accounts if a.name == name), None)

    def seed_month(self, totals: dict[str, tuple[int, float]], now: float | None = None) -> None:
        """This month's usage per account name, from the ledger at startup (quotas survive restarts)."""
        month = month_of(now or time.time())
        for account in self.accounts:
            tokens, cost = totals.get(account.name, (0, 0.0))
            account.month, account.month_tokens, account.month_cost = month, tokens, cost

    # ---- limits ----
    def admit(self, account: Account, model: str, prompt_tokens: int, now: float | None = None) -> None:
        """Counts one request and its prompt tokens against `account`, or raises the 403/429 that says why it may
        not start. (Its completion tokens are counted when it finishes: `charge`.)"""
        now = time.monotonic() if now is None else now
        if account.models is not None and model not in account.models:
            raise APIError(403, f"this API key may not use model '{model}' (allowed: {', '.join(account.models)})",
                           "permission_error", "model_not_allowed")
        with self.lock:
            self._expire(account, now)
            self._check_month(account)
            if account.requests_per_minute is not None and len(account.requests) >= account.requests_per_minute:
                wait = account.requests[0] + WINDOW - now
                raise self._limited(f"rate limit reached for '{account.name}': {account.requests_per_minute} "
                                    "requests per minute", wait)
            if account.tokens_per_minute is not None:
                used = sum(t for _, t in account.tokens)
                if used >= account.tokens_per_minute:
                    wait, freed = WINDOW, 0
                    for when, t in account.tokens:  # until enough finished tokens leave the window
                        freed += t
                        if used - freed < account.tokens_per_minute:
                            wait = when + WINDOW - now
                            break
                    raise self._limited(f"rate limit reached for '{account.name}': {account.tokens_per_minute} "
                                        f"tokens per minute ({used} used)", wait)
            account.requests.append(now)
            account.tokens.append((now, prompt_tokens))

    def charge(self, account: Account, completion_tokens: int, total_tokens: int, cost: float,
               now: float | None = None) -> None:
        """A finished request: its completion tokens join the rolling window, its total and cost the month."""
        now = time.monotonic() if now is None else now
        with self.lock:
            account.tokens.append((now, completion_tokens))
            month = month_of(time.time())
            if account.month != month:
                account.month, account.month_tokens, account.month_cost = month, 0, 0.0
            account.month_tokens += total_tokens
            account.month_cost += cost

    @staticmethod
    def _expire(account: Account, now: float) -> None:
        while account.requests and account.requests[0] <= now - WINDOW:
            account.requests.popleft()
        while account.tokens and account.tokens[0][0] <= now - WINDOW:
            account.tokens.popleft()

    def _check_month(self, account: Account) -> None:
        wall = time.time()
        if account.month != month_of(wall):
            account.month, account.month_tokens, account.month_cost = month_of(wall), 0, 0.0
        if account.monthly_tokens is not None and account.month_tokens >= account.monthly_tokens:
            raise self._limited(f"monthly quota reached for '{account.name}': {account.monthly_tokens} tokens",
                                seconds_to_next_month(wall), "quota_exceeded")
        if account.monthly_cost is not None and account.month_cost >= account.monthly_cost:
            raise self._limited(f"monthly quota reached for '{account.name}': {account.monthly_cost} USD",
                                seconds_to_next_month(wall), "quota_exceeded")

    @staticmethod
    def _limited(message: str, wait: float, code: str = "rate_limit_exceeded") -> APIError:
        seconds = max(1, int(wait + 0.999))
        return APIError(429, f"{message}: retry after {seconds} s", "rate_limit_error", code,
                        {"Retry-After": str(seconds)})
