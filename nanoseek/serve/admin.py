"""The admin routes a trainer uses to push new weights into a serving engine (GRPO's rollout servers, as TRL
drives a vLLM server). They exist only with `--admin-key`: without it every /admin path is a 404.

    POST /admin/weights?version=N   body: a safetensors file of the model's state dict (nanoseek names), or JSON
                                    {"path": "/shared/step.safetensors", "version": N} for a path both machines see
    GET  /admin/version             {"version": N}: the weights the server answers with

Authenticated by `Authorization: Bearer ADMIN_KEY` (compared as sha256 digests in constant time) before any
of the body is read. A push replaces the weights between two engine steps; every cached block (the prefix cache
too) is dropped and running requests are recomputed, so nothing is ever answered from older weights than the
version reported afterwards. Every completion carries the version it was admitted under in
`X-Nanoseek-Weights-Version`.
"""

from __future__ import annotations

import hashlib
import hmac
import json

from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool

from .errors import APIError
from .guard import bearer_token

VERSION_HEADER = "X-Nanoseek-Weights-Version"


def _authorized(request: Request, admin_key: str) -> bool:
    token = bearer_token(request.headers.get("authorization", ""))
    return hmac.compare_digest(hashlib.sha256(token.encode()).digest(), hashlib.sha256(admin_key.encode()).digest())


def load_weights(raw: bytes, content_type: str) -> tuple[dict, int | None]:
    """(state dict, version from a JSON body) from a pushed body."""
    from safetensors.torch import load, load_file

    if content_type.startswith("application/json"):
        try:
            body = json.loads(raw)
            path, version = body["path"], body.get("version")
        except (ValueError, KeyError, TypeError):
            raise APIError(400, 'a JSON weights push is {"path": FILE, "version": N}', "invalid_request_error") from None
        try:
            return load_file(path), version
        except (OSError, Exception) as e:  # a missing or corrupt file
            raise APIError(400, f"cannot read weights from {path}: {e}", "invalid_request_error") from None
    try:
        return load(raw), None
    except Exception as e:  # safetensors raises its own error types on a malformed file
        raise APIError(400, f"the body is not a safetensors file ({e})", "invalid_request_error") from None


def install_admin_routes(app: FastAPI, service) -> None:
    admin_key = service.config.admin_key
    if not admin_key:
        return

    async def push(request: Request, version: int | None = None):
        if not _authorized(request, admin_key):
            raise APIError(401, "missing or invalid admin key", "authentication_error", "invalid_admin_key")
        raw = await request.body()
        state, body_version = await run_in_threadpool(load_weights, raw, request.headers.get("content-type", ""))
        version = version if version is not None else body_version
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise APIError(400, "give the weights' version: ?version=N (an integer >= 0)", "invalid_request_error")
        try:
            await run_in_threadpool(service.llm.update_weights, state)
        except Exception as e:  # wrong names or shapes: the engine keeps its weights
            raise APIError(400, f"weights rejected: {e}", "invalid_request_error", "bad_weights") from None
        service.weights_version = version
        return {"version": version, "tensors": len(state)}

    async def current(request: Request):
        if not _authorized(request, admin_key):
            raise APIError(401, "missing or invalid admin key", "authentication_error", "invalid_admin_key")
        return {"version": service.weights_version}

    app.add_api_route("/admin/weights", push, methods=["POST"])
    app.add_api_route("/admin/version", current, methods=["GET"])
