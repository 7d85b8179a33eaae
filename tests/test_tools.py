"""Tool calling, JSON Schema outputs and chat prefix completion, through the official openai client against a
tiny random model whose tokenizer has DeepSeek's tool-call tokens and the published R1-Distill template."""

import json
import httpx
import jsonschema
import openai
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from nanoseek.serve import tools
from serving import live_server
from tiny import TOOL_TOKENS, build_tool_tokenizer, published_tool_template, save_hf_checkpoint

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                       "properties": {"city": {"type": "string", "maxLength": 16},
                                      "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}},
    {"type": "function", "function": {
        "name": "add", "description": "Adds two integers",
        "parameters": {"type": "object", "additionalProperties": False, "required": ["a", "b"],
                       "properties": {"a": {"type": "integer", "minimum": -1000, "maximum": 1000},
                                      "b": {"type": "integer", "minimum": -1000, "maximum": 1000}}}}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris, and what is 2 + 40?"}]


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tools")
    save_hf_checkpoint("deepseek_v3", directory, vocab_size=320, max_position_embeddings=8192)
    build_tool_tokenizer(directory)
    with live_server(directory) as (base, llm, app):
        yield base, llm


def client(base):
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)


def assert_valid_calls(calls, only=None):
    assert calls, "no tool calls"
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in SCHEMAS and (only is None or call.function.name == only)
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def streamed_calls(stream):
    """Assembles OpenAI tool-call deltas; checks each call's first delta carries its id and name."""
    calls, finish = {}, None
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        for d in choice.delta.tool_calls or []:
            if d.index not in calls:
                assert d.id and d.function.name, "a call's first delta names it"
                calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": d.function.arguments or ""}
            else:
                assert d.function.name is None
                calls[d.index]["arguments"] += d.function.arguments or ""
        finish = choice.finish_reason or finish
    return calls, finish


def test_required_and_named_tool_calls_always_validate_in_a_multi_turn_loop(tool_server):
    base, _ = tool_server
    c = client(base)
    for seed in range(4):
        messages = list(ASK)
        r = c.chat.completions.create(model="nanoseek", messages=messages, tools=TOOLS, tool_choice="required",
                                      max_tokens=300, temperature=1.0, seed=seed)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert_valid_calls(choice.message.tool_calls)
        # The loop: the calls go back as an assistant turn, each answered by a tool message, then a named call.
        messages.append(choice.message.model_dump(exclude_none=True))
        for call in choice.message.tool_calls:
            messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"result": 42})})
        r = c.chat.completions.create(model="nanoseek", messages=messages, tools=TOOLS, max_tokens=300, seed=seed,
                                      tool_choice={"type": "function", "function": {"name": "add"}})
        assert r.choices[0].finish_reason == "tool_calls"
        assert len(r.choices[0].message.tool_calls) == 1
        assert_valid_calls(r.choices[0].message.tool_calls, only="add")
        assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0


def test_streamed_tool_calls_name_first_then_arguments_in_pieces(tool_server):
    base, _ = tool_server
    for seed in range(3):
        stream = client(base).chat.completions.create(model="nanoseek", messages=ASK, tools=TOOLS, stream=True,
                                                      tool_choice="required", max_tokens=300, seed=seed)
        calls, finish = streamed_calls(stream)
        assert finish == "tool_calls" and calls
        for call in calls.values():
            jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])
    stream = client(base).chat.completions.create(model="nanoseek", messages=ASK, tools=TOOLS, stream=True,
                                                  tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                                  max_tokens=300, seed=7, parallel_tool_calls=False)
    calls, finish = streamed_calls(stream)
    assert finish == "tool_calls" and [c["name"] for c in calls.values()] == ["get_weather"]


def test_auto_with_a_strict_tool_constrains_a_call_the_model_starts(tool_server):
    base, llm = tool_server
    begin = llm.tokenizer.token_to_id(tools.CALLS_BEGIN)
    strict = [{**t, "function": {**t["function"], "strict": True}} for t in TOOLS]
    r = client(base).chat.completions.create(model="nanoseek", messages=ASK, tools=strict, tool_choice="auto",
                                             max_tokens=300, seed=1, logit_bias={str(begin): 100})
    assert r.choices[0].finish_reason == "tool_calls"
    assert_valid_calls(r.choices[0].message.tool_calls)
    # tool_choice none: no definitions in the prompt, no parsing.
    none = client(base).chat.completions.create(model="nanoseek", messages=ASK, tools=TOOLS, tool_choice="none",
                                                max_tokens=5)
    auto = client(base).chat.completions.create(model="nanoseek", messages=ASK, tools=TOOLS, max_tokens=5)
    assert none.usage.prompt_tokens < auto.usage.prompt_tokens
    assert none.choices[0].message.tool_calls is None


