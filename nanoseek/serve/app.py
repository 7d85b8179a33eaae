"""FastAPI application: OpenAI/DeepSeek-compatible routes on the async engine.

Routes: POST /v1/chat/completions (+ /chat/completions), POST /v1/completions (+ /completions and DeepSeek's
/beta/completions for fill-in-the-middle), GET /v1/models (+ /models), GET /v1/pricing (+ /pricing),
GET /metrics, GET /health, GET / (the chat page, static). With an API key every route but /health and the page
needs `Authorization: Bearer KEY` (compared in constant time).

The engine is the only state that matters; each request reads its metrics (cache hits, timings) from the
engine's outputs, never from engine internals.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from .. import __version__
from ..engine import AsyncLLM, EngineDeadError, InvalidRequestError, RequestFailedError, SamplingParams
from ..engine.text import split_reasoning
from ..errors import NanoseekError
from .json_mode import JsonObjectProcessor
from .metrics import ServerMetrics
from .policy import SYSTEM_PROMPT, Policy
from .pricing import Prices
from .protocol import BadRequest, ChatCompletionRequest, CompletionRequest, error_body, parse_json

log = logging.getLogger("nanoseek.serve")
WEB_DIR = Path(__file__).parent / "web"
OPEN_PATHS = ("/health", "/", "/index.html", "/favicon.ico")
FIM_TOKENS = ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>")


@dataclass
class ServeConfig:
    model_name: str = "nanoseek"
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    max_queue: int = 256
    keepalive_seconds: float = 5.0
    cors_origins: list[str] = field(default_factory=list)
    policy: Policy | None = None
    prices: Prices | None = None
    default_max_tokens: int = 2048


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str, code: str | None = None, headers: dict | None = None):
        self.status, self.message, self.type, self.code, self.headers = status, message, type_, code, headers


def _error(status: int, message: str, type_: str, code=None, headers=None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, code), status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[int, str]:
    errors = exc.errors()
    if any(e.get("type") in ("json_invalid", "json_type") for e in errors):
        return 400, "request body is not valid JSON"
    first = errors[0]
    loc = ".".join(str(p) for p in first.get("loc", []) if p != "body") or "body"
    ctx = first.get("ctx", {})
    bounds = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in ctx.items() if k in ("ge", "gt", "le", "lt",
                                                                                  "min_length", "max_length"))
    allowed = f" (allowed: {bounds})" if bounds else ""
    return 422, f"invalid parameter '{loc}': {first.get('msg', 'invalid')}{allowed}"


class GuardMiddleware:
    """Pure ASGI middleware (streaming and disconnects pass through untouched): API-key check on every route
    but the open ones, body-size limit, 503 while shutting down, and no traceback ever reaches a client."""

    def __init__(self, app, app_state, config: ServeConfig):
        self.app, self.state, self.config = app, app_state, config

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, config = scope["path"], self.config
        headers = {k.decode().lower(): v.decode() for k, v in scope.get("headers", [])}
        reply = None
        if config.api_key and not (path in OPEN_PATHS or path.startswith("/static/")) and scope["method"] != "OPTIONS":
            header = headers.get("authorization", "")
            token = header[7:] if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), config.api_key.encode()):
                reply = _error(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                               "authentication_error", "invalid_api_key")
        length = headers.get("content-length", "")
        if reply is None and length.isdigit() and int(length) > config.max_body_bytes:
            reply = _error(413, f"request body of {length} bytes exceeds the limit of {config.max_body_bytes}",
                           "invalid_request_error", "body_too_large")
        if reply is None and self.state.shutting_down and path not in OPEN_PATHS:
            reply = _error(503, "the server is shutting down", "service_unavailable", "shutting_down")
        if reply is not None:
            return await reply(scope, receive, send)
        started, received = False, 0

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        async def counting_receive():
            # The limit holds on the bytes that arrive (a chunked body has no Content-Length to check).
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > config.max_body_bytes:
                    raise APIError(413, f"request body exceeds the limit of {config.max_body_bytes} bytes",
                                   "invalid_request_error", "body_too_large")
            return message

        try:
            await self.app(scope, counting_receive, tracking_send)
        except Exception:
            log.exception("unhandled error on %s", path)
            if not started:
                await _error(500, "internal server error", "server_error")(scope, receive, send)


async def read_request(request: Request, model):
    """The body parsed (protocol.parse_json: 400 on malformed input) and validated as `model` (422)."""
    from pydantic import ValidationError

    raw = await request.body()
    try:  # parsing and validating a 1 MB body is work for a worker thread, not the event loop
        body = await run_in_threadpool(parse_json, raw)
    except BadRequest as e:
        raise APIError(400, str(e), "invalid_request_error") from None
    try:
        return await run_in_threadpool(model.model_validate, body)
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from None


async def client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body was read already: the next ASGI message is the hang-up)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def sse_errors(events):
    """A stream's events; an error after the headers went out becomes a last `data: {"error": ...}` event (the
    shape OpenAI's streams use) instead of a connection cut mid-stream."""
    try:
        async for event in events:
            yield event
    except APIError as e:
        yield f"data: {json.dumps(error_body(e.message, e.type, e.code))}\n\n"


