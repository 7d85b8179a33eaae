"""Property-based attack on both POST routes: a few hundred generated requests, none may get a 5xx or an error
outside the documented shape, and the server keeps answering normal requests in under a second."""

import json

import httpx
from hypothesis import HealthCheck, given, settings

from fuzzing import REQUESTS, check_response
from serving import live_server


def test_generated_requests_never_get_a_5xx(chat_checkpoint):
    directory, _ = chat_checkpoint("deepseek_v3")
    with live_server(directory, max_model_len=96) as (base, _, _), httpx.Client(base_url=base, timeout=30) as c:

        @settings(max_examples=300, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(REQUESTS)
        def attack(request):
            route, body = request
            r = c.post(route, content=json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass"),
                       headers={"Content-Type": "application/json"})
            problem = check_response(r.status_code, r.content, r.headers.get("content-type", ""))
            assert problem is None, (body, problem)

        attack()
        ok = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert ok.status_code == 200 and ok.elapsed.total_seconds() < 1