def test_the_parser_reads_calls_as_the_published_template_writes_them(tool_server):
    """'auto' parses what the model writes: calls rendered by the real template (its missing calls-end for a
    single call included) come back whole, and each format round-trips with content before the calls."""
    _, llm = tool_server
    tok = llm.tokenizer
    assert tools.detect_format(published_tool_template()).name == "deepseek_v3"
    for n in (1, 2):
        calls = [{"id": f"c{i}", "type": "function", "function": {"name": "add", "arguments": json.dumps(
            {"a": i, "b": 2})}} for i in range(n)]
        text = tok.apply_chat_template([{"role": "user", "content": "hi"},
                                        {"role": "assistant", "content": None, "tool_calls": calls}],
                                       add_generation_prompt=False, tokenize=False)
        reply = text.split("<｜Assistant｜>", 1)[1]
        content, parsed, _ = tools.FORMATS["deepseek_v3"].scan(reply, final=True)
        assert content == "" and [(p.name, json.loads(p.arguments)) for p in parsed] == \
               [("add", {"a": i, "b": 2}) for i in range(n)]
    for fmt in tools.FORMATS.values():
        text = "Let me check. " + fmt.section_begin + fmt.render_call("get_weather", '{"city": "Oslo"}') + \
               fmt.call_separator + fmt.render_call("add", '{"a": 1, "b": 2}') + fmt.section_end
        content, parsed, _ = fmt.scan(text, final=True)
        assert content == "Let me check. " and [p.name for p in parsed] == ["get_weather", "add"]
        assert json.loads(parsed[1].arguments) == {"a": 1, "b": 2}
        stream = tools.ToolStream(fmt)
        shown, deltas = "", []
        for k in range(1, len(text) + 1):  # one character at a time: no marker text ever leaks into content
            piece, d = stream.update(text[:k], final=k == len(text))
            shown += piece
            deltas += d
        assert shown == "Let me check. "
        assert "".join(d["function"]["arguments"] for d in deltas if d["index"] == 1) == '{"a": 1, "b": 2}'
    assert TOOL_TOKENS[0] == tools.CALLS_BEGIN


def test_bad_tool_and_schema_requests_get_a_clear_4xx(tool_server):
    base, _ = tool_server

    def post(**body):
        return httpx.post(base + "/v1/chat/completions", json={"messages": ASK, "max_tokens": 4, **body}, timeout=60)

    cases = [
        (dict(tool_choice="required"), 400, "only allowed when 'tools'"),
        (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), 400, "no tool named 'nope'"),
        (dict(tools=TOOLS + TOOLS[:1]), 400, "must be unique"),
        (dict(tools=[{"type": "function", "function": {"name": "bad name"}}]), 422, "tools.0.function.name"),
        (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "object", "if": {"required": ["a"]}}}}), 400, '"if"'),
        (dict(response_format={"type": "json_schema"}), 400, "needs a 'json_schema'"),
        (dict(response_format={"type": "json_object"}, n=2), 422, "n = 1"),
        (dict(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"}), 400, "cannot both"),
        (dict(logit_bias={"99999": 1}), 422, "logit_bias"),
        (dict(logit_bias={"5": 500}), 422, "[-100, 100]"),
        (dict(messages=[{"role": "assistant", "content": "x", "prefix": True}, *ASK]), 400, "prefix"),
    ]
    for body, status, words in cases:
        r = post(**body)
        assert r.status_code == status, (body, r.text)
        assert words in r.json()["error"]["message"], (words, r.text)


def _bounded(schema_children):
    arrays = st.builds(lambda item, n: {"type": "array", "items": item, "maxItems": n}, schema_children,
                       st.integers(0, 3))
    return st.one_of(arrays, _objects(schema_children))


def _objects(children):
    keys = st.text(alphabet="abcdefgh_", min_size=1, max_size=6)
    return st.dictionaries(keys, children, min_size=1, max_size=4).flatmap(
        lambda props: st.lists(st.sampled_from(sorted(props)), unique=True).map(
            lambda required: {"type": "object", "properties": props, "required": required,
                              "additionalProperties": False}))


LEAVES = st.one_of(
    st.just({"type": "boolean"}), st.just({"type": "null"}),
    st.builds(lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span}, st.integers(-999, 999),
              st.integers(0, 999)),
    st.builds(lambda lo: {"type": "number", "minimum": lo, "maximum": lo + 100}, st.integers(-100, 100)),
    st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(0, 10)),
    st.lists(st.text(alphabet="xyz", min_size=1, max_size=4), min_size=1, max_size=4, unique=True).map(
        lambda values: {"enum": values}),
)
# Objects, arrays, enums, required keys, nested schemas and every scalar type; bounded (maxLength, maxItems,
# ranges) because no decoder can make an unbounded schema end within max_tokens on a random model.
SCHEMA = _objects(st.recursive(LEAVES, _bounded, max_leaves=6))


