"""httpx transports that serve requests with an ASGI app in this very
process, no port opened: what `in_process` gives the `openai` clients.

`httpx.ASGITransport` will not do: it awaits the whole app and joins the body
before it returns the response (httpx 0.28.1, `_transports/asgi.py` lines
163-164, 170 and 185-187), so a streamed completion arrives all at once at its
end, one that never ends never arrives, and the app cannot tell that its
caller has gone, and the gateway would never cancel its job.

Rules:

- A response is returned as soon as the app sends `http.response.start`; its
  body is each `http.response.body` chunk, as the app sends it. Chunks not yet
  read wait in memory: there is no backpressure. The request body is read
  whole before the app is called.
- Closing a response whose last chunk the app has not sent is the caller
  leaving: a `receive()` the app waits in gives `http.disconnect`, then its
  task is cancelled. Closing returns once the app has returned, its cleanup
  run (and, for a complete response, its background tasks).
- An app that fails or returns before it starts its response gives a 500, as a
  server would; one that fails mid-body gives `httpx.RemoteProtocolError`, as a
  server that drops the connection would. The exception is logged, never raised
  into the caller.
- Timeouts: httpx enforces its timeouts in the network backends, which an ASGI
  transport does not use, so none of them applies by itself. These transports
  apply the one that means something in-process, `read`: the longest wait for
  the response to start or for its next chunk, past which the app is cancelled
  and `httpx.ReadTimeout` is raised (the SDK's `APITimeoutError`; the SDK's
  default is 600 s). `connect`, `write` and `pool` have nothing to bound.
- With `lifespan=True`, the app's lifespan starts before the first request and
  shuts down on close; each request's scope gets a copy of its state.
- `AsyncASGITransport` runs the app on the caller's asyncio loop (not trio); a
  client must stay on the loop it first used. `SyncASGITransport` runs it on a
  private loop in a daemon thread, one per transport, started by the first
  request and stopped by `close()`; the calling thread blocks on that loop for
  one chunk at a time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterator,
    MutableMapping,
)
from typing import Any, TypeVar

import httpx

__all__ = ["AsyncASGITransport", "SyncASGITransport"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

T = TypeVar("T")

logger = logging.getLogger(__name__)


class _AppCall:
    """One call of the ASGI app, run as a task on the running event loop.

    The app's `receive()` gives `first`, then, once the call has ended, `last`.
    What the app sends is queued for `next_message()`, which gives None once
    the app has returned.
    """

    def __init__(self, app: ASGIApp, scope: Scope, first: Message, last: Message) -> None:
        self._app = app
        self._scope = scope
        self._first: Message | None = first
        self._last = last
        self._ended = asyncio.Event()
        self._messages: asyncio.Queue[Message | None] = asyncio.Queue()
        self.error: Exception | None = None
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            await self._app(self._scope, self._receive, self._send)
        except Exception as exc:
            self.error = exc
            logger.exception("Exception in ASGI application")
        finally:
            self._messages.put_nowait(None)

    async def _receive(self) -> Message:
        if self._first is not None:
            message, self._first = self._first, None
            return message
        await self._ended.wait()
        return self._last

    async def _send(self, message: Message) -> None:
        self._messages.put_nowait(message)

    @property
    def ended(self) -> bool:
        return self._ended.is_set()

    def end(self) -> None:
        self._ended.set()

    async def next_message(self) -> Message | None:
        message = await self._messages.get()
        if message is None:
            self._messages.put_nowait(None)  # so that later calls see the end too
        return message

    async def finish(self, *, cancel: bool) -> None:
        """End the call and wait for the app to return, cancelling it if `cancel`."""
        self.end()
        if cancel:
            # Scheduled after the wake-ups end() scheduled: a receive() the app
            # was waiting in gives it `last` before the cancellation lands.
            asyncio.get_running_loop().call_soon(self._task.cancel)
        await asyncio.wait([self._task])


class _Exchange(_AppCall):
    """One request to the app, and its response as the caller reads it."""

    def __init__(
        self, app: ASGIApp, request: httpx.Request, body: bytes, state: dict[str, Any]
    ) -> None:
        self._read_timeout: float | None = request.extensions.get("timeout", {}).get("read")
        self._head = request.method == "HEAD"
        self._body_read = False
        scope = {
            # As httpx.ASGITransport builds it, plus the lifespan's state.
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": request.method,
            "headers": [(k.lower(), v) for (k, v) in request.headers.raw],
            "scheme": request.url.scheme,
            "path": request.url.path,
            "raw_path": request.url.raw_path.split(b"?")[0],
            "query_string": request.url.query,
            "server": (request.url.host, request.url.port),
            "client": ("127.0.0.1", 123),
            "root_path": "",
            "state": dict(state),  # a shallow copy per request, as the lifespan spec asks
        }
        request_message = {"type": "http.request", "body": body, "more_body": False}
        super().__init__(app, scope, request_message, {"type": "http.disconnect"})

    async def _send(self, message: Message) -> None:
        await super()._send(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            # Sent in full: from now on receive() gives http.disconnect, as a
            # server's does, and closing is no longer the caller leaving early.
            self.end()

    async def _next_message(self) -> Message | None:
        try:
            return await asyncio.wait_for(self.next_message(), self._read_timeout)
        except asyncio.TimeoutError:
            raise httpx.ReadTimeout(
                f"The ASGI app sent nothing for {self._read_timeout} s"
            ) from None

    async def start(self) -> tuple[int, list[tuple[bytes, bytes]]] | None:
        """The response's status and headers, or None if the app returned without them."""
        try:
            while (message := await self._next_message()) is not None:
                if message["type"] == "http.response.start":
                    return message["status"], message.get("headers", [])
        except BaseException:
            # A timeout or a cancelled caller leaves no response to close.
            await self.aclose()
            raise
        return None

    async def next_chunk(self) -> bytes | None:
        """The response body's next chunk, or None after its last."""
        while not self._body_read:
            message = await self._next_message()
            if message is None:
                raise httpx.RemoteProtocolError(
                    "The ASGI app ended without completing its response"
                ) from self.error
            if message["type"] == "http.response.body":
                self._body_read = not message.get("more_body", False)
                if message.get("body") and not self._head:
                    return bytes(message["body"])
        return None

    async def aclose(self) -> None:
        await self.finish(cancel=not self.ended)


