"""The in-process transports (`asgi_transport`) with the unmodified openai
SDK, sync and async, and a small Starlette app faking OpenAI's
`/v1/chat/completions`: streaming as the app sends, the caller's leaving,
failures, timeouts and lifespans. The gateway's own app in process is tested
against the real worker in test_in_process.py.

What the app did is recorded in threading.Events (the sync transport runs it
on another thread) and asserted with them, never with timing thresholds."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import json
import threading
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from encrypted_vllm.client.gateway.asgi_transport import AsyncASGITransport, SyncASGITransport

BASE_URL = "http://in-process/v1"


def openai_client(app, *, lifespan: bool = False, **options) -> openai.OpenAI:
    transport = SyncASGITransport(app, lifespan=lifespan)
    return openai.OpenAI(
        api_key="unused",
        base_url=BASE_URL,
        max_retries=0,
        http_client=httpx.Client(transport=transport, base_url=BASE_URL),
        **options,
    )


def async_openai_client(app, *, lifespan: bool = False, **options) -> openai.AsyncOpenAI:
    transport = AsyncASGITransport(app, lifespan=lifespan)
    return openai.AsyncOpenAI(
        api_key="unused",
        base_url=BASE_URL,
        max_retries=0,
        http_client=httpx.AsyncClient(transport=transport, base_url=BASE_URL),
        **options,
    )


PROMPT = "the quick brown fox jumps"
WORDS = PROMPT.split()


def _chunk(model: str, delta: dict[str, Any], finish_reason: str | None = None) -> str:
    return json.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }
    )


class FakeOpenAI:
    """Echoes the last message's words; the model's name picks a behaviour:
    "echo" answers, "endless" streams forever, "hang" never answers, "boom"
    fails before answering, "breaks" fails after the first streamed word,
    "collect" runs the garbage collector (on the app's thread) first."""

    def __init__(self) -> None:
        self.produced_last = threading.Event()  # the stream's last word is out
        self.release = threading.Event()  # the stream waits for this before its last word
        self.release.set()
        self.left = threading.Event()  # the app's work was cut short: its cleanup ran
        self.hanging = threading.Event()  # a "hang" request has reached the app
        self.startups = 0
        self.shut_down = threading.Event()
        self.app = Starlette(
            routes=[Route("/v1/chat/completions", self.chat_completions, methods=["POST"])],
            lifespan=self.lifespan,
        )

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[dict[str, Any]]:
        self.startups += 1
        yield {"prefix": "started:"}
        self.shut_down.set()

    async def chat_completions(self, request: Request) -> Response:
        body = await request.json()
        model = body["model"]
        words = body["messages"][-1]["content"].split()
        if prefix := getattr(request.state, "prefix", None):
            words[0] = prefix + words[0]
        if model == "boom":
            raise RuntimeError("boom")
        if model == "collect":
            gc.collect()
        if model == "hang":
            self.hanging.set()
            try:
                await asyncio.Event().wait()
            finally:
                self.left.set()
        if body.get("stream"):
            return EventSourceResponse(self.stream(model, words))
        return JSONResponse(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 0,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": " ".join(words)},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": len(words),
                    "completion_tokens": len(words),
                    "total_tokens": 2 * len(words),
                },
            }
        )

    async def stream(self, model: str, words: list[str]) -> AsyncIterator[str]:
        try:
            yield _chunk(model, {"role": "assistant", "content": ""})
            if model == "endless":
                for i in itertools.count():
                    await asyncio.sleep(0.05)
                    yield _chunk(model, {"content": f" w{i}"})
            for i, word in enumerate(words):
                await asyncio.sleep(0.05)
                if i == len(words) - 1:
                    # Through a buffering transport, no word reaches the test to
                    # release this one: after 10 s the test fails, rather than hangs.
                    await asyncio.to_thread(self.release.wait, 10)
                    self.produced_last.set()
                yield _chunk(model, {"content": word if i == 0 else " " + word})
                if model == "breaks":
                    raise RuntimeError("broken stream")
            yield _chunk(model, {}, "stop")
            yield "[DONE]"
        except asyncio.CancelledError:
            self.left.set()
            raise


@pytest.fixture
def fake() -> FakeOpenAI:
    return FakeOpenAI()


