"""AsyncLLM: the engine stepping in a background thread, requests as async iterators (server, RL rollouts).

`async for out in llm.generate(prompt, params)` yields cumulative RequestOutputs as tokens arrive. Leaving the
loop early (a client disconnect cancels the task, or the iterator is closed) aborts the request, which frees
its cache blocks at once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from typing import AsyncIterator

from .llm import LLMEngine
from .sampling_params import SamplingParams
from .sequence import RequestOutput

log = logging.getLogger("nanoseek.engine")


class EngineDeadError(RuntimeError):
    """The engine thread failed; the server answers 500/503 and logs the cause."""


class AsyncLLM:
    def __init__(self, model=None, tokenizer=None, *, engine: LLMEngine | None = None, **engine_options):
        self.engine = engine or LLMEngine(model, tokenizer, **engine_options)
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._streams_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="nanoseek-engine", daemon=True)
        self._thread.start()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def _run(self) -> None:
        while not self._stopping:
            if not self.engine.has_unfinished():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except BaseException as e:  # deliver the failure to every waiting client, then stop
                log.exception("engine step failed")
                self.error = e
                with self._streams_lock:
                    streams = list(self._streams.items())
                for request_id, (loop, queue) in streams:
                    loop.call_soon_threadsafe(queue.put_nowait, EngineDeadError(f"engine failed: {e}"))
                return
            for out in outputs:
                with self._streams_lock:
                    target = self._streams.get(out.request_id)
                if target is not None:
                    loop, queue = target
                    loop.call_soon_threadsafe(queue.put_nowait, out)

    def submit(self, prompt, params: SamplingParams | None = None, request_id: str | None = None) -> "RequestStream":
        """Adds a request; its outputs arrive on the returned stream. Must be called from an event loop."""
        if self.error is not None or self._stopping:
            raise EngineDeadError("the engine is not running")
        stream = RequestStream(self, request_id or uuid.uuid4().hex)
        with self._streams_lock:  # registered before the request exists, so no output can be missed
            self._streams[stream.request_id] = (asyncio.get_running_loop(), stream.queue)
        try:
            self.engine.add_request(prompt, params, stream.request_id)
        except BaseException:
            stream.close()
            raise
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

    def abort(self, request_id: str) -> bool:
        return self.engine.abort(request_id)

    def update_weights(self, weights) -> None:
        self.engine.update_weights(weights)

    def stats(self) -> dict:
        return self.engine.stats()

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
            self.llm.engine.abort(self.request_id)