class _Lifespan:
    """The app's lifespan: started by the first request, shut down on close."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app
        self._state: dict[str, Any] = {}
        self._call: _AppCall | None = None
        self._startup: asyncio.Future[None] | None = None
        self._running = False

    async def startup(self) -> dict[str, Any]:
        """The state the app's startup left; the first call starts it, the others wait for it."""
        if self._startup is None:
            self._startup = asyncio.ensure_future(self._start())
        # Shielded: a request cancelled while it waits must not cancel the
        # startup that the other requests wait for too.
        await asyncio.shield(self._startup)
        return self._state

    async def _start(self) -> None:
        scope = {
            "type": "lifespan",
            "asgi": {"version": "3.0", "spec_version": "2.0"},
            "state": self._state,
        }
        self._call = _AppCall(
            self._app, scope, {"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}
        )
        await self._expect("lifespan.startup")
        self._running = True

    async def shutdown(self) -> None:
        """Shut the app down, if its startup has completed."""
        if not self._running:
            return
        self._running = False
        assert self._call is not None
        await self._call.finish(cancel=False)  # receive() gives lifespan.shutdown
        await self._expect("lifespan.shutdown")

    async def _expect(self, event: str) -> None:
        assert self._call is not None
        message = await self._call.next_message()
        if message is None or message["type"] != f"{event}.complete":
            reason = message.get("message", "") if message else "the app returned without an answer"
            raise RuntimeError(f"ASGI {event} failed: {reason}") from self._call.error


async def _respond(
    app: ASGIApp,
    lifespan: _Lifespan | None,
    request: httpx.Request,
    body: bytes,
    stream: Callable[[_Exchange], httpx.SyncByteStream | httpx.AsyncByteStream],
) -> httpx.Response:
    state = await lifespan.startup() if lifespan is not None else {}
    exchange = _Exchange(app, request, body, state)
    start = await exchange.start()
    if start is None:
        # uvicorn's answer when the app returns or fails before its response starts.
        return httpx.Response(
            500,
            headers={"content-type": "text/plain; charset=utf-8"},
            content=b"Internal Server Error",
        )
    status, headers = start
    return httpx.Response(status, headers=headers, stream=stream(exchange))


class _AsyncResponseStream(httpx.AsyncByteStream):
    def __init__(self, exchange: _Exchange) -> None:
        self._exchange = exchange

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while (chunk := await self._exchange.next_chunk()) is not None:
            yield chunk

    async def aclose(self) -> None:
        await self._exchange.aclose()


class AsyncASGITransport(httpx.AsyncBaseTransport):
    """
    An async transport that serves requests with an ASGI app on the caller's
    event loop, returning each response as soon as it starts.

    ```python
    client = httpx.AsyncClient(transport=AsyncASGITransport(app), base_url="http://app")
    ```

    Arguments:

    * `app` - The ASGI application.
    * `lifespan` - Run the app's lifespan: startup before the first request,
      shutdown on `aclose()`.
    """

    def __init__(self, app: ASGIApp, *, lifespan: bool = False) -> None:
        self.app = app
        self._lifespan = _Lifespan(app) if lifespan else None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        return await _respond(self.app, self._lifespan, request, body, _AsyncResponseStream)

    async def aclose(self) -> None:
        if self._lifespan is not None:
            await self._lifespan.shutdown()


class _LoopThread:
    """An event loop on a daemon thread, started by the first coroutine submitted."""

    def __init__(self) -> None:
        # Re-entrant: the garbage collector may close a response, which submits
        # a coroutine, on a thread that is in submit() already.
        self._lock = threading.RLock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._stopped = False

    @property
    def running(self) -> bool:
        return self._thread is not None

    @property
    def is_current(self) -> bool:
        """Whether the caller runs on the loop's own thread."""
        return threading.current_thread() is self._thread

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule `coroutine` on the loop, without waiting for it."""
        with self._lock:
            if self._stopped:
                coroutine.close()
                raise RuntimeError("The transport has been closed.")
            if self._thread is None:
                self._start()
            assert self._loop is not None
            return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run `coroutine` on the loop, blocking the calling thread until it returns."""
        future = self.submit(coroutine)
        try:
            return future.result()
        except BaseException:
            # An interrupted caller (KeyboardInterrupt) takes its coroutine down with it.
            future.cancel()
            raise

    def _start(self) -> None:
        started = threading.Event()
        # asyncio.run, once _main returns, cancels the tasks left (responses
        # never closed) and closes the loop, the same on every platform.
        self._thread = threading.Thread(
            target=asyncio.run, args=(self._main(started),), name="in-process-asgi", daemon=True
        )
        self._thread.start()
        started.wait()

    async def _main(self, started: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        started.set()
        await self._stopping.wait()

    def stop(self) -> None:
        """Stop the loop, if started, and wait for its thread to end."""
        with self._lock:
            self._stopped = True
            thread, self._thread = self._thread, None
        if thread is not None:
            assert self._loop is not None and self._stopping is not None
            self._loop.call_soon_threadsafe(self._stopping.set)
            thread.join()


class _SyncResponseStream(httpx.SyncByteStream):
    def __init__(self, exchange: _Exchange, loop: _LoopThread) -> None:
        self._exchange = exchange
        self._loop = loop

    def __iter__(self) -> Iterator[bytes]:
        while (chunk := self._loop.run(self._exchange.next_chunk())) is not None:
            yield chunk

    def close(self) -> None:
        if self._loop.is_current:
            # The garbage collector can close a response on the loop's own
            # thread (an abandoned openai Stream is in a reference cycle), where
            # waiting for the app would deadlock: it is left to wind down.
            self._loop.submit(self._exchange.aclose())
        elif self._loop.running:  # once the transport is closed, its loop has cancelled the app
            self._loop.run(self._exchange.aclose())


class SyncASGITransport(httpx.BaseTransport):
    """
    A sync transport that serves requests with an ASGI app on a private event
    loop, returning each response as soon as it starts and its body one chunk
    at a time, as the app sends it.

    ```python
    with httpx.Client(transport=SyncASGITransport(app), base_url="http://app") as client:
        ...
    ```

    The loop runs on a daemon thread, started by the first request; `close()`
    stops it (closing the client closes its transport).

    Arguments:

    * `app` - The ASGI application.
    * `lifespan` - Run the app's lifespan: startup before the first request,
      shutdown on `close()`.
    """

    def __init__(self, app: ASGIApp, *, lifespan: bool = False) -> None:
        self.app = app
        self._lifespan = _Lifespan(app) if lifespan else None
        self._loop = _LoopThread()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()

        def stream(exchange: _Exchange) -> _SyncResponseStream:
            return _SyncResponseStream(exchange, self._loop)

        return self._loop.run(_respond(self.app, self._lifespan, request, body, stream))

    def close(self) -> None:
        try:
            if self._lifespan is not None and self._loop.running:
                self._loop.run(self._lifespan.shutdown())
        finally:
            self._loop.stop()
