"""The gateway's ASGI app: OpenAI's and Anthropic's HTTP APIs, each call
turned into an encrypted job on a RunPod endpoint, so that their SDKs and
the agent frameworks built on them work unchanged. `cli` serves it on
loopback (`encrypted-vllm-gateway`); `in_process` serves it inside the
caller's process. Routes: `POST /v1/chat/completions`, `POST
/v1/completions` (`openai_chat`), `POST /v1/responses`
(`openai_responses`) and `POST /v1/messages` (`anthropic_messages`),
streamed or not; `POST /v1/embeddings` (`openai_embeddings`); `GET
/v1/models`, `GET /health`. docs/gateway.md has the configuration file and
calls from each SDK, curl, LangChain, Agno and the OpenAI Agents SDK.

Rules:
- One code path: `client.AsyncClient` submits, streams, retries and cancels
  every job; this module routes, and each API's module translates (the
  contract is `api.RouteRequest`).
- The keys never leave this process, and only ciphertext leaves it towards
  RunPod. It listens beyond loopback only when GATEWAY_API_KEY is set, and
  then every caller must send that key, as its bearer token or `x-api-key`.
- A response's status waits for the job's first item: until it arrives,
  every failure is an HTTP status with the API's error object (`api_error`,
  written by the route's `error_body`); once it has, a stream that fails
  ends with the API's error event.
- A model's fallbacks serve a request when its endpoint cannot be reached,
  keeps answering 429 or 5xx through the client's retries, or fails the job
  with ENGINE_ERROR or WORKER_STOPPED, all before the job's first item;
  never after it.
- A worker's LoRA adapters are models of their own, as `vllm serve` has
  them: those its card lets this gateway's key name (an endpoint named by
  its card), or a --config model's `adapter`.
- A caller that disconnects, before or during its answer, has its job
  cancelled at once.
- Every API request logs one line: the model asked for (when it is one
  served here), the endpoint and model that served it, the fallbacks taken,
  status, error code, TTFT and tokens. Never text, keys or ciphertext.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
import sys
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pydantic
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from encrypted_vllm.client import library as client
from encrypted_vllm.client.gateway import (
    anthropic_messages,
    openai_chat,
    openai_embeddings,
    openai_responses,
)
from encrypted_vllm.client.gateway.api import (
    ApiError,
    Event,
    Events,
    InvalidRequest,
    RouteRequest,
    openai_error_body,
    parse_request,
    unsupported,
)
from encrypted_vllm.client.library import AsyncClient, AsyncItemStream, ClientError
from encrypted_vllm.wire.protocol import ADAPTER_NAME, ErrorCode, StreamItem, WorkerCard

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, before it joined the standard library
    import tomli as tomllib

log = logging.getLogger("gateway")

# A model's name as callers send it and the log names it.
MODEL_NAME = r"^[\w.:/@+-]{1,128}$"


# --- Errors ----------------------------------------------------------------------


def _refused(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", code, param, retry=False)


def _server_error(status: int, message: str, code: str, *, retry: bool | None = None) -> ApiError:
    return ApiError(status, message, "server_error", code, retry=retry)


KEY_MISMATCH = (
    "the gateway's ENCRYPTION_KEY and the worker's do not match (DECRYPTION_FAILED): {}. "
    "Give the gateway one of the keys in the worker's ENCRYPTION_KEY."
)


def api_error(error: Exception) -> ApiError:
    """The status and error object an OpenAI client expects for a failure of
    the client library. Its messages name endpoints, jobs and the worker's
    fixed reasons, never request content."""
    if isinstance(error, client.JobTimeout):
        return _server_error(
            504, f"the job did not finish in time: {error}", "timeout", retry=False
        )
    if isinstance(error, client.JobFailed):
        reason = error.reason
        if error.code is ErrorCode.INVALID_INPUT:
            return _refused(f"the worker refused the request: {reason}", code="invalid_input")
        if error.code in (ErrorCode.ENGINE_ERROR, ErrorCode.WORKER_STOPPED):
            return _server_error(503, f"the worker failed the job: {reason}", error.code.lower())
        if error.code is ErrorCode.DECRYPTION_FAILED:
            message = KEY_MISMATCH.format("the worker cannot decrypt the gateway's request")
            return _server_error(500, message, "decryption_failed", retry=False)
        if error.code is ErrorCode.TOKEN_EXPIRED:
            return _server_error(504, f"the job expired: {reason}", "token_expired", retry=False)
        if error.code is ErrorCode.REPLAYED:
            return _server_error(500, f"the worker refused the job: {reason}", "replayed")
        return _server_error(502, f"RunPod ended the job: {error}", "job_failed")
    if isinstance(error, client.StreamIntegrityError):
        return _server_error(502, str(error), "stream_integrity", retry=False)
    if isinstance(error, client.DecryptionFailed):
        message = KEY_MISMATCH.format("the gateway cannot decrypt the worker's answer")
        return _server_error(500, message, "decryption_failed", retry=False)
    if isinstance(error, client.RateLimited):
        return ApiError(
            429, f"RunPod's rate limit: {error}", "rate_limit_error", "rate_limit_exceeded"
        )
    if isinstance(error, client.AuthenticationError):
        return _server_error(
            502, f"RunPod refused the gateway's RUNPOD_API_KEY: {error}", "runpod_auth"
        )
    if isinstance(error, client.EndpointNotFound):
        return _server_error(
            502, f"RunPod does not know the endpoint: {error}", "endpoint_not_found"
        )
    return _server_error(
        502, f"RunPod failed or could not be reached: {error}", "runpod_unavailable"
    )


def worth_a_fallback(error: ClientError) -> bool:
    """Whether the next model of a chain should serve the request instead."""
    if isinstance(error, client.JobFailed):
        return error.code in (ErrorCode.ENGINE_ERROR, ErrorCode.WORKER_STOPPED)
    return isinstance(error, client.RateLimited | client.ServerError)


def _where(error: BaseException) -> str:
    """An exception's type and innermost frame, without its message."""
    frames = traceback.extract_tb(error.__traceback__)
    place = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    return f"{type(error).__name__}{place}"


