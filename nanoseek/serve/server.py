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
import socket
from dataclasses import dataclass, field, fields

from ..engine import AsyncLLM
from ..errors import ConfigError
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
    api_keys: str | None = None
    ledger: str | None = None
    admin_key: str | None = None
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


def accounts_and_ledger(settings: ServerSettings, priced: bool):
    """(Accounts or None, Ledger or None) from --api-keys / --api-key and --ledger; ConfigError on what cannot
    work (quotas with nowhere to remember them, cost quotas without prices)."""
    from .accounts import Accounts
    from .ledger import Ledger

    key = settings.api_key or os.environ.get("NANOSEEK_API_KEY") or None
    if settings.api_keys and key:
        raise ConfigError("give --api-keys FILE or --api-key KEY, not both (add the key to the file)")
    accounts = Accounts.load(settings.api_keys) if settings.api_keys else Accounts.single(key) if key else None
    if accounts is not None and accounts.needs_ledger() and not settings.ledger:
        raise ConfigError("monthly quotas need a ledger to survive restarts: add --ledger FILE (e.g. usage.sqlite3)")
    if accounts is not None and accounts.needs_prices() and not priced:
        raise ConfigError("a monthly_cost quota needs prices: add --cost-per-hour USD")
    ledger = Ledger(settings.ledger) if settings.ledger else None
    if accounts is not None and ledger is not None:
        accounts.seed_month(ledger.month_totals())
    return accounts, ledger


def build(settings: ServerSettings) -> tuple:
    accounts, ledger = accounts_and_ledger(settings, bool(settings.cost_per_hour))
    llm = AsyncLLM(settings.model, device=settings.device, dtype=settings.dtype,
                   kv_cache_memory=settings.kv_cache_memory, max_model_len=settings.max_model_len,
                   max_num_seqs=settings.max_num_seqs, quantization=settings.quantization,
                   speculative=settings.speculative, num_speculative_tokens=settings.num_speculative_tokens)
    prices = calibrate(llm.engine, settings.cost_per_hour) if settings.cost_per_hour else None
    config = ServeConfig(model_name=settings.served_model_name or os.path.basename(os.path.normpath(settings.model)),
                         accounts=accounts, ledger=ledger,
                         admin_key=settings.admin_key or os.environ.get("NANOSEEK_ADMIN_KEY") or None,
                         max_queue=settings.max_queue, max_body_bytes=settings.max_body_bytes,
                         cors_origins=settings.cors,
                         policy=Policy.from_file(settings.policy) if settings.policy else None, prices=prices)
    return llm, create_app(llm, config)


def listening_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the model loads: a port already taken is a one-line error at once,
    not uvicorn's log lines and exit 3 after the load."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as e:
        raise ConfigError(f"--host {host!r} is not an address this machine has ({e.strerror})") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror}): another server may hold it; "
                          "pass --port N") from None
    return sock


def serve(settings: ServerSettings) -> int:
    import uvicorn

    sock = listening_socket(settings.host, settings.port)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        llm, app = build(settings)
    except BaseException:
        sock.close()
        raise
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
        await server.serve(sockets=[sock])

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
