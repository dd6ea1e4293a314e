"""The client library: encrypted jobs on a RunPod endpoint, their answers
streamed and decrypted.

    from encrypted_vllm import Client
    with Client("ENDPOINT_ID") as client:                 # keys from the environment
        print(client.run_sync("Hello").text)
        for delta in client.stream(messages=[{"role": "user", "content": "Hi"}]):
            print(delta, end="")

`AsyncClient` offers the same calls to await (`await client.run_sync(...)`,
`async for delta in client.stream(...)`). Every call takes wire protocol
v1.1's fields (`tools`, `tool_choice`, `structured_output`, ...);
`client.items(...)` streams typed items (text, reasoning, tool-call
fragments, logprobs) where `stream` gives text alone; `client.embed(...)`
asks an endpoint that serves an embedding model for vectors;
`client.describe()` says what the endpoint can do.

Rules:
- A request is validated here, with a detailed message, before anything is
  encrypted or sent: the worker's own refusals are deliberately terse.
- Only ciphertext leaves this process; the key never does.
- Every failure is one of the `ClientError` types below; a job's failure
  carries the worker's stable code.
- A stream cancels its job when its caller stops reading early: the stream
  closed or dropped, a timeout, Ctrl-C, the caller's task cancelled (even by
  a cancel scope that cancels every later await too, as ASGI servers do).
- A completion is returned as soon as its final item arrives; if the job
  still posts (a constant-rate stream's filler), it is read to its end in
  the background, so that this client's polling never shows when the text
  ended.
- Retries happen only where repeating is safe: a 429 anywhere (RunPod did not
  take the request), a 5xx or lost connection on reads and cancels, never on
  a /run that may have been accepted.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import os
import random
import threading
import time
from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import httpx

from encrypted_vllm.wire import protocol
from encrypted_vllm.wire.channel import Channel, request_binding
from encrypted_vllm.wire.protocol import (
    Embedding,
    ErrorCode,
    ProtocolError,
    StreamItem,
    TokenLogprob,
    ToolCallResult,
    Usage,
    WorkerCard,
    join_tool_calls,
)

__all__ = [
    "AsyncClient",
    "AsyncItemStream",
    "AsyncJob",
    "AsyncTextStream",
    "AuthenticationError",
    "Client",
    "ClientError",
    "Completion",
    "DecryptionFailed",
    "Embeddings",
    "EndpointNotFound",
    "ItemStream",
    "Job",
    "JobFailed",
    "JobTimeout",
    "RateLimited",
    "ServerError",
    "StreamIntegrityError",
    "TextStream",
    "image_part",
]

RUNPOD_API = "https://api.runpod.ai/v2"
FINAL_STATUSES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"})
DEFAULT_TIMEOUT_S = 600.0  # RunPod's default execution timeout
# Four /stream polls a second per streaming job: text flows smoothly and
# fifty concurrent streams stay within RunPod's 2000 polls per 10 s.
DEFAULT_POLL_INTERVAL_S = 0.25
HTTP_TIMEOUT_S = 30.0  # longer than a held /stream poll


# --- Errors ----------------------------------------------------------------


class ClientError(Exception):
    """Base of every error this client raises."""


class AuthenticationError(ClientError):
    """RunPod refused the API key (401 or 403)."""


class EndpointNotFound(ClientError):
    """No such endpoint, or no such job (it may have expired): 404."""


class RateLimited(ClientError):
    """RunPod kept answering 429 (rate limit, or queue full) through every retry."""


class ServerError(ClientError):
    """RunPod failed (5xx) through every retry, or could not be reached."""


class DecryptionFailed(ClientError):
    """A response did not decrypt under this client's key: the wrong key, or
    a response tampered with."""


class StreamIntegrityError(ClientError):
    """The answer failed its integrity check (wire protocol v1.2): an item of
    another request, one missing, repeated or out of order, or no final item
    even in what RunPod stored. `reason` says which, never the text; nothing
    of the answer is returned. Tampering, or a loss RunPod could not repair."""

    def __init__(self, job_id: str, reason: str):
        self.job_id, self.reason = job_id, reason
        super().__init__(f"job {job_id}: the answer failed its integrity check: {reason}")


class JobFailed(ClientError):
    """The job ended without a completion. `code` is the worker's stable code
    (DECRYPTION_FAILED, INVALID_INPUT, ...) when the worker refused or failed
    it, None when RunPod ended it (e.g. CANCELLED)."""

    def __init__(self, job_id: str, status: str, error: Any = None):
        parsed = ProtocolError.parse(error) if isinstance(error, str) else None
        self.job_id, self.status = job_id, status
        self.code: ErrorCode | None = parsed.code if parsed else None
        self.reason = parsed.reason if parsed else error
        detail = f": {error}" if error else ""
        super().__init__(f"job {job_id} {status}{detail}")


class JobTimeout(JobFailed, TimeoutError):
    """The job did not finish in time: this client's timeout (the job was then
    cancelled) or RunPod's execution timeout (TIMED_OUT)."""


