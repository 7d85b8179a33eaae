"""One error shape for every failure: `{"error": {"message", "type", "code"}}` with the right status, for the
API's own refusals, pydantic validation, unknown routes and methods, and anything unexpected (never a
traceback)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .protocol import error_body

log = logging.getLogger("nanoseek.serve")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str, code: str | None = None, headers: dict | None = None):
        self.status, self.message, self.type, self.code, self.headers = status, message, type_, code, headers


def error_response(status: int, message: str, type_: str, code=None, headers=None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, code), status_code=status, headers=headers)


def validation_message(exc: RequestValidationError) -> tuple[int, str]:
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


def install_error_handlers(app: FastAPI, metrics) -> None:
    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError):
        status, message = validation_message(exc)
        metrics.requests.labels(request.url.path, str(status)).inc()
        return error_response(status, message, "invalid_request_error")

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError):
        metrics.requests.labels(request.url.path, str(exc.status)).inc()
        return error_response(exc.status, exc.message, exc.type, exc.code, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        # Unknown routes (404) and wrong methods (405) answer in the same error shape as everything else; one
        # metrics label for all of them (a path per label would let clients grow the metrics without bound).
        metrics.requests.labels("unmatched", str(exc.status_code)).inc()
        message = {404: f"no route {request.url.path}: see GET /v1/models and POST /v1/chat/completions",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return error_response(exc.status_code, message, "invalid_request_error",
                              {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code), exc.headers)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        metrics.requests.labels(request.url.path, "500").inc()
        return error_response(500, "internal server error", "server_error")