# --- Models and their endpoints -----------------------------------------------------


class Provider:
    """One model this gateway serves: the endpoint behind it, called through
    its own AsyncClient, the LoRA adapter of that endpoint's worker its
    requests name (if any), and the models that stand in for it."""

    def __init__(
        self,
        endpoint: AsyncClient,
        where: str,
        name: str | None = None,
        fallbacks: tuple[str, ...] = (),
        adapter: str | None = None,
    ):
        self.client, self.where, self.fallbacks = endpoint, where, fallbacks
        self.adapter = adapter
        self._name = name
        self._card: WorkerCard | None = None
        self._describing = asyncio.Lock()

    async def card(self) -> WorkerCard:
        """The worker's card, asked for once."""
        if self._card is None:
            async with self._describing:
                if self._card is None:
                    card = await self.client.describe()
                    if card is None:
                        raise ClientError(f"the worker at {self.where} did not describe itself")
                    self._card = card
        return self._card

    async def name(self) -> str:
        """The model's name: the configured one, else the worker's card's."""
        if self._name is None:
            self._name = (await self.card()).model
        return self._name

    def known_adapters(self) -> tuple[str, ...]:
        """The LoRA adapters its worker lets this gateway's key name, as the
        card the gateway asked for says (an endpoint named by its card; one
        named in --config is not asked, and names its adapter itself). Read
        once: restart the gateway when the worker's LORA_MODULES change."""
        return self._card.adapters if self._card is not None and self.adapter is None else ()

    def through(self, adapter: str) -> Provider:
        """This endpoint, serving requests through one of its adapters."""
        return Provider(self.client, self.where, adapter, adapter=adapter)

    def wire_request(self, fields: dict[str, Any]) -> dict[str, Any]:
        """A wire request as this model sends it: naming its adapter, if any."""
        if self.adapter is None:
            return fields
        if "embed" in fields:
            raise unsupported("model", "a LoRA adapter serves completions, not embeddings")
        return {**fields, "adapter": self.adapter}