# --- Results -----------------------------------------------------------------


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str | None
    usage: Usage | None
    job_id: str
    ttft_s: float | None  # from submitting to the first text
    total_s: float  # from submitting to the final item
    arrivals: int  # polls that brought text: how the completion streamed
    reasoning: str = ""
    tool_calls: list[ToolCallResult] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    card: WorkerCard | None = None  # the answer to describe()
    embeddings: list[Embedding] = field(default_factory=list)  # by index
    stop_sequence: str | None = None  # the stop string that ended the text, if one did

    @property
    def tokens_per_s(self) -> float | None:
        """Completion tokens per second of streaming, after the first token."""
        if self.usage is None or self.ttft_s is None or self.total_s <= self.ttft_s:
            return None
        return self.usage.completion_tokens / (self.total_s - self.ttft_s)


class _Tracker:
    """One job followed through /stream polls, with no I/O of its own: it
    decrypts, checks and times the items and says how to poll next.

    Each item must name the job's request (`binding`; None: the first item's
    name, for a job whose request this client did not send) and come in its
    place. An item of another request fails at once. A missing, repeated or
    reordered item may also be RunPod losing a post: the stream is then read
    no further, and once the job is done `recover` checks what RunPod stored
    (/status's output) from the first item; so does a stream that ended
    without its final item."""

    # Each poll asks the server to hold it open while there is nothing new
    # (`?wait=`, as RunPod's Go SDK asks of /stream), so the first token is
    # seen when it is posted. Where a server answers at once instead, poll
    # fast for a second, then slow down while a cold start keeps the job
    # queued. Once text flows, poll every `poll_interval`, so that tokens
    # batch up between polls, gently on RunPod's rate limits.
    HOLD_S, FAST_S, FAST_FOR_S, GROWTH, SLOWEST_S = 10.0, 0.025, 1.0, 1.5, 1.0

    def __init__(
        self,
        channel: Channel,
        job_id: str,
        submitted_at: float,
        poll_interval: float,
        timeout: float | None,
        binding: str | None,
    ):
        self.channel, self.job_id, self.submitted_at = channel, job_id, submitted_at
        self.binding = binding
        self.read: list[StreamItem] = []  # every item read so far, in order: item i has seq i
        self.out_of_place: str | None = None  # why the stream stopped being read
        self.poll_interval = poll_interval
        self.deadline = submitted_at + timeout if timeout else None
        self._hold_s = self.HOLD_S
        self.status = "IN_QUEUE"
        self.items: list[StreamItem] = []  # every item that carried something
        self.final: StreamItem | None = None
        self.first_content_at: float | None = None
        self.final_at: float | None = None
        self.arrivals = 0  # /stream responses that brought content
        self._last_poll_empty = False
        self._delay = self.FAST_S

    def poll_path(self) -> str:
        """The next /stream request, held no later than the deadline."""
        left = self.deadline - time.monotonic() if self.deadline else self.HOLD_S
        self._hold_s = max(min(self.HOLD_S, left), 0.0)
        return f"/stream/{self.job_id}?wait={int(self._hold_s * 1000)}"

    def feed(self, body: dict, held_s: float) -> list[StreamItem]:
        """The items with content in one /stream response, which took `held_s`."""
        self.status = body.get("status", self.status)
        chunks = body.get("stream") or []
        new = []
        # After the final item, only a shaped stream's filler.
        if self.final is None and self.out_of_place is None:
            for chunk in chunks:
                item = self._open(chunk.get("output"))
                self.out_of_place = self._misplaced(item, len(self.read))
                if self.out_of_place is not None:
                    break
                new += self._accept(item)
                if self.final is not None:
                    break
        self._take(new)
        self._last_poll_empty = not chunks
        if chunks:
            self._delay = self.poll_interval
        elif self._hold_s and held_s >= self._hold_s / 2:
            self._delay = 0.0  # the server held the poll: ask again at once
        elif time.monotonic() - self.submitted_at > self.FAST_FOR_S:
            self._delay = min(max(self._delay, self.FAST_S) * self.GROWTH, self.SLOWEST_S)
        return new

    def recover(self, outputs: Any) -> list[StreamItem]:
        """The items RunPod stored for the finished job (/status's output),
        where the stream fell short: checked from the first, those already
        read must be the very same; returns the ones not read before."""
        if not isinstance(outputs, list):
            outputs = []
        new = []
        for seq, output in enumerate(outputs):
            item = self._open(output)
            if seq < len(self.read):
                if item != self.read[seq]:
                    self._fail("an item differs between RunPod's stream and its stored output")
                continue
            if (misplaced := self._misplaced(item, seq)) is not None:
                self._fail(misplaced)
            new += self._accept(item)
            if self.final is not None:
                break
        if self.final is None:
            self._fail("the stream ended without its final item")
        self._take(new)
        return new

    def _open(self, output: Any) -> StreamItem:
        try:
            item = self.channel.open_item(output)
        except ProtocolError as error:
            raise DecryptionFailed(f"job {self.job_id}: {error.reason}") from None
        if item.request is None or item.seq is None:
            self._fail("an item does not name its request: the worker is older than protocol 1.2")
        self.binding = self.binding or item.request
        if item.request != self.binding:
            self._fail("an item answers another request")
        return item

    @staticmethod
    def _misplaced(item: StreamItem, due: int) -> str | None:
        if item.seq == due:
            return None
        if item.seq < due:
            return f"item {item.seq} arrived twice"
        return f"items out of order: item {item.seq} came where item {due} was due"

    def _accept(self, item: StreamItem) -> list[StreamItem]:
        """Takes an item in its place; the new content it brings."""
        self.read.append(item)
        if item.final:
            self.final, self.final_at = item, time.monotonic()
        return [] if item.empty else [item]

    def _take(self, new: list[StreamItem]) -> None:
        if any(item.text or item.reasoning or item.tool_calls for item in new):
            self.first_content_at = self.first_content_at or time.monotonic()
            self.arrivals += 1
        self.items += new

    def _fail(self, reason: str) -> NoReturn:
        raise StreamIntegrityError(self.job_id, reason)

    @property
    def ended(self) -> bool:
        """Nothing more for the caller: the final item came, or (as RunPod's
        own clients decide) a final status with no chunks."""
        return self.final is not None or (self.status in FINAL_STATUSES and self._last_poll_empty)

    @property
    def drained(self) -> bool:
        """Nothing more will arrive at all."""
        return self.status in FINAL_STATUSES and self._last_poll_empty

    @property
    def overdue(self) -> bool:
        """The client's timeout passed while the job was still unfinished."""
        return (
            self.deadline is not None
            and time.monotonic() > self.deadline
            and self.status not in FINAL_STATUSES
        )

    def next_delay(self) -> float:
        return self._delay

    def completion(self) -> Completion:
        final = self.final or StreamItem()
        end = self.final_at or time.monotonic()
        first = self.first_content_at
        return Completion(
            text="".join(item.text for item in self.items),
            finish_reason=final.finish_reason,
            usage=final.usage,
            job_id=self.job_id,
            ttft_s=first - self.submitted_at if first else None,
            total_s=end - self.submitted_at,
            arrivals=self.arrivals,
            reasoning="".join(item.reasoning for item in self.items),
            tool_calls=join_tool_calls([call for item in self.items for call in item.tool_calls]),
            logprobs=[entry for item in self.items for entry in item.logprobs],
            card=final.card,
            embeddings=sorted(
                (embedding for item in self.items for embedding in item.embeddings),
                key=lambda embedding: embedding.index,
            ),
            stop_sequence=final.stop_sequence,
        )