def _ask(model: str = "echo", **kwargs: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": PROMPT}], **kwargs}


def _threads() -> set[threading.Thread]:
    return set(threading.enumerate())


# --- The openai SDK, sync -----------------------------------------------------------


def test_sync_completion(fake: FakeOpenAI) -> None:
    with openai_client(fake.app) as client:
        completion = client.chat.completions.create(**_ask())
    assert completion.choices[0].message.content == PROMPT
    assert completion.model == "echo"
    assert completion.usage is not None and completion.usage.total_tokens == 2 * len(WORDS)


def test_sync_stream_arrives_as_the_app_sends_it(fake: FakeOpenAI) -> None:
    fake.release.clear()
    pieces: list[str] = []
    with openai_client(fake.app) as client:
        with client.chat.completions.create(**_ask(stream=True)) as stream:
            for chunk in stream:
                if chunk.choices[0].delta.content:
                    if not pieces:
                        assert not fake.produced_last.is_set()
                        fake.release.set()
                    pieces.append(chunk.choices[0].delta.content)
    assert "".join(pieces) == PROMPT
    assert len(pieces) == len(WORDS)
    assert not fake.left.is_set()


def test_sync_leaving_a_stream_cancels_the_app(fake: FakeOpenAI) -> None:
    with openai_client(fake.app) as client:
        with client.chat.completions.create(**_ask("endless", stream=True)) as stream:
            for n, _ in enumerate(stream):
                if n == 3:
                    break
        assert fake.left.is_set()  # closing the stream returned after the app's cleanup
        # The transport still serves.
        assert client.chat.completions.create(**_ask()).choices[0].message.content == PROMPT


def test_sync_stream_finalized_on_the_loop_thread(fake: FakeOpenAI) -> None:
    # An openai Stream is in a reference cycle, so the garbage collector closes
    # an abandoned one on whichever thread it runs: here, the app's loop thread.
    gc.collect()
    gc.disable()
    try:
        with openai_client(fake.app) as client:
            stream = client.chat.completions.create(**_ask("endless", stream=True))
            next(stream)
            del stream
            completion = client.chat.completions.create(**_ask("collect"))
            assert completion.choices[0].message.content == PROMPT
            assert fake.left.wait(10)
    finally:
        gc.enable()


def test_sync_app_failure_is_a_500(fake: FakeOpenAI, caplog: pytest.LogCaptureFixture) -> None:
    with openai_client(fake.app) as client:
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(**_ask("boom"))
    assert "Exception in ASGI application" in caplog.text


def test_sync_app_failure_mid_stream_is_a_connection_error(fake: FakeOpenAI) -> None:
    with openai_client(fake.app) as client:
        with client.chat.completions.create(**_ask("breaks", stream=True)) as stream:
            with pytest.raises(openai.APIConnectionError) as raised:
                list(stream)
    assert isinstance(raised.value.__cause__, httpx.RemoteProtocolError)


def test_sync_read_timeout_cancels_the_app(fake: FakeOpenAI) -> None:
    with openai_client(fake.app) as client:
        with pytest.raises(openai.APITimeoutError):
            client.chat.completions.create(**_ask("hang"), timeout=0.2)
    assert fake.left.is_set()


def test_sync_lifespan(fake: FakeOpenAI) -> None:
    with openai_client(fake.app, lifespan=True) as client:
        for _ in range(2):
            completion = client.chat.completions.create(**_ask())
            assert completion.choices[0].message.content == "started:" + PROMPT
        assert fake.startups == 1
        assert not fake.shut_down.is_set()
    assert fake.shut_down.is_set()


def test_sync_close_stops_the_loop_thread(fake: FakeOpenAI) -> None:
    before = _threads()
    client = openai_client(fake.app)
    assert _threads() == before  # started by the first request, not before
    client.chat.completions.create(**_ask())
    (loop_thread,) = _threads() - before
    assert loop_thread.is_alive() and loop_thread.daemon
    client.close()
    assert not loop_thread.is_alive()
    with pytest.raises(RuntimeError):
        client.chat.completions.create(**_ask())


# --- The openai SDK, async ----------------------------------------------------------


async def test_async_completion(fake: FakeOpenAI) -> None:
    async with async_openai_client(fake.app) as client:
        completion = await client.chat.completions.create(**_ask())
    assert completion.choices[0].message.content == PROMPT
    assert completion.usage is not None and completion.usage.total_tokens == 2 * len(WORDS)


async def test_async_stream_arrives_as_the_app_sends_it(fake: FakeOpenAI) -> None:
    fake.release.clear()
    pieces: list[str] = []
    async with async_openai_client(fake.app) as client:
        async with await client.chat.completions.create(**_ask(stream=True)) as stream:
            async for chunk in stream:
                if chunk.choices[0].delta.content:
                    if not pieces:
                        assert not fake.produced_last.is_set()
                        fake.release.set()
                    pieces.append(chunk.choices[0].delta.content)
    assert "".join(pieces) == PROMPT
    assert not fake.left.is_set()


async def test_async_leaving_a_stream_cancels_the_app(fake: FakeOpenAI) -> None:
    async with async_openai_client(fake.app) as client:
        async with await client.chat.completions.create(**_ask("endless", stream=True)) as stream:
            n = 0
            async for _ in stream:
                n += 1
                if n == 3:
                    break
        assert fake.left.is_set()


async def test_async_concurrent_requests(fake: FakeOpenAI) -> None:
    async def streamed(client: openai.AsyncOpenAI) -> str:
        stream = await client.chat.completions.create(**_ask(stream=True))
        return "".join([chunk.choices[0].delta.content or "" async for chunk in stream])

    async with async_openai_client(fake.app) as client:
        answers = await asyncio.gather(
            *(streamed(client) for _ in range(5)),
            *(client.chat.completions.create(**_ask()) for _ in range(5)),
        )
    assert answers[:5] == [PROMPT] * 5
    assert [completion.choices[0].message.content for completion in answers[5:]] == [PROMPT] * 5


async def test_async_app_failure_is_a_500(fake: FakeOpenAI) -> None:
    async with async_openai_client(fake.app) as client:
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(**_ask("boom"))


async def test_async_app_failure_mid_stream_is_a_connection_error(fake: FakeOpenAI) -> None:
    async with async_openai_client(fake.app) as client:
        stream = await client.chat.completions.create(**_ask("breaks", stream=True))
        with pytest.raises(openai.APIConnectionError) as raised:
            async for _ in stream:
                pass
    assert isinstance(raised.value.__cause__, httpx.RemoteProtocolError)


async def test_async_read_timeout_cancels_the_app(fake: FakeOpenAI) -> None:
    async with async_openai_client(fake.app) as client:
        with pytest.raises(openai.APITimeoutError):
            await client.chat.completions.create(**_ask("hang"), timeout=0.2)
    assert fake.left.is_set()


async def test_async_caller_cancelled_before_the_response_cancels_the_app(fake: FakeOpenAI) -> None:
    async with async_openai_client(fake.app) as client:
        request = asyncio.ensure_future(client.chat.completions.create(**_ask("hang")))
        await asyncio.to_thread(fake.hanging.wait, 10)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
    assert fake.left.is_set()


async def test_async_lifespan(fake: FakeOpenAI) -> None:
    async with async_openai_client(fake.app, lifespan=True) as client:
        completions = await asyncio.gather(
            *(client.chat.completions.create(**_ask()) for _ in range(3))
        )
        assert [c.choices[0].message.content for c in completions] == ["started:" + PROMPT] * 3
        assert fake.startups == 1
        assert not fake.shut_down.is_set()
    assert fake.shut_down.is_set()


# --- The transports, with raw ASGI apps ---------------------------------------------


class RawApp:
    """Streams one chunk, then records what receive() gives until it is cancelled."""

    def __init__(self) -> None:
        self.received: list[str] = []
        self.cancelled = threading.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "http.request"
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/plain")],
            }
        )
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        try:
            self.received.append((await receive())["type"])
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


