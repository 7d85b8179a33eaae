"""What the routes share: the server's configuration, request parsing, checks that need the engine, sampling
parameters, usage, and the pipeline that runs one request on the engine (submit, listen for the client's
hang-up, turn engine faults into errors, abort whatever stops early)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from dataclasses import dataclass, field

import torch
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool

from .. import __version__
from ..engine.text import THINK_CLOSE
from ..engine import AsyncLLM, EngineDeadError, InvalidRequestError, RequestFailedError, SamplingParams
from .errors import APIError
from .metrics import ServerMetrics
from .policy import Policy
from .pricing import Prices
from .protocol import BadRequest, error_body, parse_json

log = logging.getLogger("nanoseek.serve")


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
    admin_key: str | None = None  # enables /admin (weight pushes from a trainer)
    accounts: object = None  # accounts.Accounts: many keys with limits (--api-keys); None = open or one key
    ledger: object = None  # ledger.Ledger: the usage ledger (--ledger)

    def __post_init__(self):
        if self.api_key and self.accounts is None:  # --api-key: the one-key shortcut
            from .accounts import Accounts

            self.accounts = Accounts.single(self.api_key)


async def read_request(request: Request, model):
    """The body parsed (protocol.parse_json: 400 on malformed input) and validated as `model` (422), both on a
    worker thread: a 1 MB body is work the event loop must not do."""
    from pydantic import ValidationError

    raw = await request.body()
    try:
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


@dataclass
class Prepared:
    """One request, ready for the engine: what its renderers need besides the engine's outputs."""
    req: object  # the validated ChatCompletionRequest or CompletionRequest
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    blocked: object  # the policy's input rule that fired, or None
    headers: dict
    created: int
    model: str
    tools: object = None  # chat: the ToolFormat the reply is parsed with when tools are active
    account: object = None  # the accounts.Account that sent it (None without keys)
    started: float = 0.0