@dataclass
class Embeddings:
    """The answer to `embed(...)`."""

    vectors: list[list[float]]  # one per input, in the inputs' order
    usage: Usage  # prompt_tokens: the inputs' tokens, all told
    job_id: str

    @classmethod
    def of(cls, completion: Completion, inputs: int) -> Embeddings:
        vectors = [embedding.vector for embedding in one_vector_each(completion, inputs)]
        return cls(vectors, completion.usage, completion.job_id)


def one_vector_each(completion: Completion, inputs: int) -> list[Embedding]:
    """An embeddings answer's vectors, checked to be one for each of
    `inputs` inputs, in order, with the usage; ClientError if not."""
    indexes = [embedding.index for embedding in completion.embeddings]
    if indexes != list(range(inputs)) or completion.usage is None:
        raise ClientError(
            f"the job {completion.job_id} answered {len(indexes)} vectors "
            f"for {inputs} inputs, or not one each"
        )
    return completion.embeddings


# Image formats by their first bytes, so that `image_part` can name the media
# type of bytes it is given (the client side has no imaging library).
_IMAGE_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
)


def image_part(image: bytes | str | os.PathLike, media_type: str | None = None) -> dict[str, Any]:
    """A user message's content part holding an image (its bytes, or the
    path of its file) as a `data:` URL, which travels inside the encrypted
    request: `messages=[{"role": "user", "content": [{"type": "text",
    "text": "What is this?"}, image_part("photo.jpg")]}]`. `media_type` is
    read from the bytes when not given (PNG, JPEG, GIF, WebP, BMP)."""
    data = image if isinstance(image, bytes) else Path(image).read_bytes()
    if media_type is None:
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            media_type = "image/webp"
        else:
            media_type = next(
                (kind for head, kind in _IMAGE_SIGNATURES if data.startswith(head)), None
            )
        if media_type is None:
            raise ValueError("not a PNG, JPEG, GIF, WebP or BMP image: give its media_type")
    url = f"data:{media_type};base64,{base64.b64encode(data).decode()}"
    return {"type": "image_url", "image_url": {"url": url}}


