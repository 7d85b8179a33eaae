"""FastAPI application: OpenAI/DeepSeek-compatible routes on the async engine.

Routes: POST /v1/chat/completions (+ /chat/completions), POST /v1/completions (+ /completions and DeepSeek's
/beta/completions for fill-in-the-middle), GET /v1/models (+ /models), GET /v1/pricing (+ /pricing),
GET /metrics, GET /health, GET / (the chat page, static). With an API key every route but /health and the page
needs `Authorization: Bearer KEY` (compared in constant time).

The house: guard.py (the gate: key, body limit, shutdown), errors.py (one error shape), protocol.py (request
shapes and the body parser), service.py (checks, sampling parameters, usage, running one request on the
engine), chat.py and completions.py (the two POST routes and their JSON and SSE renderers), policy.py (the
operator's moderation layer). Each request reads its metrics (cache hits, timings) from the engine's outputs
and the engine's public stats, never from engine internals.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles

from .. import __version__
from ..engine import AsyncLLM, EngineDeadError
from ..errors import NanoseekError
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

    for paths, endpoint, method in ((("/v1/chat/completions", "/chat/completions"), chat_route, "POST"),
                                    (("/v1/completions", "/completions", "/beta/completions"), completions_route,
                                     "POST"),
                                    (("/v1/models", "/models"), models, "GET"),
                                    (("/v1/pricing", "/pricing"), pricing, "GET")):
        for path in paths:
            app.add_api_route(path, endpoint, methods=[method])

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

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
    return app


__all__ = ["create_app", "ServeConfig", "NanoseekError", "EngineDeadError"]