def create_app(llm: AsyncLLM, config: ServeConfig) -> FastAPI:
    app = FastAPI(title="nanoseek", version=__version__, docs_url=None, redoc_url=None)
    app.state.llm, app.state.config = llm, config
    app.state.shutting_down = False
    metrics = ServerMetrics()
    app.state.metrics = metrics
    engine = llm.engine
    tokenizer = llm.tokenizer
    fingerprint = "fp_" + hashlib.sha256(f"{__version__}/{config.model_name}".encode()).hexdigest()[:10]
    policy = config.policy

    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["*"],
                           allow_headers=["*"])

    app.add_middleware(GuardMiddleware, app_state=app.state, config=config)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError):
        status, message = _validation_message(exc)
        metrics.requests.labels(request.url.path, str(status)).inc()
        return _error(status, message, "invalid_request_error")

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError):
        metrics.requests.labels(request.url.path, str(exc.status)).inc()
        return _error(exc.status, exc.message, exc.type, exc.code, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        # Unknown routes (404) and wrong methods (405) answer in the same error shape as everything else.
        metrics.requests.labels("unmatched", str(exc.status_code)).inc()
        message = {404: f"no route {request.url.path}: see GET /v1/models and POST /v1/chat/completions",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return _error(exc.status_code, message, "invalid_request_error",
                      {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code), exc.headers)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        metrics.requests.labels(request.url.path, "500").inc()
        return _error(500, "internal server error", "server_error")

    # ------------------------------------------------------------ helpers
    def check_model(name: str | None) -> None:
        if name and name != config.model_name and not (policy and name in policy.allowed_models):
            raise APIError(404, f"model '{name}' does not exist: this server serves '{config.model_name}'",
                           "invalid_request_error", "model_not_found")
        if policy and policy.allowed_models and name and name not in policy.allowed_models:
            raise APIError(404, f"model '{name}' is not allowed by the server policy", "invalid_request_error",
                           "model_not_allowed")

    def check_capacity() -> None:
        if llm.error is not None:
            raise APIError(503, "the engine is not running", "service_unavailable", "engine_dead")
        if len(engine.scheduler.waiting) >= config.max_queue:
            raise APIError(429, f"the request queue is full ({config.max_queue} waiting): retry shortly",
                           "rate_limit_error", "queue_full", {"Retry-After": "1"})

    def sampling(req, prompt_len: int, logprobs: int | None, processors: list) -> SamplingParams:
        context = engine.max_model_len
        if policy and policy.max_prompt_tokens and prompt_len > policy.max_prompt_tokens:
            raise APIError(422, f"prompt has {prompt_len} tokens; the server policy allows at most "
                                f"{policy.max_prompt_tokens}", "invalid_request_error", "prompt_too_long")
        if prompt_len >= context:
            raise APIError(422, f"prompt has {prompt_len} tokens but the context is {context}: shorten it",
                           "invalid_request_error", "context_length_exceeded")
        max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens
        limit = context - prompt_len
        if policy and policy.max_tokens:
            limit = min(limit, policy.max_tokens)
        if max_tokens is None:
            max_tokens = min(limit, config.default_max_tokens)
        elif max_tokens > limit:
            raise APIError(422, f"invalid parameter 'max_tokens': {max_tokens} exceeds what fits (allowed: at most "
                                f"{limit} = context {context} - prompt {prompt_len}"
                                + (", and the policy's cap" if policy and policy.max_tokens else "") + ")",
                           "invalid_request_error", "max_tokens_too_large")
        try:
            return SamplingParams(n=req.n, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                                  max_tokens=max_tokens, stop=req.stop, presence_penalty=req.presence_penalty,
                                  frequency_penalty=req.frequency_penalty, logprobs=logprobs,
                                  logits_processors=processors, top_k=req.top_k, min_p=req.min_p,
                                  repetition_penalty=req.repetition_penalty, min_tokens=req.min_tokens,
                                  ignore_eos=req.ignore_eos)
        except InvalidRequestError as e:
            raise APIError(422, str(e), "invalid_request_error") from None

    def usage(out, prompt_len: int, texts: list[tuple[str | None, str]]) -> dict:
        completion = sum(len(o.token_ids) for o in out.outputs)
        reasoning = sum(len(tokenizer.encode(r, add_special_tokens=False)) for r, _ in texts if r) if tokenizer else 0
        hit = out.metrics.prompt_cache_hit_tokens
        u = {"prompt_tokens": prompt_len, "completion_tokens": completion, "total_tokens": prompt_len + completion,
             "prompt_cache_hit_tokens": hit, "prompt_cache_miss_tokens": prompt_len - hit,
             "completion_tokens_details": {"reasoning_tokens": reasoning}}
        if config.prices is not None:
            u["cost"] = round(config.prices.cost(hit, prompt_len - hit, completion), 10)
        return u

    def logprobs_content(entries: list[dict] | None) -> dict | None:
        if entries is None:
            return None

        def clean(e):
            return {"token": e["token"], "logprob": e["logprob"], "bytes": e["bytes"]}

        return {"content": [{**clean(e), "top_logprobs": [clean(t) for t in e.get("top_logprobs", [])]}
                            for e in entries]}

    class Choice:
        """Per-choice text state: policy cut, reasoning split, what was already streamed."""

        def __init__(self, index: int, reasoning_start: bool):
            self.index = index
            self.reasoning_start = reasoning_start
            self.sent_reasoning = self.sent_content = 0
            self.finish: str | None = None
            self.rule = None
            self.text = ""
            self.searched = 0  # output-rule search covered the text before this index
            self.logprobs_sent = 0
            self.reported = False  # its finish_reason was sent (streaming)

        def update(self, o, final_engine: bool) -> tuple[str, str]:
            text = o.text
            final = final_engine or o.finished
            if policy and policy.output_rules and self.finish is None:
                hit = policy.check_output(text, self.searched)
                self.searched = len(text)
                if hit:
                    self.rule, cut = hit
                    text, final = text[:cut], True
                    self.finish = "content_filter"
            if self.finish is None and o.finished:
                self.finish = "length" if o.finish_reason == "length" else "stop"
            shown = policy.visible(text, final) if policy else text
            self.text = shown
            if engine.reasoning:
                return split_reasoning(shown, self.reasoning_start, final)
            return "", shown

    async def run_request(request: Request, prompt, params: SamplingParams, request_id: str):
        """Engine outputs of one request, with None whenever `keepalive_seconds` pass without one (a chance to
        send keep-alives). A task listens for the client's http.disconnect the whole time, so a client that
        hangs up (streaming or not) ends the request at once; iteration stopping early for any reason
        (disconnect, cancellation, policy cut) aborts the request, freeing its blocks."""
        try:
            stream = llm.submit(prompt, params, request_id)
        except EngineDeadError:
            raise APIError(503, "the engine is not running", "service_unavailable", "engine_dead") from None
        except InvalidRequestError as e:
            raise APIError(422, str(e), "invalid_request_error") from None
        gone = asyncio.create_task(client_gone(request))
        try:
            while True:
                pending = asyncio.ensure_future(stream.next(timeout=config.keepalive_seconds))
                await asyncio.wait({pending, gone}, return_when=asyncio.FIRST_COMPLETED)
                if gone.done():
                    pending.cancel()
                    return
                try:
                    out = pending.result()
                except RequestFailedError as e:
                    log.error("request %s failed inside the engine: %s", request_id, e)
                    raise APIError(500, f"generation failed inside the engine ({e}); other requests are unaffected, "
                                        "retry this one", "server_error", "engine_fault") from None
                yield out
                if out is not None and out.finished:
                    return
        finally:
            gone.cancel()
            stream.close()

    async def collect(request: Request, prompt_ids, params, request_id: str, choices: list, headers: dict):
        """Non-streaming: runs the request to the end (or to a policy cut); None if the client went away.
        Sets the policy header and audits an output cut."""
        last = None
        async for out in run_request(request, prompt_ids, params, request_id):
            if out is None:
                continue
            last = out
            for c, o in zip(choices, out.outputs):
                c.update(o, out.finished)
            if all(c.finish for c in choices):
                break
        rule = next((c.rule for c in choices if c.rule), None)
        if last is not None and rule is not None:
            earlier = headers.get("X-Nanoseek-Policy")
            headers["X-Nanoseek-Policy"] = f"{earlier}, {policy.header(rule)}" if earlier else policy.header(rule)
            policy.audit(request_id, rule, "cut", "output", None)
        return last

    def input_filter(text: str, request_id: str):
        if policy is None:
            return None
        rule = policy.check_input(text)
        if rule is not None:
            policy.audit(request_id, rule, "blocked", "input", text)
        return rule

    # ------------------------------------------------------------ chat
    async def chat(request: Request):
        req = await read_request(request, ChatCompletionRequest)
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", "invalid_request_error")
        if req.tools:
            raise APIError(422, "invalid parameter 'tools': tool calling is not supported yet", "invalid_request_error")
        check_model(req.model)
        check_capacity()
        if tokenizer is None or tokenizer.chat_template is None:
            raise APIError(422, "this model has no chat template: use /v1/completions", "invalid_request_error")
        request_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        interventions = []
        if policy and policy.system_prompt:
            messages = policy.with_system_prompt(messages, request_id)
            interventions.append(SYSTEM_PROMPT)
        # Template and tokenizer work scale with the request: a worker thread, never the event loop.
        prompt_text = await run_in_threadpool(tokenizer.apply_chat_template, messages, add_generation_prompt=True,
                                              tokenize=False)
        prompt_ids = await run_in_threadpool(tokenizer.encode, prompt_text, add_special_tokens=False)
        processors = []
        if req.response_format and req.response_format.type == "json_object":
            processors = [JsonObjectProcessor(tokenizer, engine.eos_ids)]
            if req.n > 1:
                raise APIError(422, "invalid parameter 'n': JSON mode supports n = 1", "invalid_request_error")
        top = (req.top_logprobs or 0) if req.logprobs else None
        params = sampling(req, len(prompt_ids), top, processors)
        created = int(time.time())
        model = req.model or config.model_name
        blocked = await run_in_threadpool(input_filter, "\n".join(m["content"] for m in messages), request_id)
        interventions += [blocked] if blocked else []
        headers = {"X-Nanoseek-Policy": policy.header(*interventions)} if interventions else {}
        from ..engine.text import starts_in_reasoning

        reasoning_start = starts_in_reasoning(prompt_text[-64:])
        metrics.requests_started.inc()

        if req.stream:
            events = chat_stream(request, req, prompt_ids, params, request_id, created, model, blocked,
                                 reasoning_start)
            return StreamingResponse(sse_errors(events), media_type="text/event-stream", headers=headers)
        if blocked:
            metrics.requests.labels("/v1/chat/completions", "200").inc()
            return JSONResponse({"id": request_id, "object": "chat.completion", "created": created, "model": model,
                                 "system_fingerprint": fingerprint,
                                 "choices": [{"index": i, "message": {"role": "assistant", "content": "",
                                                                      "reasoning_content": None},
                                              "logprobs": None, "finish_reason": "content_filter"}
                                             for i in range(req.n)],
                                 "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": 0,
                                           "total_tokens": len(prompt_ids), "prompt_cache_hit_tokens": 0,
                                           "prompt_cache_miss_tokens": len(prompt_ids),
                                           "completion_tokens_details": {"reasoning_tokens": 0}}},
                                headers=headers)
        choices = [Choice(i, reasoning_start) for i in range(req.n)]
        start = time.monotonic()
        last = await collect(request, prompt_ids, params, request_id, choices, headers)
        if last is None:  # client went away
            return Response(status_code=499)
        results = []
        texts = []
        for c, o in zip(choices, last.outputs):
            reasoning, content = c.update(o, True) if c.finish != "content_filter" else \
                (split_reasoning(c.text, c.reasoning_start, True) if engine.reasoning else ("", c.text))
            texts.append((reasoning, content))
            message = {"role": "assistant", "content": content,
                       "reasoning_content": reasoning if engine.reasoning else None}
            results.append({"index": c.index, "message": message, "logprobs": logprobs_content(o.logprobs),
                            "finish_reason": c.finish or "stop"})
        u = usage(last, len(prompt_ids), texts)
        metrics.observe_request(last, len(prompt_ids), u["completion_tokens"], start)
        metrics.requests.labels("/v1/chat/completions", "200").inc()
        return JSONResponse({"id": request_id, "object": "chat.completion", "created": created, "model": model,
                             "system_fingerprint": fingerprint, "choices": results, "usage": u}, headers=headers)

    async def chat_stream(request, req, prompt_ids, params, request_id, created, model, blocked, reasoning_start):
        def chunk(choices, usage_=None):
            body = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                    "system_fingerprint": fingerprint, "choices": choices}
            if usage_ is not None:
                body["usage"] = usage_
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for i in range(req.n)])
        if blocked:
            yield chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": "content_filter"}
                         for i in range(req.n)])
            if include_usage:
                yield chunk([], {"prompt_tokens": len(prompt_ids), "completion_tokens": 0,
                                 "total_tokens": len(prompt_ids), "prompt_cache_hit_tokens": 0,
                                 "prompt_cache_miss_tokens": len(prompt_ids),
                                 "completion_tokens_details": {"reasoning_tokens": 0}})
            yield "data: [DONE]\n\n"
            metrics.requests.labels("/v1/chat/completions", "200").inc()
            return
        choices = [Choice(i, reasoning_start) for i in range(req.n)]
        last = None
        start = time.monotonic()
        got_token = False
        async for out in run_request(request, prompt_ids, params, request_id):
            if out is None:
                if not got_token:
                    yield ": keep-alive\n\n"
                continue
            last = out
            deltas = []
            for c, o in zip(choices, out.outputs):
                if c.reported:
                    continue
                reasoning, content = c.update(o, out.finished)
                delta = {}
                if engine.reasoning and len(reasoning) > c.sent_reasoning:
                    delta["reasoning_content"] = reasoning[c.sent_reasoning:]
                    c.sent_reasoning = len(reasoning)
                if len(content) > c.sent_content:
                    delta["content"] = content[c.sent_content:]
                    c.sent_content = len(content)
                lp = None
                if o.logprobs is not None and len(o.logprobs) > c.logprobs_sent:
                    lp = logprobs_content(o.logprobs[c.logprobs_sent:])
                    c.logprobs_sent = len(o.logprobs)
                if delta or c.finish:
                    deltas.append({"index": c.index, "delta": delta, "logprobs": lp, "finish_reason": c.finish})
                    if c.finish:
                        c.reported = True
                        if c.rule is not None:
                            policy.audit(request_id, c.rule, "cut", "output", None)
            if deltas:
                got_token = True
                yield chunk(deltas)
            if all(c.reported for c in choices):
                break
        if last is None:
            return
        if include_usage:
            texts = [(split_reasoning(c.text, c.reasoning_start, True) if engine.reasoning else ("", c.text))
                     for c in choices]
            u = usage(last, len(prompt_ids), texts)
            yield chunk([], u)
        metrics.observe_request(last, len(prompt_ids), sum(len(o.token_ids) for o in last.outputs), start)
        metrics.requests.labels("/v1/chat/completions", "200").inc()
        yield "data: [DONE]\n\n"

    # ------------------------------------------------------------ completions
    async def completions(request: Request):
        req = await read_request(request, CompletionRequest)
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", "invalid_request_error")
        check_model(req.model)
        check_capacity()
        request_id = f"cmpl-{uuid.uuid4().hex[:24]}"
        if isinstance(req.prompt, list):
            if req.suffix is not None:
                raise APIError(422, "invalid parameter 'suffix': fill-in-the-middle needs a text prompt, not token ids",
                               "invalid_request_error")
            if any(t < 0 or t >= engine.config.vocab_size for t in req.prompt):  # before anything decodes them
                raise APIError(422, f"invalid parameter 'prompt': token ids must be in [0, {engine.config.vocab_size})",
                               "invalid_request_error")
            prompt_ids = list(req.prompt)
            prompt_text = tokenizer.decode(prompt_ids) if tokenizer else ""
        else:
            if tokenizer is None:
                raise APIError(422, "this model has no tokenizer: send the prompt as token ids",
                               "invalid_request_error")
            prompt_text = req.prompt
            if req.suffix is not None:
                if any(tokenizer.token_to_id(t) is None for t in FIM_TOKENS):
                    raise APIError(422, "invalid parameter 'suffix': this model's tokenizer has no fill-in-the-middle "
                                        "tokens", "invalid_request_error", "fim_unsupported")
                begin, hole, end = FIM_TOKENS
                prompt_text = f"{begin}{req.prompt}{hole}{req.suffix}{end}"
            prompt_ids = await run_in_threadpool(tokenizer.encode, prompt_text)
        if any(t < 0 or t >= engine.config.vocab_size for t in prompt_ids):
            raise APIError(422, f"invalid parameter 'prompt': token ids must be in [0, {engine.config.vocab_size})",
                           "invalid_request_error")
        params = sampling(req, len(prompt_ids), req.logprobs, [])
        blocked = await run_in_threadpool(input_filter, prompt_text, request_id)
        headers = {"X-Nanoseek-Policy": policy.header(blocked)} if blocked else {}
        created = int(time.time())
        model = req.model or config.model_name
        metrics.requests_started.inc()

        def body_for(texts, finishes, out, logprobs):
            choices = [{"index": i, "text": t, "logprobs": lp, "finish_reason": f}
                       for i, (t, f, lp) in enumerate(zip(texts, finishes, logprobs))]
            return {"id": request_id, "object": "text_completion", "created": created, "model": model,
                    "system_fingerprint": fingerprint, "choices": choices}

        if blocked:
            if req.stream:
                async def blocked_stream():
                    yield f"data: {json.dumps(body_for([''] * req.n, ['content_filter'] * req.n, None, [None] * req.n))}\n\n"
                    yield "data: [DONE]\n\n"

                return StreamingResponse(blocked_stream(), media_type="text/event-stream", headers=headers)
            return JSONResponse({**body_for([""] * req.n, ["content_filter"] * req.n, None, [None] * req.n),
                                 "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": 0,
                                           "total_tokens": len(prompt_ids)}}, headers=headers)

        choices = [Choice(i, False) for i in range(req.n)]

        def legacy_logprobs(entries):
            if entries is None:
                return None
            return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                    "top_logprobs": [{t["token"]: t["logprob"] for t in e.get("top_logprobs", [])} for e in entries]}

        if req.stream:
            async def stream():
                sent = [0] * req.n
                last = None
                include_usage = bool(req.stream_options and req.stream_options.include_usage)
                async for out in run_request(request, prompt_ids, params, request_id):
                    if out is None:
                        yield ": keep-alive\n\n"
                        continue
                    last = out
                    for c, o in zip(choices, out.outputs):
                        if c.reported:
                            continue
                        c.update(o, out.finished)  # completions stream raw text: c.text (policy-cut)
                        if len(c.text) > sent[c.index] or c.finish:
                            piece = c.text[sent[c.index]:]
                            sent[c.index] = len(c.text)
                            c.reported = c.finish is not None
                            choice = {"index": c.index, "text": piece, "logprobs": None, "finish_reason": c.finish}
                            yield f"data: {json.dumps({**body_for([], [], None, []), 'choices': [choice]})}\n\n"
                    if all(c.reported for c in choices):
                        break
                if last is not None and include_usage:
                    u = usage(last, len(prompt_ids), [])
                    yield f"data: {json.dumps({**body_for([], [], None, []), 'choices': [], 'usage': u})}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(sse_errors(stream()), media_type="text/event-stream", headers=headers)

        start = time.monotonic()
        last = await collect(request, prompt_ids, params, request_id, choices, headers)
        if last is None:  # client went away
            return Response(status_code=499)
        texts = [c.text for c in choices]
        finishes = [c.finish or "stop" for c in choices]
        u = usage(last, len(prompt_ids), [])
        metrics.observe_request(last, len(prompt_ids), u["completion_tokens"], start)
        metrics.requests.labels("/v1/completions", "200").inc()
        return JSONResponse({**body_for(texts, finishes, last, [legacy_logprobs(o.logprobs) for o in last.outputs]),
                             "usage": u}, headers=headers)

    # ------------------------------------------------------------ routes
    for path in ("/v1/chat/completions", "/chat/completions"):
        app.add_api_route(path, chat, methods=["POST"])
    for path in ("/v1/completions", "/completions", "/beta/completions"):
        app.add_api_route(path, completions, methods=["POST"])

    async def models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                            "owned_by": "nanoseek"}]}

    async def pricing():
        if config.prices is None:
            raise APIError(404, "pricing is off: start the server with --cost-per-hour", "invalid_request_error",
                           "pricing_disabled")
        return config.prices.table()

    for path in ("/v1/models", "/models"):
        app.add_api_route(path, models, methods=["GET"])
    for path in ("/v1/pricing", "/pricing"):
        app.add_api_route(path, pricing, methods=["GET"])

    @app.get("/health")
    async def health():
        if llm.error is not None:
            return _error(503, "the engine is not running", "service_unavailable", "engine_dead")
        return {"status": "ok", "model": config.model_name}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(engine.stats()), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def index():
        return FileResponse(WEB_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
    return app


__all__ = ["create_app", "ServeConfig", "NanoseekError", "EngineDeadError"]