class Service:
    def __init__(self, llm: AsyncLLM, config: ServeConfig):
        self.llm, self.config, self.policy = llm, config, config.policy
        self.engine, self.tokenizer = llm.engine, llm.tokenizer
        self.metrics = ServerMetrics()
        self.grammars = None  # grammar.Grammars, made on the first constrained request
        self.weights_version = 0  # set by admin weight pushes
        self.fingerprint = "fp_" + hashlib.sha256(f"{__version__}/{config.model_name}".encode()).hexdigest()[:10]

    # ---- checks ----
    def check_model(self, name: str | None) -> None:
        policy, served = self.policy, self.config.model_name
        if name and name != served and not (policy and name in policy.allowed_models):
            raise APIError(404, f"model '{name}' does not exist: this server serves '{served}'",
                           "invalid_request_error", "model_not_found")
        if policy and policy.allowed_models and name and name not in policy.allowed_models:
            raise APIError(404, f"model '{name}' is not allowed by the server policy", "invalid_request_error",
                           "model_not_allowed")

    def check_capacity(self) -> None:
        if self.llm.error is not None:
            raise APIError(503, "the engine is not running", "service_unavailable", "engine_dead")
        if self.engine.stats()["num_waiting"] >= self.config.max_queue:
            raise APIError(429, f"the request queue is full ({self.config.max_queue} waiting): retry shortly",
                           "rate_limit_error", "queue_full", {"Retry-After": "1"})

    def input_filter(self, text: str, request_id: str):
        if self.policy is None:
            return None
        rule = self.policy.check_input(text)
        if rule is not None:
            self.policy.audit(request_id, rule, "blocked", "input", text)
        return rule

    def admit(self, request: Request, p: Prepared) -> None:
        """The caller's account (set by the guard) may start this request: its model, rate limits and quotas
        (403/429 otherwise). Counted from here on."""
        import time

        p.account, p.started = getattr(request.state, "account", None), time.time()
        if self.config.admin_key:  # which pushed weights answer this request (rollout staleness checks)
            p.headers["X-Nanoseek-Weights-Version"] = str(self.weights_version)
        if p.account is not None and self.config.accounts is not None:
            self.config.accounts.admit(p.account, p.model, len(p.prompt_ids))

    def account_usage(self, p: Prepared, route: str, usage: dict, status: int = 200) -> None:
        """A finished request in the ledger (committed before its usage reaches the client) and against its
        account's limits. Runs on a worker thread."""
        total = usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0)
        if p.account is not None and self.config.accounts is not None:
            self.config.accounts.charge(p.account, usage.get("completion_tokens", 0), total, usage.get("cost", 0.0))
        if self.config.ledger is not None:
            name = p.account.name if p.account is not None else "anonymous"
            self.config.ledger.record(p.request_id, name, p.model, route, status, usage, p.started)

    # ---- parameters and usage ----
    def max_tokens(self, req, prompt_len: int) -> int:
        """The request's max_tokens within what fits: the context after the prompt, and the policy's caps."""
        policy, context = self.policy, self.engine.max_model_len
        if policy and policy.max_prompt_tokens and prompt_len > policy.max_prompt_tokens:
            raise APIError(422, f"prompt has {prompt_len} tokens; the server policy allows at most "
                                f"{policy.max_prompt_tokens}", "invalid_request_error", "prompt_too_long")
        if prompt_len >= context:
            raise APIError(422, f"prompt has {prompt_len} tokens but the context is {context}: shorten it",
                           "invalid_request_error", "context_length_exceeded")
        wanted = getattr(req, "max_completion_tokens", None) or req.max_tokens
        limit = min(context - prompt_len, policy.max_tokens) if policy and policy.max_tokens else context - prompt_len
        if wanted is None:
            return min(limit, self.config.default_max_tokens)
        if wanted > limit:
            raise APIError(422, f"invalid parameter 'max_tokens': {wanted} exceeds what fits (allowed: at most "
                                f"{limit} = context {context} - prompt {prompt_len}"
                                + (", and the policy's cap" if policy and policy.max_tokens else "") + ")",
                           "invalid_request_error", "max_tokens_too_large")
        return wanted

    def grammar_processor(self, grammar: tuple[str, object], in_reasoning: bool):
        """A logits processor for ("json", schema) or ("lark", grammar text); 400 on what cannot be compiled."""
        from .grammar import Grammars

        if self.grammars is None:
            self.grammars = Grammars(self.tokenizer, self.engine.config.vocab_size, self.engine.eos_ids)
        kind, value = grammar
        compiled = self.grammars.json_schema(value) if kind == "json" else self.grammars.lark(value)
        self.grammars.check(compiled, "response_format.json_schema" if kind == "json" else "tools")
        close = self.tokenizer.token_to_id(THINK_CLOSE)
        return self.grammars.processor(compiled, reasoning=in_reasoning, think_close_id=close)

    def sampling(self, req, prompt_len: int, logprobs: int | None, processors: list,
                 skip_special_tokens: bool = True) -> SamplingParams:
        if req.logit_bias:
            vocab = self.engine.config.vocab_size
            bias = {int(k): v for k, v in req.logit_bias.items()}
            if max(bias) >= vocab:
                raise APIError(422, f"invalid parameter 'logit_bias': token id {max(bias)} is not in [0, {vocab})",
                               "invalid_request_error")
            processors = [LogitBias(bias)] + processors  # before any grammar: a bias never unmasks a token
        try:
            return SamplingParams(n=req.n, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                                  max_tokens=self.max_tokens(req, prompt_len), stop=req.stop,
                                  presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                                  logprobs=logprobs, logits_processors=processors, top_k=req.top_k,
                                  min_p=req.min_p, repetition_penalty=req.repetition_penalty,
                                  min_tokens=req.min_tokens, ignore_eos=req.ignore_eos,
                                  skip_special_tokens=skip_special_tokens, logprobs_mode=req.logprobs_mode,
                                  output_filter=self.policy.output_filter() if self.policy else None)
        except InvalidRequestError as e:
            raise APIError(422, str(e), "invalid_request_error") from None

    def usage(self, out, prompt_len: int, texts: list[tuple[str | None, str]]) -> dict:
        completion = sum(len(o.token_ids) for o in out.outputs)
        tok = self.tokenizer
        reasoning = sum(len(tok.encode(r, add_special_tokens=False)) for r, _ in texts if r) if tok else 0
        hit = out.metrics.prompt_cache_hit_tokens
        u = {"prompt_tokens": prompt_len, "completion_tokens": completion, "total_tokens": prompt_len + completion,
             "prompt_cache_hit_tokens": hit, "prompt_cache_miss_tokens": prompt_len - hit,
             "completion_tokens_details": {"reasoning_tokens": reasoning}}
        if self.config.prices is not None:
            u["cost"] = round(self.config.prices.cost(hit, prompt_len - hit, completion), 10)
        return u

    # ---- running a request ----
    async def run_request(self, request: Request, prompt, params: SamplingParams, request_id: str):
        """Engine outputs of one request, with None whenever `keepalive_seconds` pass without one (a chance to
        send keep-alives). A task listens for the client's http.disconnect the whole time, so a client that
        hangs up (streaming or not) ends the request at once; iteration stopping early for any reason
        (disconnect, cancellation, policy cut) aborts the request, freeing its blocks."""
        try:
            stream = self.llm.submit(prompt, params, request_id)
        except EngineDeadError:
            raise APIError(503, "the engine is not running", "service_unavailable", "engine_dead") from None
        except InvalidRequestError as e:
            raise APIError(422, str(e), "invalid_request_error") from None
        gone = asyncio.create_task(client_gone(request))
        try:
            while True:
                pending = asyncio.ensure_future(stream.next(timeout=self.config.keepalive_seconds))
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

    async def collect(self, request: Request, prompt_ids, params, request_id: str, choices: list, headers: dict):
        """Non-streaming: runs the request to the end; None if the client went away. Sets the policy header and
        audits an output cut."""
        last = None
        async for out in self.run_request(request, prompt_ids, params, request_id):
            if out is None:
                continue
            last = out
            for c, o in zip(choices, out.outputs):
                c.update(o)
        rule = next((c.rule for c in choices if c.rule), None)
        if last is not None and rule is not None:
            earlier = headers.get("X-Nanoseek-Policy")
            headers["X-Nanoseek-Policy"] = f"{earlier}, {self.policy.header(rule)}" if earlier else \
                self.policy.header(rule)
            self.policy.audit(request_id, rule, "cut", "output", None)
        return last