def embed_request(
    input: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]],
    truncate_prompt_tokens: int | None,
    dimensions: int | None,
) -> dict[str, Any]:
    """The wire's `embed` field. As in OpenAI's API, `input` is one string,
    one token array, or a list of either."""
    if isinstance(input, str) or (input and all(type(each) is int for each in input)):
        inputs = [input if isinstance(input, str) else list(input)]
    else:
        inputs = [each if isinstance(each, str) else list(each) for each in input]
    fields = {
        "input": inputs,
        "truncate_prompt_tokens": truncate_prompt_tokens,
        "dimensions": dimensions,
    }
    return {name: value for name, value in fields.items() if value is not None}


# --- HTTP rules shared by both clients ---------------------------------------


def _error_for(response: httpx.Response) -> ClientError:
    status, where = response.status_code, response.request.url.path
    if status in (401, 403):
        return AuthenticationError(f"{status} from {where}: check RUNPOD_API_KEY")
    if status == 404:
        return EndpointNotFound(f"404 from {where}: no such endpoint, or the job expired")
    if status == 429:
        return RateLimited(f"429 from {where} after every retry")
    if status >= 500:
        return ServerError(f"{status} from {where} after every retry")
    return ClientError(f"{status} from {where}: {response.text[:200]}")


def _unreachable(base_url: httpx.URL, path: str, error: httpx.TransportError) -> ServerError:
    return ServerError(
        f"cannot reach {base_url.host}:{base_url.port or base_url.scheme} ({base_url}{path}): "
        f"{type(error).__name__}; check the endpoint id or base URL, and the network"
    )


def _safe_to_repeat(method: str, path: str) -> bool:
    return method == "GET" or "/cancel/" in path


def _backoff(attempt: int) -> float:
    return min(0.5 * 2**attempt, 8.0) * random.uniform(0.5, 1.0)


