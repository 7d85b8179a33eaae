"""POST /v1/chat/completions: messages -> the chat template -> the engine, answered as one JSON body or as
server-sent events, with DeepSeek's reasoning_content and usage fields."""

from __future__ import annotations

import json
import time
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from .errors import APIError
from . import conversation
from .policy import SYSTEM_PROMPT
from .protocol import ChatCompletionRequest
from .tools import ToolStream
from .service import Choice, Prepared, Service, empty_usage, logprobs_content, read_request, sse_errors

ROUTE = "/v1/chat/completions"


async def chat(service: Service, request: Request):
    req = await read_request(request, ChatCompletionRequest)
    p = await prepare(service, req)
    service.admit(request, p)
    service.metrics.requests_started.inc()
    if req.stream:
        return StreamingResponse(sse_errors(stream(service, request, p)), media_type="text/event-stream",
                                 headers=p.headers)
    if p.blocked:
        service.metrics.requests.labels(ROUTE, "200").inc()
        choices = [{"index": i, "message": {"role": "assistant", "content": "", "reasoning_content": None},
                    "logprobs": None, "finish_reason": "content_filter"} for i in range(req.n)]
        usage = empty_usage(len(p.prompt_ids))
        await run_in_threadpool(service.account_usage, p, ROUTE, usage)
        return JSONResponse(body(service, p, choices, usage), headers=p.headers)
    return await answer(service, request, p)


async def prepare(service: Service, req: ChatCompletionRequest) -> Prepared:
    """Checks, the policy's system prompt, the template and tokenizer (on a worker thread), the answer's grammar,
    sampling parameters."""
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", "invalid_request_error")
    conversation.check(req)
    service.check_model(req.model)
    service.check_capacity()
    tokenizer, policy = service.tokenizer, service.policy
    if tokenizer is None or tokenizer.chat_template is None:
        raise APIError(422, "this model has no chat template: use /v1/completions", "invalid_request_error")
    request_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    interventions = []

    def system_prompt(messages):
        if policy and policy.system_prompt:
            interventions.append(SYSTEM_PROMPT)
            return policy.with_system_prompt(messages, request_id)
        return messages

    rendered = await run_in_threadpool(conversation.render, tokenizer, req, system_prompt, service.engine.reasoning)
    prompt_ids = await run_in_threadpool(tokenizer.encode, rendered.prompt, add_special_tokens=False)
    processors = []
    if rendered.grammar is not None:
        processors = [await run_in_threadpool(service.grammar_processor, rendered.grammar, rendered.in_reasoning)]
    top = (req.top_logprobs or 0) if req.logprobs else None
    # Tool calls are written with special tokens of their own: keep them in the text the parser reads.
    params = service.sampling(req, len(prompt_ids), top, processors, skip_special_tokens=rendered.tools is None)
    blocked = await run_in_threadpool(service.input_filter, "\n".join(m.text() for m in req.messages), request_id)
    interventions += [blocked] if blocked else []
    headers = {"X-Nanoseek-Policy": policy.header(*interventions)} if interventions else {}
    return Prepared(req, request_id, prompt_ids, params, blocked, headers, int(time.time()),
                    req.model or service.config.model_name, rendered.tools)


def body(service: Service, p: Prepared, choices: list, usage: dict | None = None, chunk: bool = False) -> dict:
    out = {"id": p.request_id, "object": "chat.completion.chunk" if chunk else "chat.completion",
           "created": p.created, "model": p.model, "system_fingerprint": service.fingerprint, "choices": choices}
    if usage is not None:
        out["usage"] = usage
    return out


async def answer(service: Service, request: Request, p: Prepared):
    """The whole answer as one JSON body."""
    choices = [Choice(service, i) for i in range(p.req.n)]
    start = time.monotonic()
    last = await service.collect(request, p.prompt_ids, p.params, p.request_id, choices, p.headers)
    if last is None:  # client went away
        return Response(status_code=499)
    results, texts = [], []
    for c, o in zip(choices, last.outputs):
        texts.append((c.reasoning, c.content))
        message = {"role": "assistant", "content": c.content,
                   "reasoning_content": c.reasoning if service.engine.reasoning else None}
        finish = c.finish or "stop"
        if p.tools is not None:
            content, calls, _ = p.tools.scan(c.content, final=True)
            calls = [call for call in calls if call.complete and call.name]
            calls = calls if p.req.parallel_tool_calls else calls[:1]
            if calls:
                message["content"] = content or None
                message["tool_calls"] = [call.wire() for call in calls]
                finish = "tool_calls" if finish == "stop" else finish
        results.append({"index": c.index, "message": message, "logprobs": logprobs_content(o.logprobs),
                        "finish_reason": finish})
    usage = service.usage(last, len(p.prompt_ids), texts)
    await run_in_threadpool(service.account_usage, p, ROUTE, usage)
    service.metrics.observe_request(last, len(p.prompt_ids), usage["completion_tokens"], start)
    service.metrics.requests.labels(ROUTE, "200").inc()
    return JSONResponse(body(service, p, results, usage), headers=p.headers)


