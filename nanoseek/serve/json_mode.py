"""JSON mode: a logits processor that only admits tokens keeping the output a valid JSON-object prefix.

`JsonPrefix` is a small pushdown recognizer for JSON (RFC 8259) fed one character at a time; it rejects the
first character that cannot continue a valid document. The processor tries candidate tokens in order of
decreasing logit and keeps the first `keep` whose text is a valid continuation (scanning further only when the
top ones all fail); end-of-sequence is allowed only once the top-level object is closed, and is then the only
choice. So the output always parses, unless it stops for length.
"""

from __future__ import annotations

import torch

_WS = " \t\n\r"
_HEX = "0123456789abcdefABCDEF"


class JsonPrefix:
    """States: stack of containers ('{' or '['); `mode` says what the next character may be."""

    __slots__ = ("stack", "mode", "literal", "number", "escape", "unicode", "done", "started")

    def __init__(self):
        self.stack: list[str] = []
        self.mode = "value"  # value | string | key | after_key | after_value | number | literal | key_or_end
        self.literal = ""  # remaining characters of true/false/null
        self.number = ""  # number text so far
        self.escape = False
        self.unicode = 0  # hex digits still expected after \u
        self.done = False
        self.started = False

    def copy(self) -> "JsonPrefix":
        c = JsonPrefix.__new__(JsonPrefix)
        c.stack, c.mode, c.literal, c.number = list(self.stack), self.mode, self.literal, self.number
        c.escape, c.unicode, c.done, c.started = self.escape, self.unicode, self.done, self.started
        return c

    # ---- numbers: validity of a prefix and of a complete number ----
    @staticmethod
    def _number_prefix_ok(s: str) -> bool:
        i, n = 0, len(s)
        if i < n and s[i] == "-":
            i += 1
        if i == n:
            return True
        if s[i] == "0":
            i += 1
        elif s[i].isdigit():
            while i < n and s[i].isdigit():
                i += 1
        else:
            return False
        if i < n and s[i] == ".":
            i += 1
            if i == n:
                return True
            if not s[i].isdigit():
                return False
            while i < n and s[i].isdigit():
                i += 1
        if i < n and s[i] in "eE":
            i += 1
            if i < n and s[i] in "+-":
                i += 1
            if i == n:
                return True
            if not s[i].isdigit():
                return False
            while i < n and s[i].isdigit():
                i += 1
        return i == n

    @staticmethod
    def _number_complete(s: str) -> bool:
        return bool(s) and s[-1].isdigit() and JsonPrefix._number_prefix_ok(s)

    def _close_value(self) -> None:
        self.mode = "after_value"
        if not self.stack:
            self.done = True

    def feed(self, ch: str) -> bool:
        """Whether `ch` keeps the text a prefix of a JSON object (and takes it if so)."""
        if self.done:
            return ch in _WS
        m = self.mode
        if m in ("string", "key"):
            return self._feed_string(ch, m)
        if m == "number":
            return self._feed_number(ch)
        if m == "literal":
            return self._feed_literal(ch)
        if ch in _WS:  # whitespace is free between tokens
            return True
        if m in ("value", "first_value"):
            return self._feed_value(ch, m)
        return self._feed_structure(ch, m)

    def _feed_string(self, ch: str, m: str) -> bool:
        if self.unicode:
            if ch not in _HEX:
                return False
            self.unicode -= 1
            return True
        if self.escape:
            if ch == "u":
                self.unicode = 4
            elif ch not in '"\\/bfnrt':
                return False
            self.escape = False
            return True
        if ch == "\\":
            self.escape = True
            return True
        if ch == '"':
            if m == "key":
                self.mode = "after_key"
            else:
                self._close_value()
            return True
        return ord(ch) >= 0x20

    def _feed_number(self, ch: str) -> bool:
        if self._number_prefix_ok(self.number + ch):
            self.number += ch
            return True
        if not self._number_complete(self.number):
            return False
        self.number = ""
        self._close_value()
        return self.feed(ch)

    def _feed_literal(self, ch: str) -> bool:
        if ch != self.literal[0]:
            return False
        self.literal = self.literal[1:]
        if not self.literal:
            self._close_value()
        return True

    def _feed_value(self, ch: str, m: str) -> bool:
        if not self.started:
            self.started = True
            if ch != "{":  # json_object mode: the document is an object
                return False
        if ch in "{[":
            self.stack.append(ch)
            self.mode = "key_or_end" if ch == "{" else "first_value"
            return True
        if ch == "]" and m == "first_value":
            self.stack.pop()
            self._close_value()
            return True
        if ch == '"':
            self.mode = "string"
            return True
        if ch in "-0123456789":
            self.mode, self.number = "number", ch
            return True
        for word in ("true", "false", "null"):
            if ch == word[0]:
                self.mode, self.literal = "literal", word[1:]
                return True
        return False

    def _feed_structure(self, ch: str, m: str) -> bool:
        """Between tokens: a key, a colon, a comma or a closing bracket."""
        if m == "key_or_end" and ch == "}":
            self.stack.pop()
            self._close_value()
            return True
        if m in ("key_or_end", "key_expected"):
            if ch == '"':
                self.mode = "key"
                return True
            return False
        if m == "after_key":
            if ch == ":":
                self.mode = "value"
                return True
            return False
        if m == "after_value":
            top = self.stack[-1] if self.stack else None
            if ch == "," and top is not None:
                self.mode = "key_expected" if top == "{" else "value"
                return True
            if (ch == "}" and top == "{") or (ch == "]" and top == "["):
                self.stack.pop()
                self._close_value()
                return True
        return False

    def feed_text(self, text: str) -> bool:
        return all(self.feed(ch) for ch in text)


class JsonObjectProcessor:
    """Per-request logits processor for response_format {"type": "json_object"}."""

    def __init__(self, tokenizer, eos_ids: set[int], keep: int = 8, scan_limit: int = 4096):
        self.tokenizer = tokenizer
        self.eos_ids = set(eos_ids)
        self.keep = keep
        self.scan_limit = scan_limit
        self.state = JsonPrefix()
        self.consumed = 0  # generated tokens already fed to `state`

    def _text(self, token_id: int) -> str:
        return self.tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        for token in output_ids[self.consumed:]:
            self.state.feed_text(self._text(token))
        self.consumed = len(output_ids)
        allowed = []
        if self.state.done:
            allowed = list(self.eos_ids)
        else:
            order = torch.argsort(logits, descending=True)
            for token in order[: self.scan_limit].tolist():
                if token in self.eos_ids:
                    continue
                text = self._text(token)
                if text and "\ufffd" not in text and self.state.copy().feed_text(text):
                    allowed.append(token)
                    if len(allowed) >= self.keep:
                        break
        if not allowed:  # nothing valid in reach: end rather than emit invalid JSON
            allowed = list(self.eos_ids)
        masked = torch.full_like(logits, float("-inf"))
        masked[allowed] = logits[allowed]
        return masked