def _transport_retry_delay(
    error: httpx.TransportError, method: str, path: str, attempt: int, max_retries: int
) -> float | None:
    """How long to wait before sending again after no answer, or None: do not.
    A refused connection never reached the server; anything else might have."""
    repeatable = isinstance(error, httpx.ConnectError) or _safe_to_repeat(method, path)
    return _backoff(attempt) if repeatable and attempt < max_retries else None


def _retry_delay(response: httpx.Response, attempt: int, max_retries: int) -> float | None:
    """How long to wait before repeating this request, or None: do not."""
    if attempt >= max_retries:
        return None
    if response.status_code == 429:
        try:
            return min(float(response.headers.get("Retry-After", "")), 30.0)
        except ValueError:
            return _backoff(attempt)
    method, path = response.request.method, response.request.url.path
    if response.status_code >= 500 and _safe_to_repeat(method, path):
        return _backoff(attempt)
    return None


def _job_failure(job_id: str, envelope: dict) -> JobFailed:
    status, error = envelope.get("status", "FAILED"), envelope.get("error")
    if status == "TIMED_OUT":
        return JobTimeout(job_id, status, error)
    return JobFailed(job_id, status, error)


def _settings(
    endpoint_id: str | None, base_url: str | None, api_key: str | None, encryption_key: str | None
) -> tuple[str, str, Channel]:
    if (endpoint_id is None) == (base_url is None):
        raise ValueError("give exactly one of endpoint_id or base_url")
    api_key = api_key or os.environ.get("RUNPOD_API_KEY", "")
    if not api_key:
        raise ValueError("RUNPOD_API_KEY is not set")
    keys = Channel(encryption_key or os.environ.get("ENCRYPTION_KEY", ""))
    return base_url or f"{RUNPOD_API}/{endpoint_id}", api_key, keys


# How long closing a client waits for the background reads of finished
# streams (a constant-rate stream's filler lasts a quantum of intervals).
DRAIN_WAIT_S = 10.0


# --- The blocking client -----------------------------------------------------


class Client:
    """A RunPod endpoint running the encrypted worker, called synchronously.

    Every call that submits takes the request's fields as keywords:
    `messages`, `sampling_params`, `tools`, `tool_choice`,
    `parallel_tool_calls`, `structured_output`, `chat_template_kwargs`,
    `adapter` (a LoRA adapter of the worker's, by name); user messages may
    hold images (`image_part`). See docs/protocol.md; they are validated here
    before anything is sent.
    """

    def __init__(
        self,
        endpoint_id: str | None = None,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        encryption_key: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        poll_interval: float = DEFAULT_POLL_INTERVAL_S,
        max_retries: int = 5,
    ):
        url, api_key, self.channel = _settings(endpoint_id, base_url, api_key, encryption_key)
        self.timeout, self.poll_interval, self.max_retries = timeout, poll_interval, max_retries
        self._http = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {api_key}"}, timeout=HTTP_TIMEOUT_S
        )
        self._drains: set[threading.Thread] = set()

    def submit(self, prompt: str | None = None, **request: Any) -> Job:
        sealed = self.channel.seal_request(protocol.validate_request(prompt, **request))
        submitted_at = time.monotonic()
        reply = self._call("POST", "/run", {"input": sealed})
        return Job(self, reply["id"], submitted_at, request_binding(sealed["ciphertext"]))

    def stream(self, prompt: str | None = None, **request: Any) -> TextStream:
        """Submit, then iterate over the completion's text deltas."""
        return self.submit(prompt, **request).stream()

    def items(self, prompt: str | None = None, **request: Any) -> ItemStream:
        """Submit, then iterate over its typed items (text, reasoning, tool
        calls, logprobs), as the worker sent them."""
        return self.submit(prompt, **request).items()

    def run_sync(self, prompt: str | None = None, **request: Any) -> Completion:
        """Submit and wait for the whole completion."""
        return self.submit(prompt, **request).result()

    def describe(self) -> WorkerCard:
        """What the endpoint's worker serves and supports (wire protocol v1.1)."""
        return self.submit(describe=True).result().card

    def embed(
        self,
        input: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]],
        *,
        truncate_prompt_tokens: int | None = None,
        dimensions: int | None = None,
    ) -> Embeddings:
        """The vectors of `input` (strings or token arrays), from an endpoint
        that serves an embedding model; one job for them all."""
        embed = embed_request(input, truncate_prompt_tokens, dimensions)
        return Embeddings.of(self.run_sync(embed=embed), len(embed["input"]))

    def job(self, job_id: str, binding: str | None = None) -> Job:
        """A handle on a job submitted earlier, e.g. by another process. Give
        its request's `binding` (the submitter's `Job.binding`) to check that
        the answer is that request's; without it, the answer is checked to be
        whole and in order, and to answer one request."""
        return Job(self, job_id, time.monotonic(), binding)

    def health(self) -> dict:
        return self._call("GET", "/health")

    def close(self) -> None:
        deadline = time.monotonic() + DRAIN_WAIT_S
        for drain in list(self._drains):
            drain.join(max(deadline - time.monotonic(), 0))
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        for attempt in range(self.max_retries + 1):
            try:
                response = self._http.request(method, path, json=body)
            except httpx.TransportError as error:
                delay = _transport_retry_delay(error, method, path, attempt, self.max_retries)
                if delay is not None:
                    time.sleep(delay)
                    continue
                raise _unreachable(self._http.base_url, path, error) from error
            if response.status_code < 400:
                return response.json()
            delay = _retry_delay(response, attempt, self.max_retries)
            if delay is None:
                raise _error_for(response)
            time.sleep(delay)
        raise AssertionError("unreachable")

    def _drain(self, tracker: _Tracker) -> None:
        """Reads a finished stream to its end, in the background."""

        def read_to_the_end() -> None:
            try:
                while not (tracker.drained or tracker.overdue):
                    time.sleep(tracker.next_delay())
                    asked = time.monotonic()
                    tracker.feed(self._call("GET", tracker.poll_path()), time.monotonic() - asked)
            except ClientError:
                pass  # nothing of it was for the caller
            finally:
                self._drains.discard(thread)

        thread = threading.Thread(target=read_to_the_end, daemon=True)
        self._drains.add(thread)
        thread.start()


