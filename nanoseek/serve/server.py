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

from ..engine import AsyncLLM
from .app import ServeConfig, create_app
from .policy import Policy
from .pricing import calibrate


def build(args) -> tuple:
    llm = AsyncLLM(args.model, device=args.device, dtype=args.dtype, kv_cache_memory=args.kv_cache_memory,
                   max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs)
    prices = calibrate(llm.engine, args.cost_per_hour) if args.cost_per_hour else None
    api_key = args.api_key or os.environ.get("NANOSEEK_API_KEY") or None
    config = ServeConfig(model_name=args.served_model_name or os.path.basename(os.path.normpath(args.model)),
                         api_key=api_key, max_queue=args.max_queue, max_body_bytes=args.max_body_bytes,
                         cors_origins=[o for o in (args.cors or "").split(",") if o],
                         policy=Policy.from_file(args.policy) if args.policy else None, prices=prices)
    return llm, create_app(llm, config)


def serve(args) -> int:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    llm, app = build(args)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                            timeout_graceful_shutdown=args.shutdown_grace, access_log=False)
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