class Models:
    """The models this gateway serves, by the name callers ask for: one
    endpoint named by its worker's card, or the models of --config."""

    def __init__(self, providers: list[Provider]):
        self.providers = providers

    async def listing(self) -> list[tuple[str, str | None]]:
        """Every model callers may ask for, and for each LoRA adapter a card
        named, the model it adapts."""
        entries: list[tuple[str, str | None]] = []
        for provider in self.providers:
            name = await provider.name()
            entries += [(name, None), *((each, name) for each in provider.known_adapters())]
        return entries

    async def chain(self, asked: str) -> list[Provider]:
        """The providers that may serve `asked`, in order; 404 when none. A
        card's adapter is a model of its own, as `vllm serve` has them, on
        its one endpoint."""
        by_name = {await provider.name(): provider for provider in self.providers}
        first = by_name.get(asked)
        if first is not None:
            return [first, *(by_name[name] for name in first.fallbacks)]
        for provider in self.providers:
            if asked in provider.known_adapters():
                return [provider.through(asked)]
        raise ApiError(
            404,
            "The model does not exist here: GET /v1/models lists the models this gateway serves.",
            "invalid_request_error",
            "model_not_found",
            "model",
            retry=False,
        )

    async def warm_up(self) -> None:
        """Names each model in the log once (asking a card where needed), so
        that the first request does not wait for it."""
        for provider in self.providers:
            try:
                name = await provider.name()
            except ClientError as error:
                log.warning(
                    "%s did not describe itself yet: %s", provider.where, type(error).__name__
                )
                continue
            fallbacks = f", fallbacks {', '.join(provider.fallbacks)}" if provider.fallbacks else ""
            log.info("serving model %s from %s%s", name, provider.where, fallbacks)

    async def aclose(self) -> None:
        await asyncio.gather(*(provider.client.aclose() for provider in self.providers))


class ModelConfig(pydantic.BaseModel):
    """One `[models.NAME]` table of --config."""

    model_config = pydantic.ConfigDict(extra="forbid")

    endpoint_id: str | None = None
    base_url: str | None = None  # instead of endpoint_id, e.g. a loopback endpoint's
    api_key_env: str = "RUNPOD_API_KEY"  # the variable that holds its RunPod API key
    encryption_key_env: str = "ENCRYPTION_KEY"  # the variable that holds its key
    fallbacks: list[str] = []  # the models that serve in its place, in order
    # A LoRA adapter of the endpoint's worker, named in each request.
    adapter: str | None = pydantic.Field(None, pattern=ADAPTER_NAME)
    timeout_s: float = pydantic.Field(client.DEFAULT_TIMEOUT_S, gt=0)
    max_retries: int = pydantic.Field(5, ge=0)  # of a 429, 5xx or lost connection
    poll_interval_s: float = pydantic.Field(client.DEFAULT_POLL_INTERVAL_S, gt=0)

    @pydantic.model_validator(mode="after")
    def _one_endpoint(self) -> ModelConfig:
        if (self.endpoint_id is None) == (self.base_url is None):
            raise ValueError("give exactly one of endpoint_id or base_url")
        return self


class GatewayConfig(pydantic.BaseModel):
    """The --config file."""

    model_config = pydantic.ConfigDict(extra="forbid")

    models: dict[str, ModelConfig] = pydantic.Field(min_length=1)

    @pydantic.field_validator("models")
    @classmethod
    def _chains(cls, models: dict[str, ModelConfig]) -> dict[str, ModelConfig]:
        for name, model in models.items():
            if not re.fullmatch(MODEL_NAME, name):
                raise ValueError(f"model name {name!r} does not match {MODEL_NAME}")
            unknown = set(model.fallbacks) - set(models)
            if unknown:
                raise ValueError(f"{name}: fallbacks name unknown models: {', '.join(unknown)}")
            if name in model.fallbacks or len(set(model.fallbacks)) != len(model.fallbacks):
                raise ValueError(f"{name}: fallbacks repeat a model or name the model itself")
        return models


class ConfigError(ValueError):
    """The --config file, or a key variable it names, is wrong."""


