"""Verifiers: does a completion's final answer match the reference?

A completion's answer is the text after its last `</think>` (the whole text when there is none). A reference
answer that cannot be parsed never earns credit: a broken dataset row must not look like a solved problem.
"""

from __future__ import annotations

import re
from fractions import Fraction

from ..engine.text import THINK_CLOSE

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")
VERIFIERS = ("exact", "numeric", "math", "countdown")


def final_answer_text(completion: str) -> str:
    return completion.rsplit(THINK_CLOSE, 1)[-1].strip()


def parse_number(text: str) -> Fraction | None:
    """The last number in `text` (commas as thousands separators, decimals and a/b fractions allowed)."""
    found = _NUMBER.findall(text or "")
    if not found:
        return None
    token = found[-1].replace(",", "")
    try:
        return Fraction(token)
    except (ValueError, ZeroDivisionError):
        return None


def _numeric(completion: str, reference: str) -> bool:
    ref = parse_number(reference)
    if ref is None:
        return False
    got = parse_number(final_answer_text(completion))
    return got is not None and got == ref


def _exact(completion: str, reference: str) -> bool:
    ref = " ".join(reference.split()).strip().lower()
    return bool(ref) and " ".join(final_answer_text(completion).split()).strip().lower() == ref


def _math(completion: str, reference: str) -> bool:
    try:
        from math_verify import parse, verify
    except ImportError:  # math-verify not installed: numbers still compare exactly
        return _numeric(completion, reference)
    gold = parse(reference)
    if not gold:
        return False
    answer = parse(final_answer_text(completion))
    return bool(answer) and bool(verify(gold, answer))


_STEP = re.compile(r"(-?\d+)\s*([+\-*])\s*(-?\d+)\s*=\s*(-?\d+)")


def _countdown(completion: str, reference: str, question: str = "") -> bool:
    """Valid iff the answer's steps each compute correctly, use only available numbers (each once; results of
    earlier steps become available) and the last step reaches the target."""
    nums = [int(x) for x in re.findall(r"\d+", question.split("make")[0])] if question else []
    target_m = re.search(r"make (\d+)", question)
    if not nums or not target_m:
        return False
    target = int(target_m.group(1))
    steps = _STEP.findall(final_answer_text(completion))
    if not steps:
        return False
    pool = list(nums)
    value = None
    for x, op, y, z in steps:
        x, y, z = int(x), int(y), int(z)
        for v in (x, y):
            if v not in pool:
                return False
            pool.remove(v)
        value = x + y if op == "+" else x - y if op == "-" else x * y
        if value != z:
            return False
        pool.append(z)
    return value == target


def verify(completion: str, reference: str, verifier: str = "numeric", question: str = "") -> bool:
    if verifier == "numeric":
        return _numeric(completion, reference)
    if verifier == "exact":
        return _exact(completion, reference)
    if verifier == "math":
        return _math(completion, reference)
    if verifier == "countdown":
        return _countdown(completion, reference, question)
    raise ValueError(f"unknown verifier {verifier!r}: use one of {', '.join(VERIFIERS)}")
