"""Wire protocol v1.4: what a job's plaintext request and each streamed
item's plaintext say. The worker and the client both import it; `channel`
encrypts them. docs/protocol.md specifies the same in prose, for clients in
other languages.

Rules:
- The fields map one-to-one onto OpenAI's chat API (messages, tools,
  tool_choice, response formats, logprobs), so that a gateway translates
  names, never meanings.
- One schema validates requests on both sides: the client, to give a detailed
  message before anything is sent; the worker, to refuse what a client should
  not have sent. Unknown fields and wrong types are errors at every level;
  nothing is silently dropped.
- Every field that can grow has a limit, named in its refusal.
- A refused job is a `ProtocolError`: a stable `ErrorCode` and a reason taken
  from a fixed set of sentences. Reasons may name a limit or a rule, never
  request content, not even a field name the request used.
- v1 requests are valid v1.4 requests, and v1 to v1.3 clients can read
  v1.4 items: `text` is always there, every new key is optional to read.
  A v1.2 or later client insists on the keys that bind an item to its
  request and place (`request`, `seq`): it cannot trust an older worker's
  answers.
- A request asks for one thing: a completion (`prompt` or `messages`),
  embeddings (`embed`, v1.3) or the worker's card (`describe`). A worker
  serves completions or embeddings, as its model's task is (the card's
  `task`), and refuses the other with a fixed reason.
- Since v1.4 a user message may hold images (`image_url` parts, as OpenAI's
  chat API has them) and a completion may name a LoRA adapter (`adapter`);
  the card says how many images a prompt may hold and which adapters the
  asking key may name.
"""

from __future__ import annotations

import array
import binascii
import dataclasses
import enum
import json
import secrets
import sys
from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

VERSION = "1.4"

# Limits of the request schema, checked by the client and again by the worker.
MAX_MESSAGES = 1024
MAX_CONTENT_PARTS = 256  # text and image parts of one message
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
MAX_TOOLS = 128  # OpenAI's own limit
MAX_TOOL_CALLS = 128  # of one assistant message
MAX_ID_CHARS = 256  # a tool call's id
MAX_DESCRIPTION_CHARS = 16384  # a tool's description
# A JSON document inside a request (a schema, a tool's parameters, a tool
# call's arguments), as compact JSON, and how deeply it may nest: grammar
# compilers recurse over schemas.
MAX_JSON_BYTES = 65536
MAX_JSON_DEPTH = 32
MAX_REGEX_CHARS = 4096
MAX_GRAMMAR_CHARS = 65536
MAX_CHOICES = 256
MAX_CHOICE_CHARS = 256
MAX_TEMPLATE_KWARGS = 32
MAX_TEMPLATE_KWARG_CHARS = 1024  # a key or a string value
MAX_LOGPROBS = 20  # top alternatives per token, as OpenAI's top_logprobs
MAX_N = 1  # completions per request: one stream, one answer
MAX_EMBED_INPUTS = 2048  # inputs of one embeddings request, as OpenAI's limit
MAX_EMBED_INPUT_TOKENS = 65536  # of one token-array input; the model's context is checked too
# Images (v1.4). The worker's LIMIT_MM_PER_PROMPT may allow fewer a prompt;
# whole requests are capped by the worker's MAX_REQUEST_BYTES (4 MiB by
# default) and by RunPod's bodies (/run 10 MB, /runsync 20 MB).
MAX_IMAGES = 64  # of one request
MAX_IMAGE_BYTES = 16 * 1024 * 1024  # one image, decoded
MAX_IMAGE_PIXELS = 7680 * 4320  # one image (8K UHD); checked by the worker as it decodes
MAX_IMAGE_URL_CHARS = 8192  # an http(s) URL; data: URLs are bounded by MAX_IMAGE_BYTES

# OpenAI's rule for function names.
TOOL_NAME = r"^[A-Za-z0-9_-]{1,64}$"
# A LoRA adapter's name, as a model name in an OpenAI request can be.
ADAPTER_NAME = r"^[A-Za-z0-9][A-Za-z0-9._:@+/-]{0,127}$"
# Keys the worker sets itself when it renders a chat.
RESERVED_TEMPLATE_KWARGS = frozenset(
    {"messages", "tools", "add_generation_prompt", "continue_final_message", "chat_template"}
)


