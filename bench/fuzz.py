"""Fuzz bench of `nanoseek serve`: generated hostile requests (tests/fuzzing.py) against both POST routes of a
live server on a small checkpoint, with a normal request timed after every 50.

    python bench/fuzz.py [--cases 1000]
Counts responses by status, 5xx (must be 0) and responses outside the documented error shape (must be 0), and
the slowest normal request. Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
from hypothesis import HealthCheck, given, settings

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=1000)
    args = parser.parse_args()
    from common import machine
    from fuzzing import REQUESTS, check_response
    from load import build_checkpoint
    from serving import live_server

    statuses, problems, normal = Counter(), [], []
    with tempfile.TemporaryDirectory() as tmp:
        model = build_checkpoint(Path(tmp))
        with live_server(model, max_model_len=128) as (base, llm, _), httpx.Client(base_url=base, timeout=60) as c:

            @settings(max_examples=args.cases, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(REQUESTS)
            def attack(request):
                route, body = request
                r = c.post(route, content=json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass"),
                           headers={"Content-Type": "application/json"})
                statuses[r.status_code] += 1
                problem = check_response(r.status_code, r.content, r.headers.get("content-type", ""))
                if problem:
                    problems.append({"route": route, "body": repr(body)[:300], "problem": problem})
                if sum(statuses.values()) % 50 == 0:
                    t = time.perf_counter()
                    ok = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                              "max_tokens": 2})
                    normal.append((time.perf_counter() - t, ok.status_code))

            start = time.perf_counter()
            attack()
            seconds = time.perf_counter() - start
            leaked = llm.engine.blocks.num_blocks - llm.engine.blocks.num_free
    for p in problems[:5]:
        print("PROBLEM", p)
    print(json.dumps({"bench": "fuzz", **machine(), "cases": sum(statuses.values()), "seconds": round(seconds, 1),
                      "by_status": dict(sorted(statuses.items())),
                      "server_errors": sum(n for s, n in statuses.items() if s >= 500),
                      "outside_error_shape": sum("outside" in p["problem"] or "error event" in p["problem"]
                                                 for p in problems),
                      "normal_requests": len(normal), "normal_failed": sum(s != 200 for _, s in normal),
                      "normal_max_seconds": round(max((t for t, _ in normal), default=0), 3),
                      "blocks_in_use_after": leaked}))


if __name__ == "__main__":
    main()
