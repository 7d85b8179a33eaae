"""Accuracy on verifiable problems through the engine: pass@1, pass@k, maj@k with 95% confidence intervals.

pass@k uses the unbiased estimator 1 - C(n-c, k) / C(n, k) over n samples with c correct (Chen et al. 2021);
maj@k is the accuracy of the most frequent final answer among the first k samples. Intervals: Wilson for a
single sample per problem, otherwise normal over per-problem means.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict

from .data.sources import chat_prompt
from .data.tasks import Problem
from .data.verify import final_answer_text, parse_number, verify
from .endpoint import Endpoint
from .engine import LLM, SamplingParams


def pass_at_k(n: int, c: int, k: int) -> float:
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def wilson(successes: float, total: int, z: float = 1.96) -> tuple[float, float]:
    if total == 0:
        return 0.0, 0.0
    p = successes / total
    denom = 1 + z * z / total
    center = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def mean_ci(values: list[float], z: float = 1.96) -> tuple[float, float]:
    n = len(values)
    if n < 2:
        return (values[0], values[0]) if values else (0.0, 0.0)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return max(0.0, mean - z * std / math.sqrt(n)), min(1.0, mean + z * std / math.sqrt(n))


def _answer_key(completion: str, problem: Problem) -> str:
    text = final_answer_text(completion)
    if problem.verifier in ("numeric", "math"):
        value = parse_number(text)
        return str(value) if value is not None else ""
    return " ".join(text.split()).lower()


def summarize(correct: list[list[bool]], answers: list[list[str]], problems: list[Problem], ks: list[int]) -> dict:
    n = len(correct[0]) if correct else 0
    per_problem = [sum(c) / len(c) for c in correct]
    out = {"problems": len(problems), "samples_per_problem": n, "pass@1": sum(per_problem) / max(len(problems), 1)}
    if n == 1:
        out["pass@1_ci95"] = list(wilson(sum(per_problem), len(problems)))
    else:
        out["pass@1_ci95"] = list(mean_ci(per_problem))
    for k in ks:
        if 1 < k <= n:
            scores = [pass_at_k(n, sum(c), k) for c in correct]
            out[f"pass@{k}"] = sum(scores) / len(scores)
            out[f"pass@{k}_ci95"] = list(mean_ci(scores))
            majority = []
            for c, a in zip(correct, answers):
                votes = Counter(x for x in a[:k] if x)
                if not votes:
                    majority.append(0.0)
                    continue
                top = votes.most_common(1)[0][0]
                majority.append(float(any(ok for ok, x in zip(c[:k], a[:k]) if x == top)))
            out[f"maj@{k}"] = sum(majority) / len(majority)
    return out


def evaluate(llm: LLM | Endpoint, problems: list[Problem], n: int = 1, temperature: float = 0.0,
             max_tokens: int = 256, top_p: float = 1.0, seed: int = 0, ks: list[int] | None = None,
             keep_samples: int = 4) -> dict:
    """Runs every problem through the engine's chat template (or an OpenAI-compatible endpoint) and scores it.
    Result: overall and per-level metrics plus a few sample completions."""
    if not problems:
        return {"overall": {"problems": 0}, "levels": {}, "samples": []}
    ks = ks or ([1, n] if n > 1 else [1])
    prompts = [chat_prompt(p) for p in problems]
    seed = None if temperature == 0 else seed
    if isinstance(llm, Endpoint):
        outs = [[text for text, _ in choices] for choices in
                llm.chat(prompts, n=n, temperature=temperature, max_tokens=max_tokens, top_p=top_p, seed=seed)]
    else:
        params = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)
        outs = [[o.text for o in out.outputs] for out in llm.generate(prompts, params)]
    correct, answers, samples = [], [], []
    for p, texts in zip(problems, outs):
        correct.append([verify(t, p.answer, p.verifier, p.question) for t in texts])
        answers.append([_answer_key(t, p) for t in texts])
        if len(samples) < keep_samples:
            samples.append({"question": p.question, "answer": p.answer, "completion": texts[0],
                            "correct": correct[-1][0], "level": p.level})
    by_level = defaultdict(list)
    for i, p in enumerate(problems):
        by_level[p.level].append(i)
    levels = {level: summarize([correct[i] for i in idx], [answers[i] for i in idx], [problems[i] for i in idx], ks)
              for level, idx in sorted(by_level.items())}
    return {"overall": summarize(correct, answers, problems, ks), "levels": levels, "samples": samples,
            "temperature": temperature, "max_tokens": max_tokens}


def format_table(result: dict, title: str = "") -> str:
    """Markdown table of per-level and overall accuracy."""
    overall = result["overall"]
    extra = [k for k in overall if k.startswith(("pass@", "maj@")) and not k.endswith("ci95") and k != "pass@1"]
    head = "| level | problems | pass@1 | 95% CI |" + "".join(f" {k} |" for k in extra)
    rows = [f"{title}\n" if title else "", head, "|" + "---|" * (4 + len(extra))]

    def row(name, r):
        lo, hi = r.get("pass@1_ci95", (0, 0))
        cells = "".join(f" {100 * r.get(k, float('nan')):.1f}% |" for k in extra)
        return f"| {name} | {r['problems']} | {100 * r['pass@1']:.1f}% | {100 * lo:.1f}-{100 * hi:.1f}% |{cells}"

    rows += [row(level, r) for level, r in result["levels"].items()]
    rows.append(row("**all**", overall))
    return "\n".join(r for r in rows if r != "")
