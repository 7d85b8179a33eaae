"""A live server on a free port in a background thread, for tests."""

import socket
import threading
import time
from contextlib import contextmanager

import httpx
import uvicorn

from nanoseek.engine import AsyncLLM
from nanoseek.serve.app import ServeConfig, create_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(model_dir, config: ServeConfig | None = None, **engine_options):
    llm = AsyncLLM(model_dir, **{"kv_cache_memory": "64MiB", **engine_options})
    app = create_app(llm, config or ServeConfig())
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            if httpx.get(base + "/health").status_code in (200, 401):
                break
        except httpx.HTTPError:
            time.sleep(0.05)
    try:
        yield base, llm, app
    finally:
        server.should_exit = True
        thread.join(10)
        llm.shutdown()


def wait_until(predicate, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()
