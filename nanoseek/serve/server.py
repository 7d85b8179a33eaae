"""`nanoseek serve`: load the model, optionally price it, and run the API with uvicorn.

SIGTERM/SIGINT shut down gracefully: new requests get 503, in-flight ones may finish for `--shutdown-grace`
seconds, whatever is left is aborted (freeing its cache blocks), then the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from dataclasses import dataclass, field, fields

from ..engine import AsyncLLM
from .app import ServeConfig, create_app
from .policy import Policy
from .pricing import calibrate


@dataclass
class ServerSettings:
    """Everything `nanoseek serve` is told: the engine's options, the HTTP side's, and the process's."""
    model: str
    device: str = "cpu"
    dtype: str = "auto"
    kv_cache_memory: str = "1GiB"
    max_model_len: int | None = None
    quantization: str | None = None
    speculative: str | None = None
    num_speculative_tokens: int | None = None
    max_num_seqs: int = 64
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None
    policy: str | None = None
    cost_per_hour: float | None = None
    max_queue: int = 256
    max_body_bytes: int = 1 << 20
    cors: list[str] = field(default_factory=list)
    shutdown_grace: int = 10

    @classmethod
    def from_args(cls, args) -> "ServerSettings":
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in vars(args).items() if k in names}
        values["cors"] = [o for o in (values.get("cors") or "").split(",") if o]
        return cls(**values)


def build(settings: ServerSettings) -> tuple:
    llm = AsyncLLM(settings.model, device=settings.device, dtype=settings.dtype,
                   kv_cache_memory=settings.kv_cache_memory, max_model_len=settings.max_model_len,
                   max_num_seqs=settings.max_num_seqs, quantization=settings.quantization,
                   speculative=settings.speculative, num_speculative_tokens=settings.num_speculative_tokens)
    prices = calibrate(llm.engine, settings.cost_per_hour) if settings.cost_per_hour else None
    config = ServeConfig(model_name=settings.served_model_name or os.path.basename(os.path.normpath(settings.model)),
                         api_key=settings.api_key or os.environ.get("NANOSEEK_API_KEY") or None,
                         max_queue=settings.max_queue, max_body_bytes=settings.max_body_bytes,
                         cors_origins=settings.cors,
                         policy=Policy.from_file(settings.policy) if settings.policy else None, prices=prices)
    return llm, create_app(llm, config)


def serve(settings: ServerSettings) -> int:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    llm, app = build(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info",
                            timeout_graceful_shutdown=settings.shutdown_grace, access_log=False)
    server = _Server(config)

    async def main():
        loop = asyncio.get_running_loop()

        def stop():
            app.state.shutting_down = True  # answer 503 to anything new from now on
            server.should_exit = True

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop)
        await server.serve()

    try:
        asyncio.run(main())
    finally:
        llm.shutdown()
    logging.getLogger("nanoseek.serve").info("stopped")
    return 0


class _Server:
    """uvicorn.Server that leaves signal handling to us: uvicorn's own handler re-raises the signal after
    shutting down, which would end the process with 'killed by SIGTERM' instead of a clean exit 0."""

    def __new__(cls, config):
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):
                yield

        return Server(config)