def load_models(path: Path, environ: Mapping[str, str]) -> Models:
    """The models of a --config file, with their keys from `environ`."""
    try:
        config = GatewayConfig.model_validate(tomllib.loads(path.read_text()))
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not TOML: {error}") from None
    except pydantic.ValidationError as error:
        problems = [
            f"  {'.'.join(map(str, detail['loc']))}: {detail['msg']}"
            for detail in error.errors(include_input=False, include_url=False)
        ]
        raise ConfigError(f"{path}:\n" + "\n".join(problems)) from None
    providers = []
    for name, model in config.models.items():
        keys = {}
        for variable in (model.api_key_env, model.encryption_key_env):
            keys[variable] = environ.get(variable, "").strip()
            if not keys[variable]:
                raise ConfigError(f"model {name}: {variable} is not set")
        try:
            endpoint = AsyncClient(
                model.endpoint_id,
                base_url=model.base_url,
                api_key=keys[model.api_key_env],
                encryption_key=keys[model.encryption_key_env],
                timeout=model.timeout_s,
                poll_interval=model.poll_interval_s,
                max_retries=model.max_retries,
            )
        except ValueError as error:  # a malformed key; the message never holds it
            raise ConfigError(f"model {name}: {model.encryption_key_env}: {error}") from None
        where = model.endpoint_id or model.base_url
        providers.append(Provider(endpoint, where, name, tuple(model.fallbacks), model.adapter))
    return Models(providers)


# --- One request -------------------------------------------------------------------


@dataclass
class RequestRecord:
    """What the one log line of a request says: names and numbers, never text."""

    route: str | None
    stream: bool | None = None
    received: float = field(default_factory=time.monotonic)
    model: str | None = None  # asked for, once known to be served here
    served_by: str | None = None
    endpoint: str | None = None
    job: str | None = None
    fallbacks: list[str] = field(default_factory=list)
    status: int | None = None
    outcome: str | None = None  # completed, failed, disconnected
    error: str | None = None  # the error's code
    first_content: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    logged: bool = False

    def saw(self, items: list[StreamItem]) -> None:
        for item in items:
            if self.first_content is None and (item.text or item.reasoning or item.tool_calls):
                self.first_content = time.monotonic()
            if item.usage is not None:
                self.prompt_tokens = item.usage.prompt_tokens
                self.completion_tokens = item.usage.completion_tokens

    def failed(self, error: ApiError) -> None:
        self.status = self.status or error.status  # a stream keeps its 200
        self.outcome, self.error = "failed", error.code or error.kind

    def log(self) -> None:
        if self.logged:
            return
        self.logged = True
        ttft = self.first_content - self.received if self.first_content else None
        fields = {
            "route": self.route,
            "stream": self.stream,
            "model": self.model,
            "served_by": self.served_by,
            "endpoint": self.endpoint,
            "job": self.job,
            "fallbacks": self.fallbacks or None,
            "status": self.status,
            "outcome": self.outcome,
            "error": self.error,
            "ttft_ms": round(ttft * 1000, 1) if ttft is not None else None,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "duration_ms": round((time.monotonic() - self.received) * 1000, 1),
        }
        line = {name: value for name, value in fields.items() if value is not None}
        log.info("request %s", json.dumps(line))


@dataclass
class Opened:
    """A job whose first items have arrived: from here on it cannot fall back."""

    provider_name: str
    stream: AsyncItemStream
    first: list[StreamItem]  # what the endpoint's first answer brought

    @property
    def job_id(self) -> str:
        return self.stream.job.id


def _as_sse(events: list[Event]) -> bytes:
    """These events, framed by sse-starlette, as one write."""
    return b"".join(
        (event if isinstance(event, ServerSentEvent) else ServerSentEvent(event, sep="\n")).encode()
        for event in events
    )


class CallerLeft(Exception):
    """The caller disconnected before its answer began."""


Result = TypeVar("Result")