class ErrorCode(str, enum.Enum):
    """The first word of every failed job's error string."""

    # What enum.StrEnum (Python 3.11+) does, for clients on 3.10: the code
    # itself, wherever it is printed or formatted.
    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__

    DECRYPTION_FAILED = "DECRYPTION_FAILED"
    TOKEN_EXPIRED = "TOKEN_EXPIRED"
    REPLAYED = "REPLAYED"
    INVALID_INPUT = "INVALID_INPUT"
    ENGINE_ERROR = "ENGINE_ERROR"
    WORKER_STOPPED = "WORKER_STOPPED"


class ProtocolError(Exception):
    """A job refused or failed: `"<CODE>: <reason>"` is its error string."""

    def __init__(self, code: ErrorCode, reason: str):
        super().__init__(f"{code.value}: {reason}")
        self.code = code
        self.reason = reason

    @classmethod
    def parse(cls, error: str) -> ProtocolError | None:
        """The error a worker reported, or None if `error` is not one of ours."""
        code, sep, reason = str(error).partition(": ")
        if sep and code in ErrorCode.__members__:
            return cls(ErrorCode(code), reason)
        return None


# --- Requests ------------------------------------------------------------

_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)
_INT64 = 2**63 - 1
_INT32 = 2**31 - 1
TokenId = Annotated[int, Field(ge=0, le=_INT32)]

# The pydantic error type whose message is a reason the worker may return
# as it is: a fixed sentence that names a limit or a rule, nothing else.
_REASON = "protocol_reason"


def _refuse(reason: str) -> PydanticCustomError:
    return PydanticCustomError(_REASON, reason)


def _limit(name: str, value: int, limit: int) -> None:
    if value > limit:
        raise _refuse(f"request exceeds {name}={limit}")


def _check_json_document(value: Any) -> Any:
    """A JSON document inside the request stays within MAX_JSON_BYTES and
    MAX_JSON_DEPTH (measured before serializing, so no deep recursion), and
    its integers within 64 bits: vLLM's engine process receives a schema
    as msgpack, which cannot carry a larger one."""
    pending = [(value, 1)]
    while pending:
        node, depth = pending.pop()
        if isinstance(node, dict | list):
            _limit("MAX_JSON_DEPTH", depth, MAX_JSON_DEPTH)
            children = node.values() if isinstance(node, dict) else node
            pending += [(child, depth + 1) for child in children]
        elif isinstance(node, int) and not -_INT64 - 1 <= node <= _INT64:
            raise _refuse("a JSON document in the request has an integer beyond 64 bits")
    _limit("MAX_JSON_BYTES", len(json.dumps(value, separators=(",", ":"))), MAX_JSON_BYTES)
    return value


class SamplingParams(BaseModel):
    """The vLLM `SamplingParams` fields a request may set; omitted ones take
    the model's defaults (its generation_config.json), then vLLM's.

    `max_tokens` omitted means: until the model stops or its context is full.
    `logprobs`: the sampled token's log-probability and this many top
    alternatives per token (OpenAI's `top_logprobs`); omitted: none.
    """

    model_config = _STRICT

    max_tokens: int | None = Field(None, ge=1, le=_INT64)
    min_tokens: int | None = Field(None, ge=0, le=_INT64)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, le=_INT32)
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=0, le=_INT64)
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    include_stop_str_in_output: bool | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=100)
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    logprobs: int | None = Field(None, ge=0)
    n: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _within_limits(self) -> SamplingParams:
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        _limit("MAX_STOP_STRINGS", len(stops), MAX_STOP_STRINGS)
        _limit("MAX_STOP_CHARS", max(map(len, stops), default=0), MAX_STOP_CHARS)
        _limit("MAX_STOP_TOKEN_IDS", len(self.stop_token_ids or ()), MAX_STOP_TOKEN_IDS)
        _limit("MAX_LOGPROBS", self.logprobs or 0, MAX_LOGPROBS)
        _limit("MAX_N", self.n or 1, MAX_N)
        return self

    def to_engine_kwargs(self) -> dict[str, Any]:
        """The fields the request set, as `vllm.SamplingParams` keywords."""
        return self.model_dump(exclude_none=True, exclude={"n"})


