"""FastAPI application: OpenAI/DeepSeek-compatible routes on the async engine.

Routes: POST /v1/chat/completions (+ /chat/completions), POST /v1/completions (+ /completions and DeepSeek's
/beta/completions for fill-in-the-middle), GET /v1/models (+ /models), GET /v1/pricing (+ /pricing),
GET /v1/usage (+ /usage: the caller's totals from the usage ledger), GET /metrics, GET /health, GET / (the chat
page, static). With API keys (--api-key, or --api-keys FILE for many users) every route but /health and the
page needs `Authorization: Bearer KEY` (hashed, compared in constant time).

The house: guard.py (the gate: key, body limit, shutdown), errors.py (one error shape), protocol.py (request
shapes and the body parser), service.py (checks, sampling parameters, usage, running one request on the
engine), chat.py and completions.py (the two POST routes and their JSON and SSE renderers), conversation.py
(messages, tools and prefixes to a prompt), tools.py (tool-call formats: render, constrain, parse), grammar.py
(constrained decoding through llguidance), accounts.py (keys, rate limits, quotas), ledger.py (the SQLite
usage ledger), admin.py (weight pushes from a trainer, with --admin-key), policy.py (the operator's moderation layer). Each request reads its metrics (cache hits, timings) from the engine's outputs
and the engine's public stats, never from engine internals.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from .. import __version__
from ..engine import AsyncLLM, EngineDeadError
from ..errors import NanoseekError
from .admin import install_admin_routes
from .chat import chat
from .completions import completions
from .errors import APIError, error_response, install_error_handlers
from .guard import GuardMiddleware
from .service import ServeConfig, Service

WEB_DIR = Path(__file__).parent / "web"


def create_app(llm: AsyncLLM, config: ServeConfig) -> FastAPI:
    app = FastAPI(title="nanoseek", version=__version__, docs_url=None, redoc_url=None)
    service = Service(llm, config)
    app.state.llm, app.state.config, app.state.service = llm, config, service
    app.state.metrics = service.metrics
    app.state.shutting_down = False
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["*"],
                           allow_headers=["*"])
    app.add_middleware(GuardMiddleware, app_state=app.state, config=config)
    install_error_handlers(app, service.metrics)

    async def chat_route(request: Request):
        return await chat(service, request)

    async def completions_route(request: Request):
        return await completions(service, request)

    async def models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                            "owned_by": "nanoseek"}]}

    async def pricing():
        if config.prices is None:
            raise APIError(404, "pricing is off: start the server with --cost-per-hour", "invalid_request_error",
                           "pricing_disabled")
        return config.prices.table()

    async def usage(request: Request, start: str | None = None, end: str | None = None):
        return await run_in_threadpool(usage_report, config, getattr(request.state, "account", None), start, end)

    for paths, endpoint, method in ((("/v1/usage", "/usage"), usage, "GET"),
                                    (("/v1/chat/completions", "/chat/completions"), chat_route, "POST"),
                                    (("/v1/completions", "/completions", "/beta/completions"), completions_route,
                                     "POST"),
                                    (("/v1/models", "/models"), models, "GET"),
                                    (("/v1/pricing", "/pricing"), pricing, "GET")):
        for path in paths:
            app.add_api_route(path, endpoint, methods=[method])

    install_admin_routes(app, service)

    @app.get("/health")
    async def health():
        if llm.error is not None:
            return error_response(503, "the engine is not running", "service_unavailable", "engine_dead")
        return {"status": "ok", "model": config.model_name}

    @app.get("/metrics")
    async def prometheus():
        return Response(service.metrics.render(llm.engine.stats()), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def index():
        return FileResponse(WEB_DIR / "index.html")

    @app.get("/favicon.ico")
    async def favicon():  # browsers ask for it whatever the page says
        return FileResponse(WEB_DIR / "favicon.svg", media_type="image/svg+xml")

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
    return app


def parse_time(value: str | None, name: str) -> float | None:
    """Unix seconds or an ISO date/time (UTC when no zone is given)."""
    if value is None or value == "":
        return None
    try:
        return float(value)
    except ValueError:
        pass
    from datetime import datetime, timezone

    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        raise APIError(400, f"invalid parameter '{name}': {value[:40]!r} is neither unix seconds nor an ISO date "
                            "(e.g. 2026-12-01 or 2026-12-01T12:00:00Z)", "invalid_request_error") from None
    return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp()


def usage_report(config: ServeConfig, account, start: str | None, end: str | None) -> dict:
    """GET /v1/usage: the caller's totals from the ledger between start and end (an admin key sees every key)."""
    if config.ledger is None:
        raise APIError(404, "the usage ledger is off: start the server with --ledger FILE", "invalid_request_error",
                       "ledger_disabled")
    t0, t1 = parse_time(start, "start"), parse_time(end, "end")
    everyone = account is None or account.admin
    by_key = config.ledger.totals(t0, t1, None if everyone else account.name)
    from .ledger import COLUMNS, empty_totals

    total = empty_totals()
    for row in by_key.values():
        for c in COLUMNS:
            total[c] += row[c]
    total["cost"] = round(total["cost"], 10)
    return {"object": "usage", "start": t0, "end": t1, "key": account.name if account else None,
            "data": [{"key_name": k, **v} for k, v in by_key.items()], "total": total}


__all__ = ["create_app", "ServeConfig", "NanoseekError", "EngineDeadError"]