class Job:
    """A submitted job: its status, its stream, its result, its cancellation."""

    def __init__(
        self, client: Client, job_id: str, submitted_at: float, binding: str | None = None
    ):
        self._client, self.id, self.submitted_at = client, job_id, submitted_at
        self.binding = binding  # what its answer's items name its request by

    def status(self) -> str:
        return self._client._call("GET", f"/status/{self.id}")["status"]

    def cancel(self) -> str:
        return self._client._call("POST", f"/cancel/{self.id}")["status"]

    def stream(self) -> TextStream:
        return TextStream(self, self._follow())

    def items(self) -> ItemStream:
        return ItemStream(self, self._follow())

    def result(self) -> Completion:
        with self.items() as items:
            for _ in items:
                pass
        return items.completion

    def _follow(self) -> Iterator[StreamItem | Completion]:
        client = self._client
        tracker = _Tracker(
            client.channel,
            self.id,
            self.submitted_at,
            client.poll_interval,
            client.timeout,
            self.binding,
        )
        try:
            while True:
                asked = time.monotonic()
                body = client._call("GET", tracker.poll_path())
                yield from tracker.feed(body, held_s=time.monotonic() - asked)
                if tracker.ended:
                    break
                if tracker.overdue:
                    raise JobTimeout(self.id, "cancelled after the client's timeout")
                time.sleep(tracker.next_delay())
        finally:
            if tracker.final is None and tracker.status not in FINAL_STATUSES:
                self._cancel_quietly()
        if tracker.final is None:
            stored = client._call("GET", f"/status/{self.id}")
            if tracker.status != "COMPLETED":
                raise _job_failure(self.id, stored)
            # The stream fell short: what RunPod stored settles it.
            yield from tracker.recover(stored.get("output"))
        elif not tracker.drained:
            client._drain(tracker)
        yield tracker.completion()

    def _cancel_quietly(self) -> None:
        try:
            self.cancel()
        except ClientError:
            pass  # the caller's own exception matters more


