"""From a chat request to the prompt text and the constraint on the answer: messages through the chat template
(tool calls and results included), tool definitions where the template has no place for them, DeepSeek's chat
prefix completion, and the grammar that `response_format` or `tool_choice` asks for."""

from __future__ import annotations

from dataclasses import dataclass

from ..engine.text import THINK_CLOSE, THINK_OPEN, starts_in_reasoning
from .errors import APIError
from .protocol import ChatCompletionRequest
from .tools import ToolFormat, call_grammar, detect_format, template_messages, template_renders_tools, \
    tools_instructions


@dataclass
class Rendered:
    prompt: str
    tools: ToolFormat | None  # set when the reply is to be parsed for tool calls
    parallel_tool_calls: bool
    grammar: str | None  # an llguidance grammar constraining the answer, or None
    in_reasoning: bool  # generation starts inside an open <think> block


def bad(message: str, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", code)


def check(req: ChatCompletionRequest) -> None:
    """Combinations the request shapes alone cannot refuse."""
    if req.tool_choice is not None and not req.tools:
        raise bad("invalid parameter 'tool_choice': it is only allowed when 'tools' are given")
    names = [t.function.name for t in req.tools or []]
    if len(set(names)) != len(names):
        raise bad("invalid parameter 'tools': function names must be unique")
    if req.tool_choice is not None and not isinstance(req.tool_choice, str) and \
            req.tool_choice.function.name not in names:
        raise bad(f"invalid parameter 'tool_choice': no tool named '{req.tool_choice.function.name}' in 'tools'")
    for i, m in enumerate(req.messages):
        if m.prefix and (i != len(req.messages) - 1 or m.role != "assistant"):
            raise bad(f"invalid parameter 'messages[{i}].prefix': only the last message, an assistant one, can be "
                      "a prefix to continue")
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_schema" and fmt.json_schema is None:
        raise bad("invalid parameter 'response_format': type json_schema needs a 'json_schema' object with a 'schema'")
    if fmt is not None and fmt.type != "text" and tools_active(req):
        raise bad("'response_format' and 'tools' cannot both constrain one answer: send tool_choice='none' or "
                  "drop response_format")
    if (fmt is not None and fmt.type != "text" or constrained_tools(req)) and req.n > 1:
        raise APIError(422, "invalid parameter 'n': constrained decoding (response_format, tool_choice) supports "
                            "n = 1", "invalid_request_error")


def tools_active(req: ChatCompletionRequest) -> bool:
    return bool(req.tools) and req.tool_choice != "none"


def constrained_tools(req: ChatCompletionRequest) -> bool:
    """Tool calls decoded against the tools' schemas: a call is required (or named), or a tool is strict."""
    if not tools_active(req):
        return False
    return req.tool_choice not in (None, "auto") or any(t.function.strict for t in req.tools)


def render(tokenizer, req: ChatCompletionRequest, messages_hook, reasoning_model: bool) -> Rendered:
    """The prompt text and the answer's constraint. `messages_hook` adds the policy's system prompt (or is the
    identity). Runs on a worker thread (templates and grammars can be slow)."""
    template = tokenizer.chat_template
    fmt = detect_format(template)
    messages = template_messages(fmt, req.messages)
    prefix = req.messages[-1] if req.messages[-1].prefix else None
    if prefix is not None:
        messages = messages[:-1]
    messages = messages_hook(messages)
    kwargs = {}
    active = tools_active(req)
    tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
    if active:
        if template_renders_tools(template):
            kwargs["tools"] = tools
        else:
            messages = with_system_text(messages, tools_instructions(fmt, tools))
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
    in_reasoning = reasoning_model and starts_in_reasoning(prompt)
    if prefix is not None:
        prompt, in_reasoning = continue_prefix(prompt, prefix, in_reasoning, reasoning_model)
    grammar = None
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        grammar = ("json", {"type": "object"})
    elif rf is not None and rf.type == "json_schema":
        grammar = ("json", rf.json_schema.schema_)
    elif constrained_tools(req):
        named = None if isinstance(req.tool_choice, str) else req.tool_choice.function.name
        grammar = ("lark", call_grammar(fmt, tools, tokenizer.token_to_id, only=named,
                                        parallel=req.parallel_tool_calls and named is None,
                                        allow_text=req.tool_choice in (None, "auto")))
    return Rendered(prompt, fmt if active else None, req.parallel_tool_calls, grammar, in_reasoning)


def with_system_text(messages: list[dict], text: str) -> list[dict]:
    """`text` appended to the (first) system message, or a system message of its own first."""
    if messages and messages[0]["role"] == "system":
        first = dict(messages[0])
        first["content"] = f"{first['content']}\n\n{text}" if first.get("content") else text
        return [first] + messages[1:]
    return [{"role": "system", "content": text}] + messages


def continue_prefix(prompt: str, prefix, in_reasoning: bool, reasoning_model: bool) -> tuple[str, bool]:
    """DeepSeek's chat prefix completion: the assistant turn starts with the given text. With a reasoning model,
    `reasoning_content` is the start of the chain of thought (continued unless content follows it); content
    alone means an empty chain of thought (the answer is what continues)."""
    content, thoughts = prefix.text(), prefix.reasoning_content
    if not reasoning_model:
        return prompt + content, False
    if not in_reasoning and thoughts is not None:
        prompt, in_reasoning = prompt + THINK_OPEN + "\n", True
    if in_reasoning:
        if thoughts is not None and not content:
            return prompt + thoughts, True
        return prompt + (thoughts or "") + "\n" + THINK_CLOSE + "\n\n" + content, False
    return prompt + content, False