class LogitBias:
    """OpenAI's logit_bias as a logits processor."""

    def __init__(self, bias: dict[int, float]):
        self.ids = torch.tensor(list(bias), dtype=torch.long)
        self.values = torch.tensor(list(bias.values()), dtype=torch.float32)

    def __call__(self, output_ids, logits):
        logits[self.ids] += self.values.to(logits.device)
        return logits


class Choice:
    """One choice as the engine reports it (text, its reasoning/content split, the policy's cut) and how much of it
    was already streamed."""

    def __init__(self, service: Service, index: int):
        self.policy = service.policy
        self.index = index
        self.sent_reasoning = self.sent_content = 0
        self.finish: str | None = None
        self.rule = None  # the policy output rule that cut this choice
        self.text = self.reasoning = self.content = ""
        self.logprobs_sent = 0
        self.reported = False  # its finish_reason was sent (streaming)

    def update(self, o) -> None:
        self.text = o.text
        self.reasoning, self.content = (o.reasoning_content or "", o.content or "") if o.content is not None \
            else ("", o.text)
        if self.finish is None and o.finished:
            self.finish = o.finish_reason if o.finish_reason in ("length", "content_filter") else "stop"
            if o.finish_reason == "content_filter":
                self.rule = self.policy.output_rule(o.stop_reason)


def empty_usage(prompt_len: int) -> dict:
    """The usage of a request answered without generating (the policy blocked its input)."""
    return {"prompt_tokens": prompt_len, "completion_tokens": 0, "total_tokens": prompt_len,
            "prompt_cache_hit_tokens": 0, "prompt_cache_miss_tokens": prompt_len,
            "completion_tokens_details": {"reasoning_tokens": 0}}


def logprobs_content(entries: list[dict] | None) -> dict | None:
    """The chat API's logprobs object for engine log-prob entries."""
    if entries is None:
        return None

    def clean(e):
        return {"token": e["token"], "logprob": e["logprob"], "bytes": e["bytes"]}

    return {"content": [{**clean(e), "top_logprobs": [clean(t) for t in e.get("top_logprobs", [])]}
                        for e in entries]}
