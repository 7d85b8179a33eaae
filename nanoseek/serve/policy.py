"""The operator's policy layer: explicit, auditable moderation that lives in the server, never in the weights.

Off by default. A policy is a TOML file:

    name = "house-rules"
    system_prompt = "You are a helpful assistant."   # prepended to every chat
    allowed_models = ["nanoseek"]                      # other model names get a 404
    max_prompt_tokens = 2048
    max_tokens = 512
    audit_log = "audit.jsonl"
    log_prompts = false                                # audit entries carry no prompt text unless true
    holdback_chars = 64                                # streamed text held back while output rules may match

    [[input]]
    name = "no-credentials"
    pattern = "(?i)password\\s*[:=]"

    [[output]]
    name = "no-internal-hosts"
    pattern = "\\binternal\\.example\\.com\\b"

Patterns are Python regular expressions. An input rule that fires answers at once with finish_reason
`content_filter`; an output rule cuts the answer before the match, so blocked text never reaches a client
(streamed text is held back `holdback_chars` characters until it can no longer become part of a match).
Responses carry the header `X-Nanoseek-Policy: <policy>/<rule>` where headers are still unsent, and every
intervention is appended to the audit log as one JSON line (time, request id, rule, action).
"""

from __future__ import annotations

import json
import re
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError


@dataclass
class Rule:
    name: str
    pattern: re.Pattern


@dataclass
class Policy:
    name: str = "policy"
    system_prompt: str | None = None
    allowed_models: list[str] = field(default_factory=list)
    max_prompt_tokens: int | None = None
    max_tokens: int | None = None
    audit_log: Path | None = None
    log_prompts: bool = False
    holdback_chars: int = 64
    input_rules: list[Rule] = field(default_factory=list)
    output_rules: list[Rule] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def from_file(cls, path: str | Path) -> "Policy":
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"policy file {path} does not exist")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"policy {path} is not valid TOML: {e}") from None

        def rules(kind):
            out = []
            for i, r in enumerate(data.get(kind, [])):
                if "pattern" not in r:
                    raise ConfigError(f"policy {path}: [[{kind}]] rule {i + 1} has no pattern")
                try:
                    out.append(Rule(r.get("name", f"{kind}-{i + 1}"), re.compile(r["pattern"])))
                except re.error as e:
                    raise ConfigError(f"policy {path}: rule {r.get('name', i + 1)} pattern is invalid ({e})") from None
            return out

        audit = data.get("audit_log")
        if audit and not Path(audit).is_absolute():
            audit = path.parent / audit
        return cls(name=data.get("name", path.stem), system_prompt=data.get("system_prompt"),
                   allowed_models=list(data.get("allowed_models", [])),
                   max_prompt_tokens=data.get("max_prompt_tokens"), max_tokens=data.get("max_tokens"),
                   audit_log=Path(audit) if audit else None, log_prompts=bool(data.get("log_prompts", False)),
                   holdback_chars=int(data.get("holdback_chars", 64)), input_rules=rules("input"),
                   output_rules=rules("output"))

    def check_input(self, text: str) -> Rule | None:
        return next((r for r in self.input_rules if r.pattern.search(text)), None)

    def check_output(self, text: str) -> tuple[Rule, int] | None:
        """The first output rule matching `text`, with the index where its match starts."""
        best = None
        for r in self.output_rules:
            m = r.pattern.search(text)
            if m and (best is None or m.start() < best[1]):
                best = (r, m.start())
        return best

    def visible(self, text: str, final: bool) -> str:
        """Text safe to stream now: without output rules, all of it; otherwise all but the last holdback_chars."""
        if final or not self.output_rules:
            return text
        return text[: max(0, len(text) - self.holdback_chars)]

    def header(self, rule: Rule) -> str:
        return f"{self.name}/{rule.name}"

    def audit(self, request_id: str, rule: Rule, action: str, stage: str, text: str | None = None) -> None:
        if self.audit_log is None:
            return
        entry = {"time": time.time(), "request_id": request_id, "policy": self.name, "rule": rule.name,
                 "stage": stage, "action": action}
        if self.log_prompts and text is not None:
            entry["text"] = text
        with self._lock, self.audit_log.open("a") as f:
            f.write(json.dumps(entry) + "\n")
