"""The operator's policy layer: explicit, auditable moderation that lives in the server, never in the weights.

Off by default. A policy is a TOML file:

    name = "house-rules"
    system_prompt = "You are a helpful assistant."   # put before every chat's own system message
    allowed_models = ["nanoseek"]                      # other model names get a 404
    max_prompt_tokens = 2048
    max_tokens = 512
    audit_log = "audit.jsonl"
    log_prompts = false                                # audit entries carry no prompt text unless true
    holdback_chars = 64                                # at least this much streamed text held back (see below)

    [[input]]
    name = "no-credentials"
    pattern = "(?i)password\\s*[:=]"

    [[output]]
    name = "no-internal-hosts"
    pattern = "\\binternal\\.example\\.com\\b"

The policy's system prompt comes first; a client's own system messages follow it in the same system message
(chat templates keep one), separated by a blank line, so nothing the client sent is dropped. Each chat the
policy changed this way carries the header `<policy>/system_prompt` and one audit entry (action `prepended`,
or `merged` when the client sent a system message of its own).

Patterns are RE2 regular expressions (google-re2): matching takes time linear in the text whatever the pattern,
so an operator's `(a+)+$` cannot stall the server; constructs RE2 cannot run that way (lookaround,
backreferences) are refused when the policy loads. An input rule that fires answers at once with finish_reason
`content_filter`; an output rule cuts the answer before the match inside the engine (the engine's output filter
hook: the sequence stops there and frees its cache), so blocked text never reaches a client
(streamed text is held back until it can no longer become part of a match: by `holdback_chars`, or by the
longest text an output rule can match where that is longer). An output rule must therefore match text of
bounded length (`\\w{1,40}`, not `\\w+`); a lookahead reaching past the match is not held back for, so put
such context inside the match.
Responses carry the header `X-Nanoseek-Policy: <policy>/<rule>` where headers are still unsent, and every
intervention is appended to the audit log as one JSON line (time, request id, rule, action).
"""

from __future__ import annotations

import json
import re._parser as re_parser  # the stdlib's regex parser, for one question: the widest text a pattern can match
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import re2

from ..errors import ConfigError


@dataclass
class Rule:
    name: str
    pattern: "re2._Regexp"
    widest: int | None = None  # the most characters a match can span (None: unbounded)


def widest_match(pattern: str) -> int | None:
    """The most characters `pattern` can match, or None where a repeat is unbounded (or Python cannot parse it)."""
    try:
        widest = re_parser.parse(pattern).getwidth()[1]
    except Exception:  # RE2 syntax Python's parser lacks: treat as unbounded
        return None
    return None if widest >= re_parser.MAXREPEAT else widest


# Not a pattern rule: names the system-prompt intervention in headers and the audit log.
SYSTEM_PROMPT = Rule("system_prompt", None, 0)


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
                name = r.get("name", f"{kind}-{i + 1}")
                try:
                    out.append(Rule(name, re2.compile(r["pattern"]), widest_match(r["pattern"])))
                except re2.error as e:
                    raise ConfigError(f"policy {path}: rule {name} pattern is not valid RE2 ({e}): lookaround and "
                                      "backreferences are refused, they cannot run in linear time") from None
                if any(o.name == name for o in out[:-1]):
                    raise ConfigError(f"policy {path}: two [[{kind}]] rules are named {name}: give each its own name "
                                      "(headers and the audit log name the rule that fired)")
                if kind == "output" and out[-1].widest is None:
                    raise ConfigError(f"policy {path}: output rule {name} can match text of any length, so no "
                                      "hold-back keeps it from streaming: bound its repeats (e.g. \\w{1,40} for \\w+)")
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

    def check_output(self, text: str, searched: int = 0) -> tuple[Rule, int] | None:
        """The first output rule matching `text`, with the index where its match starts. Text before `searched`
        was checked already: a new match must end past it, so it starts at most `widest` characters earlier
        (each step searches the held-back tail, not the whole answer again)."""
        best = None
        for r in self.output_rules:
            m = r.pattern.search(text, max(0, searched - r.widest))
            if m and (best is None or m.start() < best[1]):
                best = (r, m.start())
        return best

    @property
    def holdback(self) -> int:
        """Characters of streamed text held back: enough for the longest text an output rule can match."""
        return max([self.holdback_chars] + [r.widest for r in self.output_rules])

    def output_filter(self) -> "OutputRules | None":
        """The engine's output filter (engine.OutputFilter) for these output rules; None without any."""
        return OutputRules(self) if self.output_rules else None

    def output_rule(self, name: str) -> Rule:
        return next(r for r in self.output_rules if r.name == name)

    def with_system_prompt(self, messages: list[dict], request_id: str) -> list[dict]:
        """`messages` with the policy's system prompt first and the client's system messages merged after it,
        audited. Unchanged without a policy system prompt."""
        if not self.system_prompt:
            return messages
        own = [m["content"] for m in messages if m["role"] == "system"]
        system = "\n\n".join([self.system_prompt, *own])
        self.audit(request_id, SYSTEM_PROMPT, "merged" if own else "prepended", "input",
                   system if own else None)
        return [{"role": "system", "content": system}] + [m for m in messages if m["role"] != "system"]

    def header(self, *rules: Rule) -> str:
        """The X-Nanoseek-Policy value naming every intervention on one request."""
        return ", ".join(f"{self.name}/{rule.name}" for rule in rules)

    def audit(self, request_id: str, rule: Rule, action: str, stage: str, text: str | None = None) -> None:
        if self.audit_log is None:
            return
        entry = {"time": time.time(), "request_id": request_id, "policy": self.name, "rule": rule.name,
                 "stage": stage, "action": action}
        if self.log_prompts and text is not None:
            entry["text"] = text
        with self._lock, self.audit_log.open("a") as f:
            f.write(json.dumps(entry) + "\n")


class OutputRules:
    """A policy's output rules as the engine's output filter: the engine cuts the text at a match, finishes the
    sequence (finish_reason content_filter, stop_reason the rule's name) and holds back `holdback` characters of
    unfinished text, so blocked text never leaves the engine."""

    def __init__(self, policy: Policy):
        self.policy, self.holdback = policy, policy.holdback

    def find(self, text: str, searched: int) -> tuple[str, int] | None:
        hit = self.policy.check_output(text, searched)
        return (hit[0].name, hit[1]) if hit else None