def sse(service: Service, p: Prepared, choices: list, usage: dict | None = None) -> str:
    return f"data: {json.dumps(body(service, p, choices, usage, chunk=True), ensure_ascii=False)}\n\n"


async def stream(service: Service, request: Request, p: Prepared):
    """The answer as server-sent events: a role chunk, deltas as text arrives (keep-alive comments while
    queued), a usage chunk when asked, [DONE]."""
    n = p.req.n
    include_usage = bool(p.req.stream_options and p.req.stream_options.include_usage)
    yield sse(service, p, [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                            "finish_reason": None} for i in range(n)])
    if p.blocked:
        yield sse(service, p, [{"index": i, "delta": {}, "logprobs": None, "finish_reason": "content_filter"}
                               for i in range(n)])
        usage = empty_usage(len(p.prompt_ids))
        await run_in_threadpool(service.account_usage, p, ROUTE, usage)
        if include_usage:
            yield sse(service, p, [], usage)
        yield "data: [DONE]\n\n"
        service.metrics.requests.labels(ROUTE, "200").inc()
        return
    choices = [Choice(service, i) for i in range(n)]
    for c in choices:
        c.tool_stream = ToolStream(p.tools) if p.tools is not None else None
    last, start, got_token = None, time.monotonic(), False
    async for out in service.run_request(request, p.prompt_ids, p.params, p.request_id):
        if out is None:
            if not got_token:
                yield ": keep-alive\n\n"
            continue
        last = out
        deltas = [d for c, o in zip(choices, out.outputs) if (d := delta(service, p, c, o))]
        if deltas:
            got_token = True
            yield sse(service, p, deltas)
        if all(c.reported for c in choices):
            break
    if last is None:
        return
    usage = service.usage(last, len(p.prompt_ids), [(c.reasoning, c.content) for c in choices])
    await run_in_threadpool(service.account_usage, p, ROUTE, usage)
    if include_usage:
        yield sse(service, p, [], usage)
    service.metrics.observe_request(last, len(p.prompt_ids), sum(len(o.token_ids) for o in last.outputs), start)
    service.metrics.requests.labels(ROUTE, "200").inc()
    yield "data: [DONE]\n\n"


def delta(service: Service, p: Prepared, c: Choice, o) -> dict | None:
    """One choice's new text (reasoning and content), log-probs and finish reason since the last chunk."""
    if c.reported:
        return None
    c.update(o)
    reasoning, content = c.reasoning, c.content
    d = {}
    if service.engine.reasoning and len(reasoning) > c.sent_reasoning:
        d["reasoning_content"] = reasoning[c.sent_reasoning:]
        c.sent_reasoning = len(reasoning)
    if p.tools is not None:
        new_content, calls = c.tool_stream.update(content, final=c.finish is not None)
        calls = calls if p.req.parallel_tool_calls else [x for x in calls if x["index"] == 0]
        if new_content:
            d["content"] = new_content
        if calls:
            d["tool_calls"] = calls
    elif len(content) > c.sent_content:
        d["content"] = content[c.sent_content:]
        c.sent_content = len(content)
    lp = None
    if o.logprobs is not None and len(o.logprobs) > c.logprobs_sent:
        lp = logprobs_content(o.logprobs[c.logprobs_sent:])
        c.logprobs_sent = len(o.logprobs)
    if not d and not c.finish:
        return None
    finish = c.finish
    if c.finish:
        c.reported = True
        if c.rule is not None:
            service.policy.audit(p.request_id, c.rule, "cut", "output", None)
        if finish == "stop" and p.tools is not None and c.tool_stream.called:
            finish = "tool_calls"
    return {"index": c.index, "delta": d, "logprobs": lp, "finish_reason": finish}
