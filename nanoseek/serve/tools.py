"""Tool calling: how a model's chat template writes tool calls, and the three things the server does with that.

1. Render: the request's `tools` reach the model either through the template itself (a template that reads a
   `tools` variable, e.g. Qwen2.5's) or, for templates that never render tool definitions (DeepSeek-V3/R1 and
   the R1-Distill templates render calls and results but not the definitions), as a "## Tools" section that the
   server appends to the system prompt, with the exact call syntax the template uses.
2. Constrain: `tool_choice="required"`, a named function, or any tool marked `strict` turn the call syntax plus
   each tool's JSON Schema into a Lark grammar for llguidance (grammar.py), so the arguments always parse and
   validate. With "auto" and no strict tool the model writes freely and the reply is parsed.
3. Parse: the model's text becomes `content` plus `tool_calls` (id, name, arguments as a JSON string), at the end
   or incrementally for streaming (a call's name first, then its arguments in pieces).

Formats (detected from the template, as vLLM picks its deepseek_v3 / deepseek_v31 / hermes parsers):
  deepseek_v3   <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```<｜tool▁call▁end｜>
                [\\n<｜tool▁call▁begin｜>...]<｜tool▁calls▁end｜>   (V3, R1, R1-Distill)
  deepseek_v31  <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>
  hermes        <tool_call>\\n{"name": NAME, "arguments": ARGS}\\n</tool_call>   (Qwen2.5 and the fallback for
                templates with no tool syntax at all, described to the model in the system prompt)
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from ..engine.text import partial_suffix_len
from .grammar import JSON_OPTIONS

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, TOOL_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
HERMES_BEGIN, HERMES_END = "<tool_call>", "</tool_call>"


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI's wire format has it
    id: str = field(default_factory=new_call_id)
    complete: bool = True

    def wire(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


class ToolFormat:
    """One way of writing tool calls in text. DeepSeek's two layouts share `scan`; hermes overrides it."""
    name = ""
    section_begin = ""  # opens the tool-call section (a call may also open directly with call_begin)
    section_end = ""
    call_begin = ""
    name_end = ""  # what ends a call's function name
    args_open = ""  # what comes between the name and the arguments
    args_close = ""  # what ends the arguments (then call_end)
    call_end = ""
    call_separator = ""
    type_word = ""  # deepseek_v3 writes the call's type ("function") before the separator
    arguments_as_text = True  # templates of this format expect `arguments` as a JSON string (else an object)

    def render_call(self, name: str, arguments: str) -> str:
        return f"{self.call_begin}{self.type_word}{TOOL_SEP if self.type_word else ''}{name}{self.name_end}" \
               f"{self.args_open}{arguments}{self.args_close}{self.call_end}"

    def example(self) -> str:
        return self.section_begin + self.render_call("tool_call_name", "tool_call_arguments") + self.section_end

    def markers(self) -> list[str]:
        return [m for m in (self.section_begin, self.call_begin) if m]

    def scan(self, text: str, final: bool) -> tuple[str, list[ToolCall], int]:
        """(content before the calls, the calls so far with the last possibly partial, how much of the content is
        final). Partial closing markers are held back from a partial call's arguments unless `final`."""
        starts = [i for i in (text.find(m) for m in self.markers()) if i != -1]
        if not starts:
            shown = len(text) if final else len(text) - partial_suffix_len(text, self.markers())
            return text, [], shown
        begin = min(starts)
        content, calls, pos = text[:begin], [], begin
        while True:
            start = text.find(self.call_begin, pos)
            if start == -1:
                break
            after = start + len(self.call_begin)
            if self.type_word:
                sep = text.find(TOOL_SEP, after)
                if sep == -1:
                    calls.append(ToolCall("", "", complete=False))
                    break
                after = sep + len(TOOL_SEP)
            name_end = text.find(self.name_end, after)
            if name_end == -1:
                calls.append(ToolCall("", "", complete=False))
                break
            name = text[after:name_end].strip()
            args_start = name_end + len(self.name_end)
            opened = text[args_start:]
            if self.args_open and not opened.startswith(self.args_open):
                if not final and self.args_open.startswith(opened):  # the opening is still arriving
                    calls.append(ToolCall(name, "", complete=False))
                    break
            else:
                args_start += len(self.args_open)
            close = self.args_close + self.call_end
            end = text.find(close, args_start)
            if end == -1:
                args = text[args_start:]
                if not final:
                    args = args[: len(args) - partial_suffix_len(args, [close])]
                calls.append(ToolCall(name, args, complete=False))
                break
            calls.append(ToolCall(name, text[args_start:end]))
            pos = end + len(close)
        return content, calls, len(content)


