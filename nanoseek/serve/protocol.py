"""Request and response shapes of the OpenAI / DeepSeek API (pydantic).

Unknown request fields are ignored, as OpenAI's clients send extras. Ranges follow OpenAI's documentation; a
value out of range is a 422 whose message names the parameter and the allowed range.
"""

from __future__ import annotations

import json
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator

MAX_JSON_DEPTH = 32  # the deepest a valid request nests is ~5 (messages -> parts -> part)
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACKETS = re.compile(r"[\[\]{}]")
SEED_RANGE = dict(ge=-(1 << 63), lt=1 << 64)  # what a 64-bit generator takes
MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 256  # DeepSeek's API takes up to 16 stop sequences
MAX_MESSAGES = 2048
MAX_TOOLS = 128  # OpenAI's limit on tools per request


class BadRequest(ValueError):
    """A body that is not a well-formed request: a 400 whose message says why."""


def parse_json(raw: bytes) -> dict:
    """The request body as a JSON object, or BadRequest: not UTF-8 or not JSON, integers past Python's digit
    limit, nesting deeper than MAX_JSON_DEPTH (checked before parsing: a 400,000-deep array must not reach
    the recursive parser), lone UTF-16 surrogates (they cannot be encoded for the tokenizer)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("request body is not valid UTF-8") from None
    depth = 0
    for bracket in _BRACKETS.findall(_STRINGS.sub("", text)):  # nesting outside strings, at C speed per string
        depth += 1 if bracket in "[{" else -1
        if depth > MAX_JSON_DEPTH:
            raise BadRequest(f"request body nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        body = json.loads(text)
    except ValueError as e:  # JSONDecodeError, or an integer longer than Python converts
        raise BadRequest(f"request body is not valid JSON ({str(e).split(':')[0]})") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    _refuse_lone_surrogates(body)
    return body


def _refuse_lone_surrogates(value) -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest("request body holds a lone UTF-16 surrogate (e.g. \\ud800): send valid Unicode") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _refuse_lone_surrogates(k)
            _refuse_lone_surrogates(v)
    elif isinstance(value, list):
        for v in value:
            _refuse_lone_surrogates(v)


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: StrictStr
    arguments: StrictStr = "{}"  # a JSON string, as OpenAI's wire format has it


class ToolCallIn(BaseModel):
    """A tool call of an earlier assistant turn, sent back by the client."""
    model_config = ConfigDict(extra="ignore")
    id: StrictStr = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict] | None = ""
    name: StrictStr | None = None
    tool_calls: list[ToolCallIn] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_call_id: StrictStr | None = None
    # DeepSeek's chat prefix completion (beta): the last assistant message is continued, not answered.
    prefix: StrictBool = False
    reasoning_content: StrictStr | None = None

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, content):
        if isinstance(content, list):
            for part in content:
                if part.get("type") != "text":
                    raise ValueError(f"content part type {part.get('type')!r} is not supported: this model reads "
                                     "text parts only")
                if not isinstance(part.get("text"), str):
                    raise ValueError("a text content part needs 'text' to be a string")
        return content

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p["text"] for p in self.content)
        return self.content or ""


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: StrictStr = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: StrictStr | None = None
    parameters: dict | None = None  # a JSON Schema; absent = no arguments
    strict: StrictBool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: StrictStr


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: StrictStr = Field(default="response", pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: StrictStr | None = None
    schema_: dict = Field(default_factory=dict, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    stop: StrictStr | list[StrictStr] | None = None
    n: StrictInt = Field(default=1, ge=1, le=16)
    seed: StrictInt | None = Field(default=None, **SEED_RANGE)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extra sampling parameters (OpenAI clients send them through `extra_body`).
    top_k: StrictInt = Field(default=-1, ge=-1)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    min_tokens: StrictInt = Field(default=0, ge=0)
    ignore_eos: StrictBool = False
    # vLLM's: log-probs of the model's raw distribution, or after penalties and temperature (what RL needs).
    logprobs_mode: Literal["raw", "processed"] = "raw"
    # OpenAI's token id (as a string) -> bias added to its logit, in [-100, 100].
    logit_bias: dict[str, float] | None = Field(default=None, max_length=1024)

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, bias):
        for key, value in (bias or {}).items():
            if not key.isdigit():
                raise ValueError(f"keys must be token ids, got {key[:20]!r}")
            if not -100 <= value <= 100:
                raise ValueError(f"bias of token {key} must be in [-100, 100]")
        return bias

    @field_validator("stop")
    @classmethod
    def _bounded_stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(len(x) > MAX_STOP_CHARS for x in stops):
            raise ValueError(f"each stop string at most {MAX_STOP_CHARS} characters")
        return stop


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool = True


class CompletionRequest(SamplingFields):
    prompt: StrictStr | list[StrictInt] = Field(min_length=1)
    suffix: StrictStr | None = None
    logprobs: StrictInt | None = Field(default=None, ge=0, le=20)
    echo: StrictBool = False
    return_token_ids: StrictBool = False  # vLLM's: the prompt's and each choice's token ids in the answer


def error_body(message: str, type_: str, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "code": code}}