@pytest.fixture(scope="module")
def schema_results():
    return []


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), database=None,
          phases=[Phase.generate])
@given(schema=SCHEMA, seed=st.integers(0, 2**31))
def test_200_random_json_schemas_each_give_valid_json(tool_server, schema_results, schema, seed):
    base, _ = tool_server
    r = client(base).chat.completions.create(
        model="nanoseek", messages=[{"role": "user", "content": "Describe an item as JSON."}], max_tokens=1500,
        temperature=1.0, seed=seed, response_format={"type": "json_schema",
                                                     "json_schema": {"name": "s", "schema": schema, "strict": True}})
    choice = r.choices[0]
    assert choice.finish_reason == "stop", (schema, choice.message.content)
    jsonschema.validate(json.loads(choice.message.content), schema)
    schema_results.append(json.dumps(schema, sort_keys=True))


def test_the_random_schemas_were_varied(schema_results):
    """The 200 schemas above are not one schema 200 times (nesting, arrays, every scalar type appear)."""
    assert len(schema_results) == 200 and len(set(schema_results)) > 150
    text = " ".join(schema_results)
    for word in ('"array"', '"integer"', '"number"', '"string"', '"boolean"', '"null"', '"enum"', '"required": ["'):
        assert word in text, word
    assert any(s.count('"object"') > 1 for s in schema_results)  # nested objects


def test_chat_prefix_completion_continues_the_assistant_message(tool_server):
    base, llm = tool_server
    prefix = "The answer is "
    r = client(base).chat.completions.create(model="nanoseek", max_tokens=12, temperature=0, messages=[
        *ASK, {"role": "assistant", "content": prefix, "prefix": True}])
    # The same text as a plain completion of the rendered conversation plus the prefix.
    text = llm.tokenizer.apply_chat_template(ASK, add_generation_prompt=True, tokenize=False) + prefix
    ids = llm.tokenizer.encode(text, add_special_tokens=False)
    plain = client(base).completions.create(model="nanoseek", prompt=ids, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == plain.choices[0].text and r.choices[0].message.content


def test_prefix_completion_honours_reasoning_content(chat_checkpoint):
    """With a reasoning model (R1 template: the prompt opens <think>), reasoning_content on the prefix is the
    start of the chain of thought, continued as reasoning; content alone means the thinking is over."""
    directory, _ = chat_checkpoint("deepseek_v3")
    with live_server(directory) as (base, llm, _):
        c = client(base)
        thoughts = "First, 2 + 40"
        r = c.chat.completions.create(model="nanoseek", max_tokens=8, temperature=0, messages=[
            *ASK, {"role": "assistant", "content": "", "reasoning_content": thoughts, "prefix": True}])
        text = llm.tokenizer.apply_chat_template(ASK, add_generation_prompt=True, tokenize=False)
        assert text.endswith("<think>\n")
        ids = llm.tokenizer.encode(text + thoughts, add_special_tokens=False)
        plain = c.completions.create(model="nanoseek", prompt=ids, max_tokens=8, temperature=0)
        got = r.choices[0].message.model_extra["reasoning_content"] + (r.choices[0].message.content or "")
        assert got.replace("</think>", "") == plain.choices[0].text.replace("</think>", "")
        assert r.choices[0].message.model_extra["reasoning_content"] != ""
        r = c.chat.completions.create(model="nanoseek", max_tokens=8, temperature=0, messages=[
            *ASK, {"role": "assistant", "content": "It is", "prefix": True}])
        assert r.choices[0].message.model_extra["reasoning_content"] == ""
        assert r.choices[0].message.content