class DeepSeekV3(ToolFormat):
    name = "deepseek_v3"
    section_begin, section_end, call_begin, call_end = CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END
    type_word, name_end, args_open, args_close, call_separator = "function", "\n", "```json\n", "\n```", "\n"


class DeepSeekV31(ToolFormat):
    name = "deepseek_v31"
    section_begin, section_end, call_begin, call_end = CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END
    name_end = TOOL_SEP


class Hermes(ToolFormat):
    name = "hermes"
    call_begin, call_end, call_separator = HERMES_BEGIN, HERMES_END, "\n"
    arguments_as_text = False

    def render_call(self, name: str, arguments: str) -> str:
        return f'{HERMES_BEGIN}\n{{"name": {json.dumps(name)}, "arguments": {arguments}}}\n{HERMES_END}'

    def example(self) -> str:
        return f'{HERMES_BEGIN}\n{{"name": <function-name>, "arguments": <args-json-object>}}\n{HERMES_END}'

    def scan(self, text: str, final: bool) -> tuple[str, list[ToolCall], int]:
        """Calls are reported when whole (the name sits inside the JSON object, after or before the arguments)."""
        begin = text.find(HERMES_BEGIN)
        if begin == -1:
            shown = len(text) if final else len(text) - partial_suffix_len(text, [HERMES_BEGIN])
            return text, [], shown
        content, calls, pos = text[:begin], [], begin
        while (start := text.find(HERMES_BEGIN, pos)) != -1:
            end = text.find(HERMES_END, start)
            body = text[start + len(HERMES_BEGIN): end if end != -1 else len(text)]
            if end == -1 and not final:
                calls.append(ToolCall("", "", complete=False))
                break
            try:
                obj = json.loads(body)
                arguments = obj.get("arguments", obj.get("parameters", {}))
                calls.append(ToolCall(str(obj["name"]), arguments if isinstance(arguments, str)
                                      else json.dumps(arguments, ensure_ascii=False), complete=end != -1))
            except (ValueError, KeyError, TypeError, AttributeError):
                calls.append(ToolCall("", body.strip(), complete=False))
            if end == -1:
                break
            pos = end + len(HERMES_END)
        return content, calls, len(content)


FORMATS = {f.name: f for f in (DeepSeekV3(), DeepSeekV31(), Hermes())}


def detect_format(template: str | None) -> ToolFormat:
    """The template's own syntax: DeepSeek's tokens with the `function` type word and a ```json fence (V3) or
    without (V3.1+), Hermes' <tool_call> tags; templates with no tool syntax get hermes, described in the system
    prompt (documented in the README)."""
    template = template or ""
    if TOOL_SEP in template:
        return FORMATS["deepseek_v3" if "```json" in template else "deepseek_v31"]
    return FORMATS["hermes"]


def template_renders_tools(template: str | None) -> bool:
    """Whether the template reads the `tools` variable itself (then it is given the definitions)."""
    if not template:
        return False
    from jinja2 import Environment, meta

    try:
        return "tools" in meta.find_undeclared_variables(Environment().parse(template))
    except Exception:  # a template jinja2 cannot parse fails later, with its own message
        return False


def tools_instructions(fmt: ToolFormat, tools: list[dict]) -> str:
    """The "## Tools" system-prompt section for templates that do not render definitions themselves."""
    lines = ["## Tools", "You have access to the following tools:"]
    for tool in tools:
        fn = tool["function"]
        lines += ["", f"### {fn['name']}", f"Description: {fn.get('description') or ''}", "",
                  f"Parameters: {json.dumps(fn.get('parameters') or {'type': 'object', 'properties': {}}, ensure_ascii=False)}"]
    lines += ["", "IMPORTANT: ALWAYS adhere to this exact format for tool use:", fmt.example(), "",
              'Where "tool_call_name" must be an exact function name from the list above and "tool_call_arguments" '
              "must be a JSON object that follows that function's Parameters. To call several tools, write the "
              "calls one after another. If no tool is needed, answer normally."]
    return "\n".join(lines)


