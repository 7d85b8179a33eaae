"""AsyncLLM: the engine stepping in a background thread, requests as async iterators (server, RL rollouts).

`async for out in llm.generate(prompt, params)` yields cumulative RequestOutputs as tokens arrive. Leaving the
loop early (a client disconnect cancels the task, or the iterator is closed) aborts the request, which frees
its cache blocks at once.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from typing import AsyncIterator

from .llm import LLMEngine
from .sampling_params import SamplingParams
from .sequence import RequestOutput

log = logging.getLogger("nanoseek.engine")


class EngineDeadError(RuntimeError):
    """The engine thread failed; the server answers 500/503 and logs the cause."""


class RequestFailedError(RuntimeError):
    """A fault inside the engine ended this request (the engine itself goes on serving the others)."""


class AsyncLLM:
    def __init__(self, model=None, tokenizer=None, *, engine: LLMEngine | None = None, **engine_options):
        self.engine = engine or LLMEngine(model, tokenizer, **engine_options)
        # Other threads never take the engine's lock (a busy engine re-takes it between steps faster than a
        # waiter can, starving an event loop); they post commands, which the engine thread runs between steps.
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._streams_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self.error: BaseException | None = None
        self.restarts = 0  # times the watchdog restarted the engine loop
        self._thread = threading.Thread(target=self._run, name="nanoseek-engine", daemon=True)
        self._thread.start()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def _run_commands(self) -> None:
        while True:
            try:
                kind, payload = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                try:
                    self.engine.add(payload)
                except Exception as e:  # e.g. a duplicate request id: that request's stream fails
                    self._deliver(payload.request_id, e)
            elif kind == "abort":
                self.engine.abort(payload)
            elif kind == "call":
                fn, done = payload
                try:
                    fn()
                except BaseException as e:
                    done.error = e
                done.set()

    def _deliver(self, request_id: str, item) -> None:
        with self._streams_lock:
            target = self._streams.get(request_id)
        if target is not None:
            loop, q = target
            loop.call_soon_threadsafe(q.put_nowait, item)

    def call_in_engine_thread(self, fn, timeout: float | None = None) -> None:
        """Runs fn() between two engine steps and waits for it (weight updates)."""
        done = threading.Event()
        done.error = None
        self._commands.put(("call", (fn, done)))
        self._wake.set()
        done.wait(timeout)
        if done.error is not None:
            raise done.error

    def _run(self) -> None:
        """The engine thread. A fault a step isolates itself (engine.step pins it on one request) never gets
        here; anything else that escapes is the watchdog's: every in-flight request fails with the cause, the
        engine's requests are dropped, and the loop starts again in-process (`error` is set, and /health
        unhealthy, only while that happens). Only a BaseException (interpreter exit) ends the thread."""
        while not self._stopping:
            try:
                self._turn()
            except Exception as e:
                log.exception("engine loop failed: failing in-flight requests and restarting it")
                self.error = e
                self._restart(e)
                self.error = None
            except BaseException as e:
                self.error = e
                self._fail_streams(EngineDeadError(f"engine failed: {e}"))
                raise

    def _turn(self) -> None:
        self._run_commands()
        if not self.engine.has_unfinished():
            self._wake.wait(0.05)
            self._wake.clear()
            return
        for out in self.engine.step():
            self._deliver(out.request_id, RequestFailedError(out.error) if out.error else out)

    def _fail_streams(self, error: BaseException) -> None:
        with self._streams_lock:
            streams = list(self._streams.items())
        for _, (loop, stream) in streams:
            loop.call_soon_threadsafe(stream.put_nowait, error)

    def _restart(self, error: Exception) -> None:
        self._fail_streams(RequestFailedError(f"{type(error).__name__}: {error}"))
        self.restarts += 1
        for request_id in list(self.engine.requests):
            try:
                self.engine.abort(request_id)
            except Exception:  # its state is what broke: drop it without its bookkeeping
                self.engine.requests.pop(request_id, None)
        self.engine.recover()

    def submit(self, prompt, params: SamplingParams | None = None, request_id: str | None = None) -> "RequestStream":
        """Adds a request; its outputs arrive on the returned stream. Must be called from an event loop."""
        if self.error is not None or self._stopping:
            raise EngineDeadError("the engine is not running")
        stream = RequestStream(self, request_id or uuid.uuid4().hex)
        with self._streams_lock:  # registered before the request exists, so no output can be missed
            self._streams[stream.request_id] = (asyncio.get_running_loop(), stream.queue)
        try:
            request = self.engine.make_request(prompt, params, stream.request_id)
        except BaseException:
            stream.closed = True
            self._forget(stream.request_id)
            raise
        self._commands.put(("add", request))
        self._wake.set()
        return stream

    async def generate(self, prompt, params: SamplingParams | None = None, request_id: str | None = None,
                       ) -> AsyncIterator[RequestOutput]:
        stream = self.submit(prompt, params, request_id)
        try:
            while True:
                out = await stream.next()
                yield out
                if out.finished:
                    return
        finally:
            stream.close()

    def _forget(self, request_id: str) -> None:
        with self._streams_lock:
            self._streams.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        """Aborts between the next two steps (its blocks are then freed)."""
        self._commands.put(("abort", request_id))
        self._wake.set()

    def update_weights(self, weights) -> None:
        self.call_in_engine_thread(lambda: self.engine.update_weights(weights))

    def stats(self) -> dict:
        return {**self.engine.stats(), "engine_restarts": self.restarts}

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stops the engine thread after the current step; unfinished requests are aborted."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)
        for request_id in list(self.engine.requests):
            self.engine.abort(request_id)


class RequestStream:
    """One request's outputs. `await next(timeout)` returns the next cumulative output, or None when nothing
    arrived within `timeout` (so callers can send keep-alives or check for disconnects without disturbing the
    request). `close()` aborts the request unless it finished, freeing its cache blocks."""

    def __init__(self, llm: AsyncLLM, request_id: str):
        self.llm = llm
        self.request_id = request_id
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished = False
        self.closed = False

    async def next(self, timeout: float | None = None) -> RequestOutput | None:
        try:
            out = await asyncio.wait_for(self.queue.get(), timeout) if timeout else await self.queue.get()
        except asyncio.TimeoutError:
            return None
        if isinstance(out, BaseException):
            raise out
        self.finished = out.finished
        return out

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.llm._forget(self.request_id)
        if not self.finished:
            self.llm.abort(self.request_id)