def test_sync_transport_disconnects_then_cancels() -> None:
    app = RawApp()
    with httpx.Client(transport=SyncASGITransport(app), base_url="http://app") as client:
        with client.stream("GET", "/") as response:
            assert next(response.iter_raw()) == b"first"
        assert app.received == ["http.disconnect"]
        assert app.cancelled.is_set()


async def test_async_transport_disconnects_then_cancels() -> None:
    app = RawApp()
    async with httpx.AsyncClient(
        transport=AsyncASGITransport(app), base_url="http://app"
    ) as client:
        async with client.stream("GET", "/") as response:
            assert await response.aiter_raw().__anext__() == b"first"
        assert app.received == ["http.disconnect"]
        assert app.cancelled.is_set()


async def _fails_before_responding(scope: Any, receive: Any, send: Any) -> None:
    raise RuntimeError("no response")


async def _returns_without_responding(scope: Any, receive: Any, send: Any) -> None:
    pass


@pytest.mark.parametrize("app", [_fails_before_responding, _returns_without_responding])
def test_sync_transport_no_response_is_a_500(app: Any) -> None:
    with httpx.Client(transport=SyncASGITransport(app), base_url="http://app") as client:
        response = client.get("/")
    assert (response.status_code, response.text) == (500, "Internal Server Error")


@pytest.mark.parametrize("app", [_fails_before_responding, _returns_without_responding])
async def test_async_transport_no_response_is_a_500(app: Any) -> None:
    async with httpx.AsyncClient(
        transport=AsyncASGITransport(app), base_url="http://app"
    ) as client:
        response = await client.get("/")
    assert (response.status_code, response.text) == (500, "Internal Server Error")


async def test_async_transport_lifespan_failure_is_raised() -> None:
    @contextlib.asynccontextmanager
    async def failing(app: Starlette) -> AsyncIterator[None]:
        raise RuntimeError("no database")
        yield

    transport = AsyncASGITransport(Starlette(lifespan=failing), lifespan=True)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        for _ in range(2):  # every request, not just the first
            with pytest.raises(RuntimeError, match="lifespan.startup failed"):
                await client.get("/")
