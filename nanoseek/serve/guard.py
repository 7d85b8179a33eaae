"""The gate every HTTP request passes first (pure ASGI, so streaming and disconnects pass through untouched)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .errors import APIError, error_response

if TYPE_CHECKING:
    from .service import ServeConfig

log = logging.getLogger("nanoseek.serve")
OPEN_PATHS = ("/health", "/", "/index.html", "/favicon.ico")


def bearer_token(authorization: str) -> str:
    """The token of an `Authorization: Bearer TOKEN` header value ("" when there is none)."""
    return authorization[7:] if authorization.lower().startswith("bearer ") else ""


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
        accounts = config.accounts
        # /admin authenticates itself with the admin key (before reading a body that may be a whole model).
        admin = config.admin_key is not None and path.startswith("/admin/")
        if accounts is not None and not (path in OPEN_PATHS or path.startswith("/static/") or admin) and \
                scope["method"] != "OPTIONS":
            account = accounts.find(bearer_token(headers.get("authorization", "")))  # hashed, compared with every key in constant time
            if account is None:
                reply = error_response(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                                       "authentication_error", "invalid_api_key")
            scope.setdefault("state", {})["account"] = account
        length = headers.get("content-length", "")
        if reply is None and not admin and length.isdigit() and int(length) > config.max_body_bytes:
            reply = error_response(413, f"request body of {length} bytes exceeds the limit of {config.max_body_bytes}",
                           "invalid_request_error", "body_too_large")
        if reply is None and self.state.shutting_down and path not in OPEN_PATHS:
            reply = error_response(503, "the server is shutting down", "service_unavailable", "shutting_down")
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
                if received > config.max_body_bytes and not admin:
                    raise APIError(413, f"request body exceeds the limit of {config.max_body_bytes} bytes",
                                   "invalid_request_error", "body_too_large")
            return message

        try:
            await self.app(scope, counting_receive, tracking_send)
        except Exception:
            log.exception("unhandled error on %s", path)
            if not started:
                await error_response(500, "internal server error", "server_error")(scope, receive, send)
