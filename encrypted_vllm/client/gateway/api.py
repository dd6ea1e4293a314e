"""What every API the gateway serves provides, and the errors they share.

Each API (OpenAI's chat and completions, OpenAI's Responses, Anthropic's
Messages, OpenAI's embeddings) is one module with one pydantic request model
per route that keeps the `RouteRequest` contract below; `app` routes, calls
the endpoint and writes whatever the module made.

Rules:
- A request is refused before anything is sent with `InvalidRequest` (a 400
  that names the caller's field); every later failure is an `ApiError`, which
  each API writes in its own error shape (`RouteRequest.error_body`).
- A stream's events are data (`str`) or named events (`ServerSentEvent`), as
  the API has them; its module makes every event, its end and its failure
  included.
- Nothing here logs or keeps request content.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Protocol, TypeVar

from pydantic import BaseModel, ValidationError
from sse_starlette import ServerSentEvent

from encrypted_vllm.client.library import Completion
from encrypted_vllm.wire import protocol
from encrypted_vllm.wire.protocol import StreamItem

Event = str | ServerSentEvent  # a data-only event, or a named one


class ApiError(Exception):
    """A request answered with an error object and an HTTP status. `kind`
    and `code` are OpenAI's type and code; other APIs map them onto their
    own. `retry`: the `x-should-retry` header, which OpenAI's and
    Anthropic's SDKs obey (None: let the SDK decide by the status)."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str,
        code: str | None = None,
        param: str | None = None,
        *,
        retry: bool | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind
        self.code, self.param, self.retry = code, param, retry

    @property
    def headers(self) -> dict[str, str]:
        return {} if self.retry is None else {"x-should-retry": str(self.retry).lower()}


class InvalidRequest(Exception):
    """A request refused before anything is sent: a 400."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code

    def as_api_error(self) -> ApiError:
        return ApiError(
            400, self.message, "invalid_request_error", self.code, self.param, retry=False
        )


def openai_error_body(error: ApiError) -> dict[str, Any]:
    """OpenAI's error object."""
    return {
        "error": {
            "message": error.message,
            "type": error.kind,
            "param": error.param,
            "code": error.code,
        }
    }


class Events(Protocol):
    """The events of one streamed answer."""

    def opening(self) -> list[Event]:
        """What the stream opens with, once its job's first items are in."""

    def of(self, items: list[StreamItem]) -> list[Event]:
        """The events of items that arrived together; after the final item,
        every event that ends the stream too."""

    def failure(self, error: ApiError) -> list[Event]:
        """The events that end a stream whose job failed after it began."""


class RouteRequest(Protocol):
    """A route's request: parsed by `parse_request`, sent as `wire_request()`."""

    id_prefix: ClassVar[str]  # of the answer's id, before the job's id
    model: str
    stream: bool

    def wire_request(self) -> dict[str, Any]:
        """The wire request's fields (`AsyncClient.items(**fields)`), checked
        by the wire protocol's schema; InvalidRequest names the caller's field."""

    def answer(self, completion: Completion, *, response_id: str, created: int, model: str) -> str:
        """The whole answer's JSON body."""

    def chunks(self, *, response_id: str, created: int, model: str) -> Events:
        """The events of the streamed answer."""

    @staticmethod
    def error_body(error: ApiError) -> dict[str, Any]:
        """The API's error object for `error`."""


Parsed = TypeVar("Parsed", bound=BaseModel)


def parse_request(model: type[Parsed], body: bytes) -> Parsed:
    """The request body, validated; InvalidRequest names what is wrong."""
    try:
        return model.model_validate_json(body)
    except ValidationError as error:
        raise invalid_request(error) from None


# Location parts that name a type (a union's member) rather than a field.
_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "none", "list", "dict"})


def param_path(loc: tuple) -> str | None:
    """A field's path as OpenAI's `param` writes it: `messages[1].content`."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not (part in _TYPE_NAMES or part[:1].isupper() or "[" in part or ":" in part):
            path += f".{part}" if path else part
    return path or None


def invalid_request(
    error: ValidationError, locate: Callable[[tuple], tuple] = lambda loc: loc
) -> InvalidRequest:
    """One problem pydantic found, as OpenAI words a 400. `locate` turns a
    location into one in the caller's request."""
    details = error.errors(include_input=False, include_url=False, include_context=False)
    # The wire protocol's own rules first; else the deepest problem: of a
    # union's members (a string, or a list of parts), the one the caller meant.
    reasons = [detail for detail in details if detail["type"] == protocol._REASON]
    detail = reasons[0] if reasons else max(details, key=lambda detail: len(detail["loc"]))
    kind, loc = detail["type"], locate(tuple(detail["loc"]))
    param = param_path(loc)
    if kind == "json_invalid":
        return InvalidRequest("We could not parse the JSON body of your request.")
    if kind == "model_type" and param is None:
        return InvalidRequest("The request body must be a JSON object.")
    if kind == "extra_forbidden":  # the last part is the caller's own key, whatever it is
        parent = param_path(loc[:-1])
        param = f"{parent}.{loc[-1]}" if parent else str(loc[-1])
        return InvalidRequest(
            f"Unrecognized request argument supplied: '{param}'.", param, "unsupported_parameter"
        )
    message = detail["msg"].removeprefix("Value error, ")
    if kind == "missing":
        return InvalidRequest(f"Missing required parameter: '{param}'.", param, "missing_required")
    if param is None:
        return InvalidRequest(f"Invalid request: {message}.", None, "invalid_value")
    return InvalidRequest(f"Invalid value for '{param}': {message}.", param, "invalid_value")


def checked_wire_request(
    fields: dict[str, Any], locate: Callable[[tuple], tuple] = lambda loc: loc
) -> dict[str, Any]:
    """A route's wire request fields, checked by the wire protocol's schema;
    InvalidRequest names the caller's field at fault (`locate` turns a wire
    location into the caller's)."""
    try:
        protocol.validate_request(**fields)
    except ValidationError as error:
        raise invalid_request(error, locate) from None
    return fields


def unsupported(param: str, why: str) -> InvalidRequest:
    """A field this gateway cannot serve, named, with why."""
    return InvalidRequest(
        f"'{param}' is not supported here: {why}.", param, "unsupported_parameter"
    )