# Messages, as OpenAI's chat API has them.


class TextPart(BaseModel):
    model_config = _STRICT

    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    """An image: `data:image/<type>;base64,<bytes>`, or an http(s) URL that
    the worker fetches only where its ALLOW_IMAGE_URLS allows. `detail` is
    OpenAI's; vLLM's processors size images by the model, so it changes
    nothing."""

    model_config = _STRICT

    url: str
    detail: Literal["auto", "low", "high"] | None = None

    @field_validator("url")
    @classmethod
    def _data_or_web(cls, url: str) -> str:
        if url.startswith("data:"):
            header, comma, data = url.partition(",")
            if not (comma and header.startswith("data:image/") and header.endswith(";base64")):
                raise _refuse("an image's data URL is not data:image/<type>;base64,<data>")
            _limit("MAX_IMAGE_BYTES", len(data) // 4 * 3, MAX_IMAGE_BYTES)
        elif url.startswith(("https://", "http://")):
            _limit("MAX_IMAGE_URL_CHARS", len(url), MAX_IMAGE_URL_CHARS)
        else:
            raise _refuse("an image's URL is a data: URL or an http(s) URL")
        return url

    @property
    def is_data(self) -> bool:
        return self.url.startswith("data:")


class ImagePart(BaseModel):
    """An image in a user message (v1.4)."""

    model_config = _STRICT

    type: Literal["image_url"]
    image_url: ImageURL


# Other kinds of content part (audio, files, other APIs' images): refused saying what is allowed.
_MEDIA_PARTS = {"input_audio", "file", "image", "audio", "video_url", "input_image"}


def _known_parts(value: Any, images: bool) -> Any:
    if isinstance(value, list):
        _limit("MAX_CONTENT_PARTS", len(value), MAX_CONTENT_PARTS)
        for part in value:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in _MEDIA_PARTS:
                raise _refuse("content parts are text, and image_url in user messages")
            if kind == "image_url" and not images:
                raise _refuse("only user messages hold images")
    return value


Content = Annotated[str | list[TextPart], Field(union_mode="left_to_right")]


def _part_kind(value: Any) -> str | None:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return {"text": "Text", "image_url": "Image"}.get(kind)


# Tagged by capitalized names, which a field's path leaves out (the gateway's
# `param`s), unlike a `type`'s own values.
UserPart = Annotated[
    Annotated[TextPart, Tag("Text")] | Annotated[ImagePart, Tag("Image")],
    Discriminator(
        _part_kind,
        custom_error_type=_REASON,
        custom_error_message="a user message's content parts are text and image_url",
    ),
]
UserContent = Annotated[str | list[UserPart], Field(union_mode="left_to_right")]


class _Message(BaseModel):
    model_config = _STRICT

    @field_validator("content", mode="before", check_fields=False)
    @classmethod
    def _content_parts(cls, value: Any) -> Any:
        return _known_parts(value, images=False)

    def to_template(self) -> dict[str, Any]:
        """The message as chat templates (through vLLM's renderer) read it."""
        return self.model_dump(exclude_none=True)


class SystemMessage(_Message):
    role: Literal["system"]
    content: Content
    name: str | None = None


class UserMessage(_Message):
    role: Literal["user"]
    content: UserContent
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _content_parts(cls, value: Any) -> Any:
        return _known_parts(value, images=True)

    @property
    def images(self) -> list[ImageURL]:
        if isinstance(self.content, str):
            return []
        return [part.image_url for part in self.content if isinstance(part, ImagePart)]


class FunctionCall(BaseModel):
    model_config = _STRICT

    name: str = Field(pattern=TOOL_NAME)
    arguments: str  # JSON text, as the model wrote it

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, value: str) -> str:
        _limit("MAX_JSON_BYTES", len(value.encode()), MAX_JSON_BYTES)
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise _refuse("a tool call's arguments are not a JSON object")
        _check_json_document(parsed)
        return value


class ToolCall(BaseModel):
    model_config = _STRICT

    id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    type: Literal["function"]
    function: FunctionCall


