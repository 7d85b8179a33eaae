"""Hypothesis strategies for hostile API requests: each field is either a plausible value, an edge value or
arbitrary JSON, so most requests are wrong in one or two places. Shared by tests/test_fuzz.py and bench/fuzz.py."""

from hypothesis import strategies as st

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)
EDGE_INTS = st.sampled_from([0, 1, -1, 2, 20, 21, 2 ** 31, 2 ** 63, 2 ** 64, -(2 ** 63) - 1, 10 ** 30])
TEXT = st.text(max_size=40) | st.sampled_from(["\ud800", "", "<｜User｜>", "</think>", "a" * 300])


def _field(plausible):
    return st.one_of(plausible, EDGE_INTS, JSON)


PART = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "input_audio", 3])},
                             optional={"text": TEXT | JSON, "image_url": JSON})
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "developer", "tool", "", 1])},
    optional={"content": TEXT | st.lists(PART, max_size=3) | JSON, "name": TEXT})
COMMON = {
    "model": _field(st.sampled_from(["nanoseek", "tiny", "gpt-5"])),
    "max_tokens": _field(st.integers(1, 8)),
    "temperature": _field(st.floats(0, 2.5, allow_nan=False)),
    "top_p": _field(st.floats(0, 1.2, allow_nan=False)),
    "n": _field(st.integers(1, 3)),
    "seed": _field(st.integers(-5, 5)),
    "stop": _field(TEXT | st.lists(TEXT, max_size=20)),
    "stream": _field(st.booleans()),
    "stream_options": _field(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "presence_penalty": _field(st.floats(-3, 3, allow_nan=False)),
    "frequency_penalty": _field(st.floats(-3, 3, allow_nan=False)),
    "top_k": _field(st.integers(-2, 50)),
    "min_tokens": _field(st.integers(0, 4)),
    "ignore_eos": _field(st.booleans()),
}
CHAT = st.fixed_dictionaries({"messages": st.lists(MESSAGE, max_size=4) | JSON}, optional={
    **COMMON, "logprobs": _field(st.booleans()), "top_logprobs": _field(st.integers(0, 21)),
    "response_format": _field(st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "xml"])})),
    "tools": _field(st.lists(JSON, max_size=2))})
COMPLETION = st.fixed_dictionaries({"prompt": TEXT | st.lists(EDGE_INTS | st.integers(0, 400), max_size=6) | JSON},
                                   optional={**COMMON, "suffix": _field(TEXT), "echo": _field(st.booleans()),
                                             "logprobs": _field(st.integers(0, 21))})
REQUESTS = st.one_of(st.tuples(st.just("/v1/chat/completions"), CHAT),
                     st.tuples(st.just("/v1/completions"), COMPLETION))


def check_response(status: int, body: bytes, content_type: str) -> str | None:
    """What is wrong with a response to a fuzzed request, or None: never a 5xx, and every error (and every
    SSE error event) in the API's one error shape."""
    import json

    if status >= 500:
        return f"status {status}: {body[:300]!r}"
    if status >= 400:
        try:
            error = json.loads(body)["error"]
        except (ValueError, KeyError, TypeError):
            return f"status {status} outside the error shape: {body[:300]!r}"
        if not (isinstance(error, dict) and set(error) == {"message", "type", "code"} and error["message"]):
            return f"status {status} outside the error shape: {body[:300]!r}"
        return None
    if "event-stream" in content_type:
        for line in body.decode("utf-8", "replace").splitlines():
            if line.startswith("data: {") and '"error"' in line[:12]:
                return f"error event mid-stream: {line[:300]}"
    return None
