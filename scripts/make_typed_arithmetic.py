"""Write a JSONL task file of arithmetic typed the way people type it, answers only (no worked solutions).

    python scripts/make_typed_arithmetic.py runs/typed_arithmetic.jsonl [--count 8000] [--seed 0]

The "bring your own task" case of the R1 protocol (bench/r1_effect.py --task FILE): the default model adds and
subtracts numbers of 1-3 digits when asked "What is 347+589?" (90%), but it was trained on four templates only,
and spaces around the operator, a bare expression or a trailing "= ?" throw it off (measured on the speedrun's
model, 30 problems each, T = 1: "What is a + b?" 30% pass@8, "a+b" 10%, "a-b=?" 0%, while "Find a+b." 80%).
The file holds only final answers, so the one way to learn the new forms *with* the scratchpad is from verifier
rewards. (Questions in words, "A shop had 734 apples and sold 589", were out of reach: 4% pass@8.)
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

FORMS = ["What is {e}?", "{e}", "{e} = ?", "Compute {e}.", "Please compute {e} for me.", "what's {e}"]


def typed_problem(rng: random.Random) -> dict:
    digits = rng.choice([2, 3, 3])
    a = rng.randint(10 ** (digits - 1), 10 ** digits - 1)
    b = rng.randint(10 ** (digits - 2) if digits > 2 else 1, 10 ** digits - 1)
    if rng.random() < 0.5:
        expression, answer = f"{a} + {b}", a + b
    else:
        a, b = max(a, b), min(a, b)
        expression, answer = f"{a} - {b}", a - b
    return {"question": rng.choice(FORMS).format(e=expression), "answer": str(answer), "verifier": "numeric"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--count", type=int, default=8000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    seen, rows = set(), []
    while len(rows) < args.count:
        row = typed_problem(rng)
        if row["question"] not in seen:
            seen.add(row["question"])
            rows.append(row)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} problems to {path}")


if __name__ == "__main__":
    main()