class AssistantMessage(_Message):
    """A previous answer: text, tool calls, or both (content may be null)."""

    role: Literal["assistant"]
    content: Content | None = None
    tool_calls: list[ToolCall] | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _says_something(self) -> AssistantMessage:
        _limit("MAX_TOOL_CALLS", len(self.tool_calls or ()), MAX_TOOL_CALLS)
        if self.content is None and not self.tool_calls:
            raise _refuse("an assistant message needs content or tool_calls")
        return self

    def to_template(self) -> dict[str, Any]:
        message = super().to_template()
        # Chat templates index tool calls' arguments as objects (hermes,
        # llama, qwen...), as vLLM's own server passes them.
        for call in message.get("tool_calls", ()):
            call["function"]["arguments"] = json.loads(call["function"]["arguments"])
        return message


class ToolMessage(_Message):
    """A tool's result, answering the assistant's call `tool_call_id`."""

    role: Literal["tool"]
    content: Content
    tool_call_id: str = Field(min_length=1, max_length=MAX_ID_CHARS)


Message = Annotated[
    SystemMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")
]


# Tools and the constraints on what the model writes.


class FunctionDefinition(BaseModel):
    model_config = _STRICT

    name: str = Field(pattern=TOOL_NAME)
    description: str | None = Field(None, max_length=MAX_DESCRIPTION_CHARS)
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _bounded(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if value is None else _check_json_document(value)

    def arguments_schema(self) -> dict[str, Any]:
        """What the arguments must match: the parameters, or any object."""
        return self.parameters if self.parameters is not None else {"type": "object"}


class Tool(BaseModel):
    model_config = _STRICT

    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    model_config = _STRICT

    name: str = Field(pattern=TOOL_NAME)


class NamedToolChoice(BaseModel):
    """Forces a call of this one function."""

    model_config = _STRICT

    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class StructuredOutput(BaseModel):
    """Exactly one constraint on the completion's text, enforced by the
    engine's structured-output backend while it samples."""

    model_config = _STRICT

    json_schema: dict[str, Any] | None = None
    json_object: Literal[True] | None = None  # any JSON object
    regex: str | None = Field(None, max_length=MAX_REGEX_CHARS)
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = Field(None, max_length=MAX_GRAMMAR_CHARS)  # EBNF (GBNF) or Lark

    @field_validator("json_schema")
    @classmethod
    def _bounded(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if value is None else _check_json_document(value)

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutput:
        given = [name for name, value in self if value is not None]
        if len(given) != 1:
            raise _refuse("structured_output needs exactly one constraint")
        _limit("MAX_CHOICES", len(self.choice or ()), MAX_CHOICES)
        _limit("MAX_CHOICE_CHARS", max(map(len, self.choice or ()), default=0), MAX_CHOICE_CHARS)
        return self


TemplateValue = str | bool | int | float | None


class Embed(BaseModel):
    """An embeddings request: one vector per input, in order. An input is a
    string or token ids. One longer than the model's context is refused,
    unless `truncate_prompt_tokens` keeps only its first tokens: that many,
    or -1 for as many as the context holds (vLLM's rule and name).
    `dimensions` shortens the vectors of a Matryoshka model; any other model
    refuses it unless it is the vectors' own size."""

    model_config = _STRICT

    input: list[str | list[TokenId]] = Field(min_length=1)
    truncate_prompt_tokens: int | None = Field(None, ge=-1, le=_INT32)
    dimensions: int | None = Field(None, ge=1, le=_INT32)

    @field_validator("input")
    @classmethod
    def _inputs(cls, inputs: list[str | list[int]]) -> list[str | list[int]]:
        _limit("MAX_EMBED_INPUTS", len(inputs), MAX_EMBED_INPUTS)
        if not all(inputs):
            raise _refuse("an embeddings input is empty")
        longest = max((len(each) for each in inputs if isinstance(each, list)), default=0)
        _limit("MAX_EMBED_INPUT_TOKENS", longest, MAX_EMBED_INPUT_TOKENS)
        return inputs

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _keeps_some(cls, value: int | None) -> int | None:
        if value == 0:
            raise _refuse("truncate_prompt_tokens is -1 or a count of tokens to keep")
        return value


class Request(BaseModel):
    """A job's plaintext: a `prompt`, or chat `messages` that the worker
    renders with the model's chat template (with the generation prompt);
    or `embed` alone, answered with vectors; or `{"describe": true}` alone,
    answered with the worker's card."""

    model_config = _STRICT

    prompt: str | None = None
    messages: list[Message] | None = Field(None, min_length=1)
    sampling_params: SamplingParams = SamplingParams()
    structured_output: StructuredOutput | None = None
    tools: list[Tool] | None = Field(None, min_length=1)
    # Omitted: "auto" when there are tools, as in OpenAI's API.
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None  # omitted: true
    chat_template_kwargs: dict[str, TemplateValue] | None = None
    # A LoRA adapter of the worker's LORA_MODULES (v1.4); omitted: the base model.
    adapter: str | None = Field(None, pattern=ADAPTER_NAME)
    embed: Embed | None = None
    describe: Literal[True] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Request:
        if self.describe:
            if self.model_fields_set - {"describe"}:
                raise _refuse("describe takes no other field")
            return self
        if self.embed is not None:
            if self.model_fields_set - {"embed"}:
                raise _refuse("embed takes no other field")
            return self
        if (self.prompt is None) == (self.messages is None):
            raise _refuse("request needs exactly one of prompt or messages")
        if self.prompt is not None and not self.prompt:
            raise _refuse("the prompt is empty")
        _limit("MAX_MESSAGES", len(self.messages or ()), MAX_MESSAGES)
        _limit("MAX_IMAGES", len(self.images), MAX_IMAGES)
        self._check_tools()
        self._check_template_kwargs()
        return self

    def _check_tools(self) -> None:
        if self.messages is None and (self.tools or self.chat_template_kwargs is not None):
            raise _refuse("tools and chat_template_kwargs need messages, not a prompt")
        names = [tool.function.name for tool in self.tools or ()]
        _limit("MAX_TOOLS", len(names), MAX_TOOLS)
        if len(set(names)) != len(names):
            raise _refuse("two tools have the same name")
        if self.tool_choice is not None and not self.tools:
            raise _refuse("tool_choice needs tools")
        if isinstance(self.tool_choice, NamedToolChoice):
            if self.tool_choice.function.name not in names:
                raise _refuse("tool_choice names a function that tools does not define")
        if self.forced_tool_calls and self.structured_output is not None:
            raise _refuse("structured_output cannot be combined with a forced tool_choice")

    def _check_template_kwargs(self) -> None:
        kwargs = self.chat_template_kwargs or {}
        _limit("MAX_TEMPLATE_KWARGS", len(kwargs), MAX_TEMPLATE_KWARGS)
        longest = max(
            (len(text) for item in kwargs.items() for text in item if isinstance(text, str)),
            default=0,
        )
        _limit("MAX_TEMPLATE_KWARG_CHARS", longest, MAX_TEMPLATE_KWARG_CHARS)
        if kwargs.keys() & RESERVED_TEMPLATE_KWARGS:
            raise _refuse("chat_template_kwargs sets a key the worker sets itself")

    @property
    def images(self) -> list[ImageURL]:
        """The images of the request's user messages, in order."""
        return [
            image
            for message in self.messages or ()
            if isinstance(message, UserMessage)
            for image in message.images
        ]

    @property
    def effective_tool_choice(self) -> ToolChoice:
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"

    @property
    def forced_tool_calls(self) -> bool:
        """tool_choice "required" or a named function: the calls are forced."""
        return self.tools is not None and self.effective_tool_choice not in ("none", "auto")

    @property
    def allows_parallel_tool_calls(self) -> bool:
        return self.parallel_tool_calls is not False


def validate_request(
    prompt: str | None = None,
    messages: Sequence[dict[str, Any]] | None = None,
    sampling_params: dict[str, Any] | None = None,
    **fields: Any,
) -> Request:
    """Build a Request, raising pydantic's detailed ValidationError locally.
    `fields`: the other request fields (tools, structured_output, ...)."""
    given = {"prompt": prompt, "sampling_params": sampling_params, **fields}
    if messages is not None:
        given["messages"] = list(messages)
    return Request.model_validate(
        {name: value for name, value in given.items() if value is not None}
    )


# The other pydantic error types, mapped to reasons that name nothing.
_VALIDATION_REASONS = {
    "json_invalid": "plaintext is not UTF-8 JSON",
    "model_type": "plaintext is not a JSON object",
    "extra_forbidden": "request has an unknown field",
    "missing": "request lacks a required field",
    "union_tag_not_found": "request lacks a required field",
}


def refusal(error: ValidationError) -> ProtocolError:
    """The worker's terse refusal of a request that failed validation."""
    details = error.errors(include_input=False, include_url=False, include_context=False)
    for detail in details:
        if detail["type"] == _REASON:
            return ProtocolError(ErrorCode.INVALID_INPUT, detail["msg"])
    kinds = [detail["type"] for detail in details]
    for kind, reason in _VALIDATION_REASONS.items():
        if kind in kinds:
            return ProtocolError(ErrorCode.INVALID_INPUT, reason)
    if any(kind.endswith("_type") for kind in kinds):
        return ProtocolError(ErrorCode.INVALID_INPUT, "a request field has the wrong type")
    return ProtocolError(ErrorCode.INVALID_INPUT, "a request field has a value it does not allow")


def parse_request(plaintext: bytes) -> Request:
    """A request's plaintext, validated; ProtocolError with a fixed reason."""
    try:
        return Request.model_validate_json(plaintext)
    except ValidationError as error:
        raise refusal(error) from None
    except RecursionError:  # JSON nested past the parser's own limit
        raise ProtocolError(
            ErrorCode.INVALID_INPUT, f"request exceeds MAX_JSON_DEPTH={MAX_JSON_DEPTH}"
        ) from None


# --- Stream items --------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of one tool call, as OpenAI streams them: the first piece of
    call `index` carries its `id` and `name`; later ones add `arguments`
    text, which joins into the call's JSON arguments."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"index": self.index}
        if self.id is not None:
            body["id"] = self.id
            body["type"] = "function"
        function = {}
        if self.name is not None:
            function["name"] = self.name
        if self.arguments:
            function["arguments"] = self.arguments
        if function:
            body["function"] = function
        return body

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> ToolCallDelta:
        function = body.get("function") or {}
        return cls(
            body["index"], body.get("id"), function.get("name"), function.get("arguments", "")
        )


@dataclass(frozen=True)
class ToolCallResult:
    """A whole tool call, its deltas joined."""

    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def join_tool_calls(deltas: Sequence[ToolCallDelta]) -> list[ToolCallResult]:
    """Joins tool-call deltas, by index, into whole calls."""
    calls: dict[int, list[str]] = {}
    for delta in deltas:
        call = calls.setdefault(delta.index, ["", "", ""])
        call[0] = delta.id or call[0]
        call[1] = delta.name or call[1]
        call[2] += delta.arguments
    return [ToolCallResult(*calls[index]) for index in sorted(calls)]


@dataclass(frozen=True)
class Embedding:
    """The vector of input `index` of an embeddings request: float32,
    little-endian, in base64 (as OpenAI's `encoding_format: "base64"`)."""

    index: int
    base64: str

    @classmethod
    def of(cls, index: int, vector: Sequence[float]) -> Embedding:
        values = array.array("f", vector)
        if sys.byteorder == "big":
            values.byteswap()
        return cls(index, binascii.b2a_base64(values.tobytes(), newline=False).decode())

    @property
    def vector(self) -> list[float]:
        values = array.array("f")
        values.frombytes(binascii.a2b_base64(self.base64))
        if sys.byteorder == "big":
            values.byteswap()
        return values.tolist()

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "embedding": self.base64}

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> Embedding:
        index, data = body["index"], body["embedding"]
        if not (type(index) is int and index >= 0 and isinstance(data, str)):
            raise TypeError("an embedding is not an index and a base64 string")
        return cls(index, data)


# A token's log-probability as OpenAI's `logprobs.content` entries have it:
# {"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}.
TokenLogprob = dict[str, Any]


@dataclass(frozen=True)
class WorkerCard:
    """What a worker can do, answered to `{"describe": true}`."""

    model: str
    max_model_len: int
    chat_template: bool  # whether `messages` (and tools) can be rendered
    tool_call_parser: str | None  # needed for tool_choice "auto"
    reasoning_parser: str | None
    structured_output_backend: str
    max_logprobs: int
    protocol: str = VERSION
    task: Literal["generate", "embed"] = "generate"  # what the model serves (v1.3)
    dimensions: int | None = None  # an embedding model's vector size
    matryoshka: bool = False  # whether `embed.dimensions` may shorten its vectors
    images: int = 0  # images a prompt may hold; 0: the model takes none (v1.4)
    adapters: tuple[str, ...] = ()  # the LoRA adapters the asking key may name (v1.4)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> WorkerCard:
        # A later worker's card may say more: what this client knows is read.
        known = {field.name for field in dataclasses.fields(cls)}
        fields = {name: value for name, value in body.items() if name in known}
        if "adapters" in fields:
            fields["adapters"] = tuple(fields["adapters"])
        return cls(**fields)


@dataclass(frozen=True)
class StreamItem:
    """What is new since the previous item of a job; the last one of a job
    (the final item) also has finish_reason and usage. Since v1.2 each item
    names its request (`request`: `channel.request_binding` of the request's
    token) and its place in the job's stream (`seq`, from 0, filler items
    included), so that a client can tell a foreign, missing, repeated or
    reordered item; the worker sets both when it seals the item. Since
    v1.3 an embeddings answer's items carry `embeddings`, and a final item
    whose answer a stop string ended names it (`stop_sequence`)."""

    text: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None
    _: KW_ONLY
    reasoning: str = ""
    tool_calls: tuple[ToolCallDelta, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    card: WorkerCard | None = None
    embeddings: tuple[Embedding, ...] = ()
    stop_sequence: str | None = None
    request: str | None = None
    seq: int | None = None

    @property
    def final(self) -> bool:
        return self.usage is not None

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"text": self.text}
        if self.reasoning:
            body["reasoning"] = self.reasoning
        if self.tool_calls:
            body["tool_calls"] = [delta.to_dict() for delta in self.tool_calls]
        if self.logprobs:
            body["logprobs"] = list(self.logprobs)
        if self.finish_reason is not None:
            body["finish_reason"] = self.finish_reason
        if self.usage is not None:
            body["usage"] = {
                "prompt_tokens": self.usage.prompt_tokens,
                "completion_tokens": self.usage.completion_tokens,
            }
        if self.card is not None:
            body["card"] = self.card.to_dict()
        if self.embeddings:
            body["embeddings"] = [embedding.to_dict() for embedding in self.embeddings]
        if self.stop_sequence is not None:
            body["stop_sequence"] = self.stop_sequence
        if self.request is not None:
            body["request"] = self.request
        if self.seq is not None:
            body["seq"] = self.seq
        return body

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), ensure_ascii=False).encode()

    @classmethod
    def from_json(cls, data: bytes) -> StreamItem:
        body = json.loads(data)
        usage, card = body.get("usage"), body.get("card")
        text, request, seq = body["text"], body.get("request"), body.get("seq")
        if not isinstance(text, str):
            raise TypeError("text is not a string")
        if not (request is None or isinstance(request, str)):
            raise TypeError("request is not a string")
        if not (seq is None or (type(seq) is int and seq >= 0)):
            raise TypeError("seq is not a count")
        stop_sequence = body.get("stop_sequence")
        if not (stop_sequence is None or isinstance(stop_sequence, str)):
            raise TypeError("stop_sequence is not a string")
        return cls(
            text=text,
            reasoning=body.get("reasoning", ""),
            tool_calls=tuple(map(ToolCallDelta.from_dict, body.get("tool_calls", ()))),
            logprobs=tuple(body.get("logprobs", ())),
            finish_reason=body.get("finish_reason"),
            usage=Usage(**usage) if usage is not None else None,
            card=WorkerCard.from_dict(card) if card is not None else None,
            embeddings=tuple(map(Embedding.from_dict, body.get("embeddings", ()))),
            stop_sequence=stop_sequence,
            request=request,
            seq=seq,
        )

    @property
    def empty(self) -> bool:
        """Carries nothing: a constant-rate stream's filler."""
        return not (
            self.text or self.reasoning or self.tool_calls or self.logprobs or self.embeddings
        ) and (self.usage is None and self.card is None)


def new_tool_call_id() -> str:
    """An id for a tool call the worker parsed, in OpenAI's style."""
    return f"call_{secrets.token_hex(12)}"