async def _caller_left(request: Request) -> None:
    """Returns once the caller has disconnected (the body is read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_caller_leaves(request: Request, work: Awaitable[Result]) -> Result:
    """`work`'s result; if the caller disconnects first, `work` is cancelled
    (which cancels its job, see the client library) and CallerLeft is raised."""
    working = asyncio.ensure_future(work)
    watching = asyncio.ensure_future(_caller_left(request))
    try:
        await asyncio.wait((working, watching), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
        if not working.done():
            working.cancel()
            with contextlib.suppress(asyncio.CancelledError, ClientError, ApiError):
                await working  # its cleanup: the job's cancel
    if working.cancelled():
        raise CallerLeft
    return working.result()


# --- The application ------------------------------------------------------------------


class Gateway:
    """The ASGI application: OpenAI's routes over `models`."""

    def __init__(self, models: Models, api_key: str | None):
        self.models, self.api_key = models, api_key
        self.started = int(time.time())
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/responses", self.responses, methods=["POST"]),
                Route("/v1/messages", self.messages, methods=["POST"]),
                Route("/v1/embeddings", self.embeddings, methods=["POST"]),
                Route("/v1/models", self.list_models, methods=["GET"]),
                Route("/health", self.health, methods=["GET"]),
            ],
            exception_handlers={HTTPException: self._unknown_route},
            lifespan=self._lifespan,
        )

    @contextlib.asynccontextmanager
    async def _lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        warming = asyncio.ensure_future(self.models.warm_up())
        try:
            yield
        finally:
            warming.cancel()
            await self.models.aclose()  # waits for the cancels of abandoned jobs

    def _authorize(self, request: Request) -> None:
        """GATEWAY_API_KEY as the bearer token (OpenAI's SDKs) or as
        `x-api-key` (Anthropic's)."""
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else request.headers.get("x-api-key")
        if given is None or not secrets.compare_digest(given.encode(), self.api_key.encode()):
            raise ApiError(
                401,
                "Incorrect API key provided: give the client the gateway's GATEWAY_API_KEY.",
                "invalid_request_error",
                "invalid_api_key",
                retry=False,
            )

    async def health(self, _request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def list_models(self, request: Request) -> Response:
        record = RequestRecord(route=request.url.path)
        try:
            self._authorize(request)
            entries = await self.models.listing()
        except ApiError as error:
            return self._failure(record, error)
        except ClientError as error:
            return self._failure(record, api_error(error))
        record.status, record.outcome = 200, "completed"
        record.log()
        if "anthropic-version" in request.headers:  # the anthropic SDK's models.list()
            names = [name for name, _parent in entries]
            return JSONResponse(anthropic_messages.model_list(names, self.started))
        return JSONResponse(openai_chat.model_list(entries, self.started))

    async def chat_completions(self, request: Request) -> Response:
        return await self._complete(request, openai_chat.ChatCompletionRequest)

    async def responses(self, request: Request) -> Response:
        return await self._complete(request, openai_responses.ResponsesRequest)

    async def messages(self, request: Request) -> Response:
        return await self._complete(request, anthropic_messages.MessagesRequest)

    async def completions(self, request: Request) -> Response:
        return await self._complete(request, openai_chat.CompletionRequest)

    async def embeddings(self, request: Request) -> Response:
        return await self._complete(request, openai_embeddings.EmbeddingsRequest)

    async def _complete(self, request: Request, request_model: type[RouteRequest]) -> Response:
        record = RequestRecord(route=request.url.path)
        created = int(time.time())
        error_body = request_model.error_body
        try:
            self._authorize(request)
            body = parse_request(request_model, await request.body())
            record.stream = body.stream
            chain = await self.models.chain(body.model)
            record.model = body.model
            wire = body.wire_request()
            if body.stream:
                opened = await _unless_caller_leaves(request, self._open(chain, wire, record))
            else:
                opened, completion = await _unless_caller_leaves(
                    request, self._whole(chain, wire, record)
                )
        except InvalidRequest as error:
            return self._failure(record, error.as_api_error(), error_body)
        except ApiError as error:
            return self._failure(record, error, error_body)
        except ClientError as error:
            return self._failure(record, api_error(error), error_body)
        except CallerLeft:
            record.status, record.outcome = 499, "disconnected"
            record.log()
            return Response(status_code=499)  # nobody reads it
        except Exception as error:
            log.error("request: internal error %s", _where(error))
            failure = _server_error(500, "internal error in the gateway", "internal_error")
            return self._failure(record, failure, error_body)
        head = {
            "response_id": body.id_prefix + opened.job_id,
            "created": created,
            "model": opened.provider_name,
        }
        if body.stream:
            record.status = 200
            events = self._events(opened, body.chunks(**head), record)
            return EventSourceResponse(events, sep="\n")
        try:
            answer = body.answer(completion, **head)
        except ApiError as error:  # an answer that cannot be right (e.g. vectors missing)
            return self._failure(record, error, error_body)
        record.status, record.outcome = 200, "completed"
        record.log()
        return Response(answer, media_type="application/json")

    def _failure(
        self,
        record: RequestRecord,
        error: ApiError,
        error_body: Callable[[ApiError], dict[str, Any]] = openai_error_body,
    ) -> Response:
        record.failed(error)
        record.log()
        return JSONResponse(error_body(error), status_code=error.status, headers=error.headers)

    async def _open(
        self, chain: list[Provider], wire: dict[str, Any], record: RequestRecord
    ) -> Opened:
        """A job on the first model of `chain` that yields a first item."""
        for position, provider in enumerate(chain):
            name = await provider.name()
            record.served_by, record.endpoint = name, provider.where
            try:
                stream = await provider.client.items(**provider.wire_request(wire))
                record.job = stream.job.id
                try:
                    first = await anext(stream)
                except StopAsyncIteration:  # a job that completed with no item at all
                    raise ClientError(
                        f"the job {stream.job.id} completed without an answer"
                    ) from None
                except BaseException:
                    await stream.aclose()
                    raise
            except ClientError as error:
                if position == len(chain) - 1 or not worth_a_fallback(error):
                    raise
                record.fallbacks.append(name)
                record.job = None
                continue
            return Opened(name, stream, [first, *stream.ready()])
        raise AssertionError("a chain has at least one model")

    async def _whole(
        self, chain: list[Provider], wire: dict[str, Any], record: RequestRecord
    ) -> tuple[Opened, client.Completion]:
        opened = await self._open(chain, wire, record)
        record.saw(opened.first)
        async with opened.stream as stream:
            async for item in stream:
                record.saw([item])
        completion = stream.completion
        if completion is None or completion.finish_reason is None:
            raise ClientError(f"the job {opened.job_id} ended without its last item")
        return opened, completion

    async def _events(
        self,
        opened: Opened,
        chunks: Events,
        record: RequestRecord,
    ) -> AsyncIterator[bytes]:
        """A stream's events, those of one endpoint answer in one write: the
        events of its items, up to those that end it; or, if the job fails
        on the way, the API's error events."""
        pending = chunks.opening()
        try:
            async with opened.stream as stream:
                items = opened.first
                while items:
                    record.saw(items)
                    pending += chunks.of(items)
                    if items[-1].final:
                        record.outcome = "completed"
                    yield _as_sse(pending)
                    pending = []
                    # After the last item this only lets the client library
                    # finish (and read a shaped stream's filler to its end).
                    item = await anext(stream, None)
                    items = [item, *stream.ready()] if item is not None else []
            if record.outcome != "completed":
                raise ClientError(f"the job {opened.job_id} ended without its last item")
        except ClientError as error:
            failure = api_error(error)
            record.failed(failure)
            # `pending`: the opening events, if the failure came before them.
            yield _as_sse([*pending, *chunks.failure(failure)])
        except Exception as error:
            log.error("stream: internal error %s", _where(error))
            failure = _server_error(500, "internal error in the gateway", "internal_error")
            record.failed(failure)
            yield _as_sse([*pending, *chunks.failure(failure)])
        finally:
            # Cancelled (the caller left, or the gateway stops) or closed early.
            record.outcome = record.outcome or "disconnected"
            record.log()

    async def _unknown_route(self, request: Request, error: HTTPException) -> Response:
        record = RequestRecord(route=None)  # the path is the caller's text: not logged
        failure = ApiError(
            error.status_code,
            f"Invalid URL ({request.method} {request.url.path})",
            "invalid_request_error",
            retry=False,
        )
        return self._failure(record, failure)