def lark_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def call_grammar(fmt: ToolFormat, tools: list[dict], token_id, only: str | None = None, parallel: bool = True,
                 allow_text: bool = False) -> str:
    """A Lark grammar (llguidance's dialect) for a tool-call section: one call (or, with `parallel`, several) of
    the listed functions (or of `only`), each with its arguments constrained by its JSON Schema. A marker that is
    one token of the vocabulary is written as that token (`<[id]>`), else as text. With `allow_text` the answer
    may instead be plain text (tool_choice="auto" with strict tools)."""
    def lit(marker: str) -> str:
        tid = token_id(marker)
        return f"<[{tid}]>" if tid is not None else lark_string(marker)

    rules, alternatives = [], []
    for i, tool in enumerate(tools):
        fn = tool["function"]
        if only is not None and fn["name"] != only:
            continue
        schema = fn.get("parameters") or {"type": "object", "properties": {}}
        args = f"%json {json.dumps({**schema, 'x-guidance': JSON_OPTIONS}, ensure_ascii=False)}"
        if isinstance(fmt, Hermes):
            body = [lit(HERMES_BEGIN), lark_string('\n{"name": ' + json.dumps(fn["name"]) + ', "arguments": '), args,
                    lark_string("}\n"), lit(HERMES_END)]
        else:
            body = [lit(fmt.call_begin)]
            if fmt.type_word:
                body += [lark_string(fmt.type_word), lit(TOOL_SEP)]
            body += [lark_string(fn["name"]), lit(fmt.name_end) if fmt.name_end == TOOL_SEP else
                     lark_string(fmt.name_end)]
            body += ([lark_string(fmt.args_open)] if fmt.args_open else []) + [args]
            body += ([lark_string(fmt.args_close)] if fmt.args_close else []) + [lit(fmt.call_end)]
        rules.append(f"call_{i}: " + " ".join(body))
        alternatives.append(f"call_{i}")
    call = "call: " + " | ".join(alternatives)
    sep = f"{lark_string(fmt.call_separator)} " if fmt.call_separator else ""
    calls = f"call ({sep}call)*" if parallel else "call"
    section = " ".join(x for x in ([lit(fmt.section_begin)] if fmt.section_begin else []) + [calls] +
                       ([lit(fmt.section_end)] if fmt.section_end else []))
    start = f"start: section | TEXT\nTEXT: /(?s:.+)/" if allow_text else "start: section"
    return "\n".join([start, f"section: {section}", call, *rules]) + "\n"


def template_messages(fmt: ToolFormat, messages) -> list[dict]:
    """Protocol messages as the template wants them: assistant tool calls with content None (DeepSeek's
    templates render calls only then) and arguments as the format's templates expect; tool results as `tool`
    messages with their call id."""
    out = []
    for m in messages:
        role = "system" if m.role == "developer" else m.role
        entry = {"role": role, "content": m.text()}
        if m.role == "assistant" and m.tool_calls:
            # DeepSeek's templates render the calls only when content is None (clients often send "").
            entry["content"] = None if fmt.name.startswith("deepseek") else (m.text() or None)
            calls = []
            for c in m.tool_calls:
                arguments = c.function.arguments
                if not fmt.arguments_as_text:
                    try:
                        arguments = json.loads(arguments)
                    except ValueError:
                        pass
                calls.append({"id": c.id, "type": "function",
                              "function": {"name": c.function.name, "arguments": arguments}})
            entry["tool_calls"] = calls
        if m.role == "tool":
            entry["tool_call_id"] = m.tool_call_id or ""
            if m.name:
                entry["name"] = m.name
        out.append(entry)
    return out


class ToolStream:
    """Streams one choice's tool calls as OpenAI deltas: a call's id and name once the name is whole, then its
    arguments as they arrive; content before the calls streams as content."""

    def __init__(self, fmt: ToolFormat):
        self.fmt = fmt
        self.ids: list[str] = []
        self.sent_args: list[int] = []
        self.sent_content = 0

    def update(self, text: str, final: bool) -> tuple[str, list[dict]]:
        content, calls, shown = self.fmt.scan(text, final)
        new_content = content[self.sent_content:shown] if shown > self.sent_content else ""
        self.sent_content = max(self.sent_content, shown)
        deltas = []
        for k, call in enumerate(calls):
            if not call.name:
                break
            if k >= len(self.ids):
                self.ids.append(new_call_id())
                self.sent_args.append(0)
                deltas.append({"index": k, "id": self.ids[k], "type": "function",
                               "function": {"name": call.name, "arguments": ""}})
            piece = call.arguments[self.sent_args[k]:]
            if piece:
                deltas.append({"index": k, "function": {"arguments": piece}})
                self.sent_args[k] = len(call.arguments)
        return new_content, deltas

    @property
    def called(self) -> bool:
        return bool(self.ids)