class ItemStream:
    """Iterates over a job's items (`protocol.StreamItem`: text, reasoning,
    tool-call fragments, logprobs); `completion` (everything joined, usage,
    timings) is set once the stream is exhausted. Closing it early cancels
    the job."""

    def __init__(self, job: Job, follow: Iterator[StreamItem | Completion]):
        self.job = job
        self.completion: Completion | None = None
        self._follow = follow
        self._started = False

    def __iter__(self):
        return self

    def __next__(self) -> StreamItem:
        self._started = True
        piece = next(self._follow)
        if isinstance(piece, Completion):
            self.completion = piece
            raise StopIteration
        return piece

    def close(self) -> None:
        if not self._started:  # never read: the follower never ran, cancel here
            self._started = True
            self.job._cancel_quietly()
        self._follow.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class TextStream(ItemStream):
    """Iterates over the completion's text deltas alone."""

    def __next__(self) -> str:
        while True:
            item = super().__next__()
            if item.text:
                return item.text


# --- The async client -----------------------------------------------------------


class AsyncClient:
    """The same calls as `Client`, to await."""

    def __init__(
        self,
        endpoint_id: str | None = None,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        encryption_key: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        poll_interval: float = DEFAULT_POLL_INTERVAL_S,
        max_retries: int = 5,
    ):
        url, api_key, self.channel = _settings(endpoint_id, base_url, api_key, encryption_key)
        self.timeout, self.poll_interval, self.max_retries = timeout, poll_interval, max_retries
        self._http = httpx.AsyncClient(
            base_url=url,
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=HTTP_TIMEOUT_S,
            limits=httpx.Limits(max_connections=None),
        )
        # Reads of finished streams and cancels of abandoned jobs, in tasks of
        # their own (see _in_background); closing the client waits for them.
        self._background: set[asyncio.Task] = set()

    async def submit(self, prompt: str | None = None, **request: Any) -> AsyncJob:
        sealed = self.channel.seal_request(protocol.validate_request(prompt, **request))
        submitted_at = time.monotonic()
        reply = await self._call("POST", "/run", {"input": sealed})
        return AsyncJob(self, reply["id"], submitted_at, request_binding(sealed["ciphertext"]))

    async def stream(self, prompt: str | None = None, **request: Any) -> AsyncTextStream:
        return (await self.submit(prompt, **request)).stream()

    async def items(self, prompt: str | None = None, **request: Any) -> AsyncItemStream:
        return (await self.submit(prompt, **request)).items()

    async def run_sync(self, prompt: str | None = None, **request: Any) -> Completion:
        return await (await self.submit(prompt, **request)).result()

    async def describe(self) -> WorkerCard:
        return (await (await self.submit(describe=True)).result()).card

    async def embed(
        self,
        input: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]],
        *,
        truncate_prompt_tokens: int | None = None,
        dimensions: int | None = None,
    ) -> Embeddings:
        embed = embed_request(input, truncate_prompt_tokens, dimensions)
        return Embeddings.of(await self.run_sync(embed=embed), len(embed["input"]))

    def job(self, job_id: str, binding: str | None = None) -> AsyncJob:
        return AsyncJob(self, job_id, time.monotonic(), binding)

    async def health(self) -> dict:
        return await self._call("GET", "/health")

    async def aclose(self) -> None:
        if self._background:
            await asyncio.wait(self._background, timeout=DRAIN_WAIT_S)
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.aclose()

    async def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        for attempt in range(self.max_retries + 1):
            try:
                response = await self._http.request(method, path, json=body)
            except httpx.TransportError as error:
                delay = _transport_retry_delay(error, method, path, attempt, self.max_retries)
                if delay is not None:
                    await asyncio.sleep(delay)
                    continue
                raise _unreachable(self._http.base_url, path, error) from error
            if response.status_code < 400:
                return response.json()
            delay = _retry_delay(response, attempt, self.max_retries)
            if delay is None:
                raise _error_for(response)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    def _drain(self, tracker: _Tracker) -> None:
        async def read_to_the_end() -> None:
            try:
                while not (tracker.drained or tracker.overdue):
                    await asyncio.sleep(tracker.next_delay())
                    asked = time.monotonic()
                    body = await self._call("GET", tracker.poll_path())
                    tracker.feed(body, time.monotonic() - asked)
            except ClientError:
                pass  # nothing of it was for the caller

        self._in_background(read_to_the_end())

    def _in_background(self, work: Coroutine[Any, Any, None]) -> asyncio.Task:
        """`work` in a task of its own, which the caller's cancellation
        does not reach and which closing the client waits for."""
        task = asyncio.ensure_future(work)
        self._background.add(task)  # the loop itself keeps only a weak reference
        task.add_done_callback(self._background.discard)
        return task


