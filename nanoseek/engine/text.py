"""From generated token ids to text: incremental detokenization, stop strings, the <think> reasoning split.

Streaming must never show text it may take back: bytes of an unfinished UTF-8 character, the beginning of a
stop string, or half of a `</think>` tag are held back until the next tokens decide them.
"""

from __future__ import annotations

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class IncrementalDetokenizer:
    """Decodes one token at a time, emitting text only once it is final (vLLM's prefix/read offsets)."""

    def __init__(self, tokenizer, skip_ids: set[int]):
        self.tokenizer = tokenizer
        self.skip_ids = skip_ids
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""

    def _decode(self, ids) -> str:
        return self.tokenizer.decode([i for i in ids if i not in self.skip_ids])

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            new = full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self.text += new
            return new
        return ""

    def extend(self, token_ids: list[int]) -> str:
        """add() for several tokens with two decodes instead of two per token; the same text (one token at a
        time where the batch ends inside an unfinished character)."""
        if len(token_ids) == 1:
            return self.add(token_ids[0])
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:] + list(token_ids))
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.ids.extend(token_ids)
            new = full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self.text += new
            return new
        return "".join(self.add(t) for t in token_ids)

    def flush(self) -> str:
        """At the end, whatever is left (an incomplete character decodes to U+FFFD) becomes final."""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        new = full[len(prefix):]
        self.prefix_offset = self.read_offset = len(self.ids)
        self.text += new
        return new


def find_stop(text: str, stops: list[str], searched_up_to: int) -> tuple[int, str] | None:
    """Earliest stop string in `text` that ends after `searched_up_to` (text before it was already checked)."""
    best = None
    for stop in stops:
        i = text.find(stop, max(0, searched_up_to - len(stop) + 1))
        if i != -1 and (best is None or i < best[0]):
            best = (i, stop)
    return best


def partial_suffix_len(text: str, patterns: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some pattern: text to hold back."""
    longest = 0
    last = text[-1:]
    if not last:
        return 0
    for p in patterns:
        k = min(len(p) - 1, len(text))
        while k > longest:
            k = p.rfind(last, 0, k) + 1  # only prefixes ending in the text's last character can match
            if k <= longest:
                break
            if text.endswith(p[:k]):
                longest = k
                break
            k -= 1
    return longest


def starts_in_reasoning(prompt_tail: str) -> bool:
    """True when the prompt leaves a <think> block open (R1's template ends the prompt with `<think>\\n`)."""
    return prompt_tail.rfind(THINK_OPEN) > prompt_tail.rfind(THINK_CLOSE)


def split_reasoning(text: str, in_reasoning: bool, final: bool) -> tuple[str, str]:
    """Splits generated text into (reasoning, content): text inside <think>...</think> is reasoning.

    `in_reasoning` says whether generation began inside an open <think> (then no opening tag appears). Unless
    `final`, a trailing partial tag is held back from both parts.
    """
    reasoning, content = [], []
    rest = text
    while rest:
        tag = THINK_CLOSE if in_reasoning else THINK_OPEN
        i = rest.find(tag)
        if i == -1:
            hold = 0 if final else partial_suffix_len(rest, [tag])
            (reasoning if in_reasoning else content).append(rest[: len(rest) - hold])
            break
        (reasoning if in_reasoning else content).append(rest[:i])
        rest = rest[i + len(tag):]
        in_reasoning = not in_reasoning
    return "".join(reasoning), "".join(content)
