"""POST /v1/completions (and DeepSeek's /beta/completions): a text or token-id prompt, optionally with a
`suffix` for fill-in-the-middle, answered as one JSON body or as server-sent events."""

from __future__ import annotations

import json
import time
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from .errors import APIError
from .protocol import CompletionRequest
from .service import Choice, Prepared, Service, empty_usage, read_request, sse_errors

ROUTE = "/v1/completions"
FIM_TOKENS = ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>")


async def completions(service: Service, request: Request):
    req = await read_request(request, CompletionRequest)
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", "invalid_request_error")
    service.check_model(req.model)
    service.check_capacity()
    request_id = f"cmpl-{uuid.uuid4().hex[:24]}"
    prompt_text, prompt_ids = await prompt(service, req)
    params = service.sampling(req, len(prompt_ids), req.logprobs, [])
    blocked = await run_in_threadpool(service.input_filter, prompt_text, request_id)
    headers = {"X-Nanoseek-Policy": service.policy.header(blocked)} if blocked else {}
    p = Prepared(req, request_id, prompt_ids, params, blocked, headers, int(time.time()),
                 req.model or service.config.model_name)
    service.admit(request, p)
    service.metrics.requests_started.inc()
    if blocked:
        empty = body(service, p, [""] * req.n, ["content_filter"] * req.n, [None] * req.n)
        usage = empty_usage(len(prompt_ids))
        await run_in_threadpool(service.account_usage, p, ROUTE, usage)
        if req.stream:
            async def blocked_stream():
                yield f"data: {json.dumps(empty)}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(blocked_stream(), media_type="text/event-stream", headers=headers)
        return JSONResponse({**empty, "usage": usage}, headers=headers)
    if req.stream:
        return StreamingResponse(sse_errors(stream(service, request, p)), media_type="text/event-stream",
                                 headers=headers)
    return await answer(service, request, p)


async def prompt(service: Service, req: CompletionRequest) -> tuple[str, list[int]]:
    """(prompt text, prompt ids): token ids range-checked before anything decodes them; a text prompt (with its
    FIM suffix) tokenized on a worker thread."""
    tokenizer, vocab = service.tokenizer, service.engine.config.vocab_size
    if isinstance(req.prompt, list):
        if req.suffix is not None:
            raise APIError(422, "invalid parameter 'suffix': fill-in-the-middle needs a text prompt, not token ids",
                           "invalid_request_error")
        if any(t < 0 or t >= vocab for t in req.prompt):
            raise APIError(422, f"invalid parameter 'prompt': token ids must be in [0, {vocab})",
                           "invalid_request_error")
        return (tokenizer.decode(list(req.prompt)) if tokenizer else ""), list(req.prompt)
    if tokenizer is None:
        raise APIError(422, "this model has no tokenizer: send the prompt as token ids", "invalid_request_error")
    text = req.prompt
    if req.suffix is not None:
        if any(tokenizer.token_to_id(t) is None for t in FIM_TOKENS):
            raise APIError(422, "invalid parameter 'suffix': this model's tokenizer has no fill-in-the-middle "
                                "tokens", "invalid_request_error", "fim_unsupported")
        begin, hole, end = FIM_TOKENS
        text = f"{begin}{req.prompt}{hole}{req.suffix}{end}"
    ids = await run_in_threadpool(tokenizer.encode, text)
    if any(t >= vocab for t in ids):  # a tokenizer may know more tokens than the model embeds
        raise APIError(422, f"invalid parameter 'prompt': it encodes to token ids beyond the model's {vocab}",
                       "invalid_request_error")
    return text, ids


def body(service: Service, p: Prepared, texts, finishes, logprobs) -> dict:
    choices = [{"index": i, "text": t, "logprobs": lp, "finish_reason": f}
               for i, (t, f, lp) in enumerate(zip(texts, finishes, logprobs))]
    return {"id": p.request_id, "object": "text_completion", "created": p.created, "model": p.model,
            "system_fingerprint": service.fingerprint, "choices": choices}


def legacy_logprobs(entries):
    """The completions API's older logprobs shape."""
    if entries is None:
        return None
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e.get("top_logprobs", [])} for e in entries]}


async def answer(service: Service, request: Request, p: Prepared):
    choices = [Choice(service, i) for i in range(p.req.n)]
    start = time.monotonic()
    last = await service.collect(request, p.prompt_ids, p.params, p.request_id, choices, p.headers)
    if last is None:  # client went away
        return Response(status_code=499)
    usage = service.usage(last, len(p.prompt_ids), [])
    await run_in_threadpool(service.account_usage, p, ROUTE, usage)
    service.metrics.observe_request(last, len(p.prompt_ids), usage["completion_tokens"], start)
    service.metrics.requests.labels(ROUTE, "200").inc()
    out = body(service, p, [c.text for c in choices], [c.finish or "stop" for c in choices],
               [legacy_logprobs(o.logprobs) for o in last.outputs])
    if p.req.return_token_ids:
        out["prompt_token_ids"] = list(p.prompt_ids)
        for choice, o in zip(out["choices"], last.outputs):
            choice["token_ids"] = list(o.token_ids)
    return JSONResponse({**out, "usage": usage}, headers=p.headers)


async def stream(service: Service, request: Request, p: Prepared):
    choices = [Choice(service, i) for i in range(p.req.n)]
    sent = [0] * p.req.n
    last = None
    frame = body(service, p, [], [], [])
    async for out in service.run_request(request, p.prompt_ids, p.params, p.request_id):
        if out is None:
            yield ": keep-alive\n\n"
            continue
        last = out
        for c, o in zip(choices, out.outputs):
            if c.reported:
                continue
            c.update(o)  # completions stream raw text: c.text
            if len(c.text) > sent[c.index] or c.finish:
                piece = c.text[sent[c.index]:]
                sent[c.index] = len(c.text)
                c.reported = c.finish is not None
                choice = {"index": c.index, "text": piece, "logprobs": None, "finish_reason": c.finish}
                yield f"data: {json.dumps({**frame, 'choices': [choice]})}\n\n"
        if all(c.reported for c in choices):
            break
    if last is not None:
        usage = service.usage(last, len(p.prompt_ids), [])
        await run_in_threadpool(service.account_usage, p, ROUTE, usage)
        if p.req.stream_options and p.req.stream_options.include_usage:
            yield f"data: {json.dumps({**frame, 'choices': [], 'usage': usage})}\n\n"
    yield "data: [DONE]\n\n"
