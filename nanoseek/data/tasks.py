"""Synthetic, verifiable task families with worked step-by-step solutions.

The default family is multi-digit `arithmetic` (addition and subtraction, column by column with carries and
borrows). Why it teaches reasoning well at this scale (docs/LOG.md has the longer argument):
  * the answer is checked exactly, so rewards are never noisy;
  * difficulty is one dial (the number of digits) and the worked solution grows linearly with it;
  * the solution is a real algorithm: each column depends on the carry from the previous one, so skipping the
    reasoning fails (a small model does not extrapolate it to longer numbers by itself, though: docs/LOG.md);
  * a few-million-parameter model learns it within minutes on a CPU.
Other families: `carries` (the same sums at a fixed 3 digits, difficulty = number of carries: the R1 protocol's
family, where harder means deeper rather than longer), `products` (multiplication by a two-digit number in partial
products, difficulty = carries of their sum), `linear` (solve a*x + b = c) and
`countdown` (reach a target with + - * from given numbers), for variety and for RL on problems whose worked
solutions are never shown.

Every problem is generated deterministically from (family, level, seed, index). Held-out problems are those
whose identity hashes into the held-out bucket; training generators skip them, so they can never overlap.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import asdict, dataclass

HELD_OUT_BUCKETS = 10  # 1 in 10 problem identities is reserved for evaluation


@dataclass(frozen=True)
class Problem:
    task: str
    level: int
    question: str
    answer: str
    solution: str  # worked reasoning, without the final answer line
    verifier: str = "exact"
    key: str = ""  # identity deciding the train/test split (never shown to the model)

    def as_dict(self) -> dict:
        return asdict(self)


def problem_key(task: str, question_core: str) -> str:
    return f"{task}:{question_core}"


def is_held_out(key: str) -> bool:
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % HELD_OUT_BUCKETS == 0


# ------------------------------------------------------------------ arithmetic
# The expression appears exactly as the scratchpad writes it ("347+589"): starting the reasoning is then a
# verbatim copy, which small models do reliably, instead of a reformatting ("347 + 589" -> "347+589",
# "subtract b from a" -> "a-b"), which measurably was their most frequent error (docs/LOG.md).
TEMPLATES = ["What is {e}?", "Compute {e}.", "Calculate {e}.", "{e} = ?"]


def _digits(rng: random.Random, n: int) -> int:
    return rng.randint(10 ** (n - 1) if n > 1 else 0, 10 ** n - 1)


def addition_steps(a: int, b: int) -> list[str]:
    """One line per column from the right. Each line restates what is left of both numbers (so the digits to
    add are the last ones just written), the column sum, and the result so far (the new digit in front of the
    previous line's), e.g. for 347+589:
        347+589: 7+9=16, carry 1, so far 6
        34+58+1: 4+8+1=13, carry 1, so far 36
        3+5+1: 3+5+1=9, so far 936
    Every step only looks one line back: a small transformer need not count digit positions."""
    xs, ys = str(a), str(b)
    carry, so_far, lines = 0, "", []
    while xs or ys or carry:
        left = f"{xs or 0}+{ys or 0}" + (f"+{carry}" if carry else "")
        x, y = int(xs[-1]) if xs else 0, int(ys[-1]) if ys else 0
        total = x + y + carry
        carry = total // 10
        so_far = str(total % 10) + so_far
        expr = f"{x}+{y}" + (f"+{left.rsplit('+', 1)[1]}" if left.count("+") == 2 else "")
        lines.append(f"{left}: {expr}={total}" + (f", carry {carry}" if carry else "") + f", so far {so_far}")
        xs, ys = xs[:-1], ys[:-1]
    return lines


def subtraction_steps(a: int, b: int) -> list[str]:
    """a >= b, the same shape as addition_steps, e.g. for 734-589:
        734-589: 4-9 borrow, 14-9=5, so far 5
        73-58-1: 3-8-1 borrow, 13-8-1=4, so far 45
        7-5-1: 7-5-1=1, so far 145"""
    xs, ys = str(a), str(b)
    borrow, so_far, lines = 0, "", []
    while xs:
        left = f"{xs}-{ys or 0}" + ("-1" if borrow else "")
        x, y = int(xs[-1]), int(ys[-1]) if ys else 0
        expr = f"{x}-{y}" + ("-1" if borrow else "")
        if x - y - borrow < 0:
            digit = x + 10 - y - borrow
            lines.append(f"{left}: {expr} borrow, 1{expr}={digit}, so far {digit}{so_far}")
            borrow = 1
        else:
            digit = x - y - borrow
            lines.append(f"{left}: {expr}={digit}, so far {digit}{so_far}")
            borrow = 0
        so_far = str(digit) + so_far
        xs, ys = xs[:-1], ys[:-1]
    return lines


def _column_sum(rng: random.Random, a: int, b: int) -> tuple[str, int, list[str]]:
    """a+b or, on the other side of a coin flip, larger-smaller: (expression, result, worked column lines)."""
    if rng.random() < 0.5:
        return f"{a}+{b}", a + b, addition_steps(a, b)
    a, b = max(a, b), min(a, b)
    return f"{a}-{b}", a - b, subtraction_steps(a, b)


def _sum_problem(rng: random.Random, task: str, level: int, core: str, result: int,
                 steps: list[str]) -> tuple[str, Problem]:
    q = rng.choice(TEMPLATES).format(e=core)
    return core, Problem(task, level, q, str(result), "\n".join([*steps, f"so {core}={result}"]), "numeric",
                         problem_key(task, core))


def arithmetic(rng: random.Random, level: int) -> tuple[str, Problem]:
    """Level = number of digits of the larger operand (1..8)."""
    a = _digits(rng, level)
    b = _digits(rng, rng.randint(max(1, level - 1), level))
    return _sum_problem(rng, "arithmetic", level, *_column_sum(rng, a, b))


def carries(rng: random.Random, level: int) -> tuple[str, Problem]:
    """3-digit addition or subtraction whose column walk carries (or borrows) exactly level - 1 times (1..4).

    The same worked solutions as `arithmetic`, but difficulty grows in depth rather than in length: every level
    has the same number of digits (three: what the speedrun's model copies reliably; it mis-copied four), so a
    model taught levels 1-2 has seen every kind of line except the one that takes a carry in *and* passes one
    on (the R1 protocol's hard levels, bench/r1_effect.py). Level 4 is addition only (a - b cannot borrow 3 times).
    """
    while True:
        core, result, steps = _column_sum(rng, _digits(rng, 3), _digits(rng, 3))
        if sum(", carry" in line or " borrow," in line for line in steps) == level - 1:
            return _sum_problem(rng, "carries", level, core, result, steps)


# ------------------------------------------------------------------ products
def addition_carries(x: int, y: int) -> int:
    """How many columns of x + y carry (the lines of its worked solution that do)."""
    return sum(", carry" in line for line in addition_steps(x, y))


def products(rng: random.Random, level: int) -> tuple[str, Problem]:
    """a*b with a in 10..499 and b in 10..99, worked as a*(tens of b) shifted plus a*(units of b), one line per
    partial product and one for their sum; level = 1 + the carries of that sum (1..3; level 3: two or more).
    For 147*58:
        147*58 = 147*50 + 147*8
        147*5=735, so 147*50=7350
        147*8=1176
        7350+1176=8526
    Like `carries`, difficulty grows in depth, with every digit at every position at every level (a model taught
    only some tens digits of b copies the others wrongly: docs/LOG.md), and the hard level differs from the easy
    ones only in its sum's carries. Unlike a sum, a product is something a small model learns to answer directly
    only in part within minutes (docs/LOG.md, the R1 protocol)."""
    if level not in (1, 2, 3):
        raise ValueError(f"products has levels 1-3, not {level}")
    while True:
        a, b = rng.randint(10, 499), rng.randint(10, 99)
        tens, units = divmod(b, 10)
        high, low = a * tens * 10, a * units
        if min(1 + addition_carries(high, low), 3) == level:
            break
    core = f"{a}*{b}"
    steps = [f"{core} = {a}*{tens}0 + {a}*{units}",
             f"{a}*{tens}={a * tens}, so {a}*{tens}0={high}",
             f"{a}*{units}={low}",
             f"{high}+{low}={a * b}"]
    return _sum_problem(rng, "products", level, core, a * b, steps)


# ------------------------------------------------------------------ linear equations
def linear(rng: random.Random, level: int) -> tuple[str, Problem]:
    """a*x + b = c with integer x; level scales the coefficients."""
    scale = 10 ** min(level, 4)
    x = rng.randint(-scale, scale)
    a = rng.choice([i for i in range(-9 * level, 9 * level + 1) if i not in (0,)])
    b = rng.randint(-scale, scale)
    c = a * x + b
    bs = f"+ {b}" if b >= 0 else f"- {-b}"
    q = f"Solve for x: {a}x {bs} = {c}."
    steps = [f"{a}x {bs} = {c}",
             f"move the constant: {a}x = {c} {'-' if b >= 0 else '+'} {abs(b)} = {c - b}",
             f"divide by {a}: x = {c - b} / {a} = {x}"]
    core = f"{a}x{bs}={c}".replace(" ", "")
    return core, Problem("linear", level, q, str(x), "\n".join(steps), "numeric", problem_key("linear", core))


# ------------------------------------------------------------------ countdown
def _countdown_solve(nums: list[int], target: int) -> list[str] | None:
    """Depth-first search for a sequence of steps combining all or some numbers into the target."""
    def search(values: list[int], steps: list[str]):
        if target in values:
            return steps
        if len(values) == 1:
            return None
        for i in range(len(values)):
            for j in range(len(values)):
                if i == j:
                    continue
                x, y = values[i], values[j]
                rest = [v for k, v in enumerate(values) if k not in (i, j)]
                for op, val in (("+", x + y), ("-", x - y), ("*", x * y)):
                    if (op in "+*" and i > j) or val < 0:
                        continue
                    found = search(rest + [val], steps + [f"{x} {op} {y} = {val}"])
                    if found is not None:
                        return found
        return None

    return search(nums, [])


def countdown(rng: random.Random, level: int) -> tuple[str, Problem]:
    """Reach a target from level+2 numbers with + - *; each number used at most once."""
    count = min(level + 2, 6)
    while True:
        nums = [rng.randint(1, 9 + 3 * level) for _ in range(count)]
        target = rng.randint(10, 20 * level + 30)
        steps = _countdown_solve(nums, target)
        if steps:
            break
    q = f"Using the numbers {', '.join(map(str, nums))} (each at most once) and + - *, make {target}."
    solution = "\n".join(steps + [f"reached {target}"])
    answer = " ; ".join(steps)
    core = f"{sorted(nums)}->{target}"
    return core, Problem("countdown", level, q, answer, solution, "countdown", problem_key("countdown", core))


FAMILIES = {"arithmetic": arithmetic, "carries": carries, "products": products, "linear": linear,
            "countdown": countdown}
DEFAULT_TASK = "arithmetic"


def generate(task: str, levels: list[int], count: int, seed: int, split: str = "train",
             distinct: bool = True) -> list[Problem]:
    """`count` problems of `task` from the `split` ("train" or "test"), levels drawn round-robin.

    With `distinct`, no problem repeats; a level that runs out of distinct problems (1-digit arithmetic has only
    a few hundred) is dropped from the rotation. Training streams may pass distinct=False.
    """
    if task not in FAMILIES:
        raise KeyError(f"unknown task {task!r}: choose one of {', '.join(FAMILIES)}")
    make = FAMILIES[task]
    rng = random.Random(f"{task}/{split}/{seed}")
    want_held_out = split == "test"
    seen, out = set(), []
    active = list(levels)
    misses = {level: 0 for level in levels}
    turn = 0
    while len(out) < count:
        if not active:
            raise ValueError(f"only {len(out)} distinct {split} problems of {task} exist at levels {levels}")
        level = active[turn % len(active)]
        core, problem = make(rng, level)
        key = problem_key(task, core)
        if is_held_out(key) != want_held_out or (distinct and key in seen):
            misses[level] += 1
            if misses[level] > 500:
                active.remove(level)
            continue
        misses[level] = 0
        turn += 1
        seen.add(key)
        out.append(problem)
    return out