class AsyncJob:
    def __init__(
        self, client: AsyncClient, job_id: str, submitted_at: float, binding: str | None = None
    ):
        self._client, self.id, self.submitted_at = client, job_id, submitted_at
        self.binding = binding  # what its answer's items name its request by

    async def status(self) -> str:
        return (await self._client._call("GET", f"/status/{self.id}"))["status"]

    async def cancel(self) -> str:
        return (await self._client._call("POST", f"/cancel/{self.id}"))["status"]

    def stream(self) -> AsyncTextStream:
        return AsyncTextStream(self, self._follow())

    def items(self) -> AsyncItemStream:
        return AsyncItemStream(self, self._follow())

    async def result(self) -> Completion:
        async with self.items() as items:
            async for _ in items:
                pass
        return items.completion

    async def _follow(self) -> AsyncIterator[list[StreamItem] | Completion]:
        """The items of each /stream answer that brought some, then the completion."""
        client = self._client
        tracker = _Tracker(
            client.channel,
            self.id,
            self.submitted_at,
            client.poll_interval,
            client.timeout,
            self.binding,
        )
        try:
            while True:
                asked = time.monotonic()
                body = await client._call("GET", tracker.poll_path())
                arrived = tracker.feed(body, held_s=time.monotonic() - asked)
                if arrived:
                    yield arrived
                if tracker.ended:
                    break
                if tracker.overdue:
                    raise JobTimeout(self.id, "cancelled after the client's timeout")
                await asyncio.sleep(tracker.next_delay())
        finally:
            if tracker.final is None and tracker.status not in FINAL_STATUSES:
                await self._cancel_quietly()
        if tracker.final is None:
            stored = await client._call("GET", f"/status/{self.id}")
            if tracker.status != "COMPLETED":
                raise _job_failure(self.id, stored)
            # The stream fell short: what RunPod stored settles it.
            if recovered := tracker.recover(stored.get("output")):
                yield recovered
        elif not tracker.drained:
            client._drain(tracker)
        yield tracker.completion()

    async def _cancel_quietly(self) -> None:
        # Shielded, in a task of its own: a caller cancelled by a cancel scope
        # (anyio's, as ASGI servers use when an HTTP caller disconnects)
        # would have every await of its own cancelled again, this one too.
        await asyncio.shield(self._client._in_background(self._cancel_ignoring_errors()))

    async def _cancel_ignoring_errors(self) -> None:
        try:
            await self.cancel()
        except ClientError:
            pass  # the caller's own exception matters more


class AsyncItemStream:
    """`ItemStream`, to iterate with `async for`; `ready()` also takes, without
    waiting, the items that arrived with the last one read."""

    def __init__(self, job: AsyncJob, follow: AsyncIterator[list[StreamItem] | Completion]):
        self.job = job
        self.completion: Completion | None = None
        self._follow = follow
        self._arrived: collections.deque[StreamItem] = collections.deque()  # not yet read
        self._started = False

    def __aiter__(self):
        return self

    async def __anext__(self) -> StreamItem:
        self._started = True
        if not self._arrived:
            piece = await anext(self._follow)
            if isinstance(piece, Completion):
                self.completion = piece
                raise StopAsyncIteration
            self._arrived.extend(piece)
        return self._arrived.popleft()

    def ready(self) -> list[StreamItem]:
        """The items received and not yet read, at once: those that arrived in
        the same /stream answer as the last one read. A relay (the gateway)
        forwards them as one piece."""
        items = list(self._arrived)
        self._arrived.clear()
        return items

    async def aclose(self) -> None:
        if not self._started:  # never read: the follower never ran, cancel here
            self._started = True
            await self.job._cancel_quietly()
        await self._follow.aclose()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.aclose()


class AsyncTextStream(AsyncItemStream):
    """`TextStream`, to iterate with `async for`."""

    async def __anext__(self) -> str:
        while True:
            item = await super().__anext__()
            if item.text:
                return item.text
