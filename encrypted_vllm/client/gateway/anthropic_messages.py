"""Anthropic's Messages API (`POST /v1/messages`) as the gateway serves it,
in wire protocol terms: the request as one pydantic model (every field, its
default and its check beside it), its translation into a wire request, and
the answer and its named stream events made of the worker's items, in the
`anthropic` package's own types.

Rules:
- A request field maps onto the wire protocol or is refused with a 400 that
  names it. Accepted and not sent on, because they change nothing in the
  answer: `metadata`, `service_tier`, `speed: "standard"`, every
  `cache_control` (the worker's prefix cache is automatic), a tool's
  `eager_input_streaming`, `thinking: {"type": "disabled"}` (whether a
  model thinks is its chat template's: vLLM's `chat_template_kwargs`, such
  as `{"enable_thinking": false}`, switch a thinking model off); and what an
  SDK sends back of an answer it got: `thinking` and `redacted_thinking`
  blocks of assistant turns (the wire protocol has no field for them, and
  models' chat templates drop earlier turns' reasoning), and a text block's
  `citations: null`.
- Names are translated, never meanings: `system` is a first system message;
  a `tool_use` block an assistant's tool call, its `input` the call's JSON
  arguments; a `tool_result` block a tool message, placed (in order) before
  the text of the user turn that holds it; `tools` are functions whose
  `parameters` are the `input_schema` (`description` and `strict` as they
  are); `tool_choice` `any` is `required`, `tool` a named function,
  `disable_parallel_tool_use` is `parallel_tool_calls: false`;
  `temperature`, `top_p` and `top_k` are the wire's; `stop_sequences` its
  `stop`; `output_config.format` its `structured_output`;
  `chat_template_kwargs` is vLLM's extra, as its own Anthropic route takes
  it. Consecutive turns of one role are sent as they are, each rendered by
  the model's template.
- Refused, because the answer would not be what they ask for: a last
  assistant turn (Anthropic's prefill: the worker always starts a new
  turn); `thinking` `enabled` or `adaptive` (the worker has no thinking
  budget); server tools (web search, code execution, bash, the text
  editor...); document blocks, and images in tool results;
  `output_config.effort`, `speed: "fast"`; every field not named here.
- A tool_result's `is_error` has no wire field: the tool message carries its
  content alone (as vLLM's own Anthropic route sends it): say the error in
  the content.
- The wire protocol checks what it defines (limits, tools, tool_choice) and
  its refusals are named by the field the caller sent; the models here
  check what is Anthropic's alone (`temperature` within 0..1,
  `max_tokens` of at least 1).
- Answers and events have Anthropic's shapes: content blocks `thinking`
  (the worker's reasoning; its `signature` is empty: nothing signs it),
  then `text`, then `tool_use`; stop_reason `end_turn`, `max_tokens`,
  `stop_sequence` (with the stop string) or `tool_use`. A stream is
  `message_start` (its usage 0 and 0: the worker counts tokens in its last
  item), then each block's start, deltas and stop, then `message_delta`
  with the stop reason and both token counts (cumulative, as the SDK reads
  them), then `message_stop`; a job that fails mid-stream ends with
  Anthropic's `error` event. Errors are Anthropic's error object, its type
  chosen by the status.
- Nothing here logs or keeps request content.
"""

from __future__ import annotations

import datetime
import json
from typing import Annotated, Any, ClassVar, Literal

import jiter
from anthropic.types import (
    InputJSONDelta,
    Message,
    MessageDeltaUsage,
    ModelInfo,
    RawContentBlockDeltaEvent,
    RawContentBlockStartEvent,
    RawContentBlockStopEvent,
    RawMessageDeltaEvent,
    RawMessageStartEvent,
    RawMessageStopEvent,
    TextBlock,
    TextDelta,
    ThinkingBlock,
    ThinkingDelta,
    ToolUseBlock,
    Usage,
)
from anthropic.types.raw_message_delta_event import Delta
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    model_validator,
)
from sse_starlette import ServerSentEvent

from encrypted_vllm.client.gateway.api import (
    ApiError,
    Event,
    InvalidRequest,
    checked_wire_request,
    param_path,
)
from encrypted_vllm.client.gateway.openai_chat import joined
from encrypted_vllm.client.library import Completion
from encrypted_vllm.wire.protocol import StreamItem, ToolCallResult

_ANTHROPIC = ConfigDict(extra="forbid")  # an unknown field is refused, never dropped


# --- Requests -----------------------------------------------------------------


class CacheControl(BaseModel):
    """Accepted and not sent on: the worker's prefix cache is automatic."""

    model_config = _ANTHROPIC

    type: Literal["ephemeral"]
    ttl: Literal["5m", "1h"] | None = None


def _tag(key: str, tags: dict[str, str]):
    """A union's discriminator: its member's tag by the value's `key` (its
    `type` or `role`); None, for the union's own error, when unknown."""

    def tag(value: Any) -> str | None:
        given = value.get(key) if isinstance(value, dict) else getattr(value, key, None)
        return tags.get(given) if isinstance(given, str) else None

    return tag


class TextIn(BaseModel):
    model_config = _ANTHROPIC

    type: Literal["text"]
    text: str
    cache_control: CacheControl | None = None
    citations: None = None  # sent back with an answer; this gateway never cites

    def to_wire(self) -> dict[str, Any]:
        return {"type": "text", "text": self.text}


class Base64Source(BaseModel):
    model_config = _ANTHROPIC

    type: Literal["base64"]
    media_type: Literal["image/jpeg", "image/png", "image/gif", "image/webp"]
    data: str


class URLSource(BaseModel):
    model_config = _ANTHROPIC

    type: Literal["url"]
    url: str


class ImageIn(BaseModel):
    """An image of a user turn: its bytes in base64, or a URL (which the
    worker fetches only where its ALLOW_IMAGE_URLS allows); both become
    the wire's `image_url` part."""

    model_config = _ANTHROPIC

    type: Literal["image"]
    source: Annotated[
        Annotated[Base64Source, Tag("Base64")] | Annotated[URLSource, Tag("Url")],
        Discriminator(
            _tag("type", {"base64": "Base64", "url": "Url"}),
            custom_error_type="source_type",
            custom_error_message="an image's source is base64 or url (files need Anthropic's "
            "storage)",
        ),
    ]
    cache_control: CacheControl | None = None

    def to_wire(self) -> dict[str, Any]:
        source = self.source
        if isinstance(source, Base64Source):
            url = f"data:{source.media_type};base64,{source.data}"
        else:
            url = source.url
        return {"type": "image_url", "image_url": {"url": url}}


class ToolUseIn(BaseModel):
    """A tool call of an earlier assistant turn."""

    model_config = _ANTHROPIC

    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]
    cache_control: CacheControl | None = None

    def to_wire(self) -> dict[str, Any]:
        arguments = json.dumps(self.input, ensure_ascii=False)
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": arguments},
        }


# Tags are capitalized, so that a field's path leaves them out (api.param_path).
ResultPart = Annotated[
    Annotated[TextIn, Tag("Text")],
    Discriminator(
        _tag("type", {"text": "Text"}),
        custom_error_type="block_type",
        custom_error_message="a tool_result's content is text blocks (images and documents "
        "are not supported yet)",
    ),
]


class ToolResultIn(BaseModel):
    """A tool's result, answering the tool_use `tool_use_id`."""

    model_config = _ANTHROPIC

    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[ResultPart] | None = None
    is_error: bool | None = None  # no wire field: see the module's rules
    cache_control: CacheControl | None = None

    def to_wire(self) -> str | list[dict[str, Any]]:
        if not self.content:
            return ""
        if isinstance(self.content, str):
            return self.content
        return [part.to_wire() for part in self.content]


class ThinkingIn(BaseModel):
    """An earlier answer's thinking, sent back: not sent on."""

    model_config = _ANTHROPIC

    type: Literal["thinking"]
    thinking: str
    signature: str
    cache_control: CacheControl | None = None


class RedactedThinkingIn(BaseModel):
    """Another server's redacted thinking, sent back: not sent on."""

    model_config = _ANTHROPIC

    type: Literal["redacted_thinking"]
    data: str
    cache_control: CacheControl | None = None


UserBlock = Annotated[
    Annotated[TextIn, Tag("Text")]
    | Annotated[ImageIn, Tag("Image")]
    | Annotated[ToolResultIn, Tag("ToolResult")],
    Discriminator(
        _tag("type", {"text": "Text", "image": "Image", "tool_result": "ToolResult"}),
        custom_error_type="block_type",
        custom_error_message="a user turn's blocks are text, image and tool_result (documents "
        "are not supported)",
    ),
]
AssistantBlock = Annotated[
    Annotated[TextIn, Tag("Text")]
    | Annotated[ToolUseIn, Tag("ToolUse")]
    | Annotated[ThinkingIn, Tag("Thinking")]
    | Annotated[RedactedThinkingIn, Tag("RedactedThinking")],
    Discriminator(
        _tag(
            "type",
            {
                "text": "Text",
                "tool_use": "ToolUse",
                "thinking": "Thinking",
                "redacted_thinking": "RedactedThinking",
            },
        ),
        custom_error_type="block_type",
        custom_error_message="an assistant turn's blocks are text, tool_use and thinking "
        "(server tools are not served)",
    ),
]
SystemBlock = Annotated[
    Annotated[TextIn, Tag("Text")],
    Discriminator(
        _tag("type", {"text": "Text"}),
        custom_error_type="block_type",
        custom_error_message="a system prompt's blocks are text",
    ),
]


class UserTurn(BaseModel):
    model_config = _ANTHROPIC

    role: Literal["user"]
    content: str | Annotated[list[UserBlock], Field(min_length=1)]


class AssistantTurn(BaseModel):
    model_config = _ANTHROPIC

    role: Literal["assistant"]
    content: str | Annotated[list[AssistantBlock], Field(min_length=1)]


class SystemTurn(BaseModel):
    """A system message among the turns, as the anthropic SDK's types allow."""

    model_config = _ANTHROPIC

    role: Literal["system"]
    content: str | Annotated[list[SystemBlock], Field(min_length=1)]


Turn = Annotated[
    Annotated[UserTurn, Tag("UserTurn")]
    | Annotated[AssistantTurn, Tag("AssistantTurn")]
    | Annotated[SystemTurn, Tag("SystemTurn")],
    Discriminator(
        _tag("role", {"user": "UserTurn", "assistant": "AssistantTurn", "system": "SystemTurn"}),
        custom_error_type="role",
        custom_error_message="role is user or assistant (or system)",
    ),
]


class ToolIn(BaseModel):
    """A client tool: a function the caller runs."""

    model_config = _ANTHROPIC

    name: str
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None
    strict: bool | None = None  # as the wire's (and OpenAI's) `strict`
    cache_control: CacheControl | None = None
    eager_input_streaming: bool | None = None  # how the input streams, not what it is

    @model_validator(mode="before")
    @classmethod
    def _client_tool(cls, value: Any) -> Any:
        if isinstance(value, dict) and value.get("type") not in (None, "custom"):
            raise ValueError(
                "server tools (web search, web fetch, code execution, bash, the text editor, "
                "computer use...) are not served here: only client tools, a name and an "
                "input_schema"
            )
        return value

    def to_wire(self) -> dict[str, Any]:
        function = {
            "name": self.name,
            "description": self.description,
            "parameters": self.input_schema,
            "strict": self.strict,
        }
        return {
            "type": "function",
            "function": {name: value for name, value in function.items() if value is not None},
        }


class ToolChoice(BaseModel):
    model_config = _ANTHROPIC

    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None  # the tool, exactly when type is "tool"
    disable_parallel_tool_use: bool | None = None  # not with "none"

    @model_validator(mode="after")
    def _consistent(self) -> ToolChoice:
        if (self.type == "tool") != (self.name is not None):
            raise ValueError('name is given exactly when type is "tool"')
        if self.type == "none" and self.disable_parallel_tool_use is not None:
            raise ValueError('disable_parallel_tool_use is not allowed with type "none"')
        return self

    def to_wire(self) -> str | dict[str, Any]:
        if self.type == "tool":
            return {"type": "function", "function": {"name": self.name}}
        return {"auto": "auto", "any": "required", "none": "none"}[self.type]


class JsonFormat(BaseModel):
    model_config = _ANTHROPIC

    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(BaseModel):
    model_config = _ANTHROPIC

    format: JsonFormat | None = None  # the answer's text is JSON matching the schema


class Thinking(BaseModel):
    """`{"type": "disabled"}` alone (module rules): the worker has no
    thinking budget, and a model thinks or not as its chat template does."""

    model_config = _ANTHROPIC

    type: Literal["disabled"]

    @model_validator(mode="before")
    @classmethod
    def _disabled(cls, value: Any) -> Any:
        if isinstance(value, dict) and value.get("type") != "disabled":
            raise ValueError(
                'only {"type": "disabled"} is served: the worker has no thinking budget, and '
                "a model thinks or not as its chat template does"
            )
        return value


class Metadata(BaseModel):
    model_config = _ANTHROPIC

    user_id: str | None = None


class MessagesRequest(BaseModel):
    """`POST /v1/messages`."""

    model_config = _ANTHROPIC

    id_prefix: ClassVar[str] = "msg_"

    model: str
    max_tokens: int = Field(ge=1)
    messages: list[Turn] = Field(min_length=1)
    system: str | Annotated[list[SystemBlock], Field(min_length=1)] | None = None
    stream: bool = False
    temperature: float | None = Field(None, ge=0, le=1)  # Anthropic's range
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    stop_sequences: list[str] | None = None
    tools: list[ToolIn] | None = None
    tool_choice: ToolChoice | None = None
    output_config: OutputConfig | None = None
    thinking: Thinking | None = None  # {"type": "disabled"} only
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's extra
    # Accepted and not sent on.
    metadata: Metadata | None = None
    service_tier: Literal["auto", "standard_only"] | None = None
    speed: Literal["standard"] | None = None  # "fast": no faster mode here
    cache_control: CacheControl | None = None

    # Wire location -> the caller's, by the longest prefix; made by to_wire().
    _origins: dict[tuple, tuple] = PrivateAttr(default_factory=dict)

    @staticmethod
    def error_body(error: ApiError) -> dict[str, Any]:
        return anthropic_error_body(error)

    def wire_request(self) -> dict[str, Any]:
        """The wire request's fields, checked by the wire protocol's schema
        (InvalidRequest names the field of this request at fault)."""
        return checked_wire_request(self.to_wire(), self._caller_loc)

    def to_wire(self) -> dict[str, Any]:
        last = len(self.messages) - 1
        if isinstance(self.messages[last], AssistantTurn):
            raise InvalidRequest(
                f"Invalid value for 'messages[{last}]': a last assistant turn (a prefill) is not "
                "served: the worker always answers in a new assistant turn.",
                f"messages[{last}]",
                "unsupported_parameter",
            )
        origins = self._origins
        origins.clear()
        messages: list[dict[str, Any]] = []
        if self.system is not None:
            messages.append(_system_message(self.system, ("system",), origins, 0))
        for number, turn in enumerate(self.messages):
            messages += _wire_messages(turn, ("messages", number), origins, len(messages))
        sampling = {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "stop": self.stop_sequences,
        }
        origins[("sampling_params",)] = ()
        for name in sampling:
            origins[("sampling_params", name)] = ("stop_sequences" if name == "stop" else name,)
        choice = self.tool_choice
        fields: dict[str, Any] = {
            "messages": messages,
            "sampling_params": {
                name: value for name, value in sampling.items() if value is not None
            },
            "tools": [tool.to_wire() for tool in self.tools] if self.tools else None,
            "tool_choice": choice.to_wire() if choice is not None else None,
            "parallel_tool_calls": False if choice and choice.disable_parallel_tool_use else None,
            "structured_output": self._structured_output(),
            "chat_template_kwargs": self.chat_template_kwargs,
        }
        for number in range(len(self.tools or ())):
            tool = ("tools", number)
            origins[tool] = origins[(*tool, "function")] = tool
            origins[(*tool, "function", "parameters")] = (*tool, "input_schema")
        origins[("tool_choice", "NamedToolChoice", "function")] = ("tool_choice",)
        origins[("parallel_tool_calls",)] = ("tool_choice", "disable_parallel_tool_use")
        origins[("structured_output",)] = ("output_config", "format")
        origins[("structured_output", "json_schema")] = ("output_config", "format", "schema")
        return {name: value for name, value in fields.items() if value is not None}

    def _structured_output(self) -> dict[str, Any] | None:
        if self.output_config is None or self.output_config.format is None:
            return None
        return {"json_schema": self.output_config.format.schema_}

    def _caller_loc(self, loc: tuple) -> tuple:
        """A wire error's location, as a location in this request."""
        if loc[:1] == ("messages",) and len(loc) >= 3:
            loc = (*loc[:2], *loc[3:])  # without the role's union tag
            # and without those of a content part's type (api.param_path's rule)
            loc = tuple(part for part in loc if isinstance(part, int) or param_path((part,)))
        for cut in range(len(loc), 0, -1):
            origin = self._origins.get(loc[:cut])
            if origin is not None:
                return (*origin, *loc[cut:])
        return loc

    def answer(self, completion: Completion, *, response_id: str, created: int, model: str) -> str:
        return message(completion, response_id=response_id, model=model).to_json(indent=None)

    def chunks(self, *, response_id: str, created: int, model: str) -> MessageEvents:
        return MessageEvents(response_id=response_id, model=model)


def _system_message(
    content: str | list[TextIn], where: tuple, origins: dict[tuple, tuple], at: int
) -> dict[str, Any]:
    origins[("messages", at)] = origins[("messages", at, "content")] = where
    if isinstance(content, str):
        return {"role": "system", "content": content}
    for number in range(len(content)):
        origins[("messages", at, "content", number)] = (*where, number)
    return {"role": "system", "content": [block.to_wire() for block in content]}


def _wire_messages(
    turn: UserTurn | AssistantTurn | SystemTurn,
    where: tuple,
    origins: dict[tuple, tuple],
    at: int,
) -> list[dict[str, Any]]:
    """One turn as wire messages, the first of them the wire's message `at`:
    its tool results, then its own message. Each wire location's origin in
    the caller's request goes into `origins`."""
    content = (*where, "content")
    if isinstance(turn, SystemTurn):
        return [_system_message(turn.content, content, origins, at)]
    if isinstance(turn.content, str):
        origins[("messages", at)] = where
        origins[("messages", at, "content")] = content
        return [{"role": turn.role, "content": turn.content}]
    own = at + sum(isinstance(block, ToolResultIn) for block in turn.content)
    results: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    for number, block in enumerate(turn.content):
        block_at = (*content, number)
        if isinstance(block, ToolResultIn):
            wire = ("messages", at + len(results))
            origins[wire] = block_at
            origins[(*wire, "tool_call_id")] = (*block_at, "tool_use_id")
            origins[(*wire, "content")] = (*block_at, "content")
            results.append(
                {"role": "tool", "tool_call_id": block.tool_use_id, "content": block.to_wire()}
            )
        elif isinstance(block, TextIn | ImageIn):
            part = ("messages", own, "content", len(parts))
            origins[part] = block_at
            if isinstance(block, ImageIn):
                source = "data" if isinstance(block.source, Base64Source) else "url"
                origins[(*part, "image_url", "url")] = (*block_at, "source", source)
            parts.append(block.to_wire())
        elif isinstance(block, ToolUseIn):
            call = ("messages", own, "tool_calls", len(calls))
            origins[call] = origins[(*call, "function")] = block_at
            origins[(*call, "function", "arguments")] = (*block_at, "input")
            calls.append(block.to_wire())
        # thinking and redacted_thinking: not sent on (module rules)
    if isinstance(turn, UserTurn) and not parts:
        return results  # tool results alone
    origins[("messages", own)] = where
    origins[("messages", own, "content")] = content
    message: dict[str, Any] = {"role": turn.role}
    if parts or not calls:
        message["content"] = parts or ""  # thinking alone: an empty turn
    if calls:
        message["tool_calls"] = calls
    return [*results, message]


# --- Answers --------------------------------------------------------------------


# Anthropic's error types by HTTP status (its API's errors page); the
# gateway's own 502 (RunPod failed), 503 (the worker failed the job) and
# 504 (a job timed out or expired) take the nearest.
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def anthropic_error_body(error: ApiError) -> dict[str, Any]:
    """Anthropic's error object."""
    kind = _ERROR_TYPES.get(
        error.status, "api_error" if error.status >= 500 else "invalid_request_error"
    )
    return {"type": "error", "error": {"type": kind, "message": error.message}}


def stop_reason(
    finish_reason: str | None, stop_sequence: str | None, tool_calls: bool
) -> tuple[str, str | None]:
    """Anthropic's stop_reason and stop_sequence for the worker's end."""
    if finish_reason == "length":
        return "max_tokens", None
    if finish_reason == "tool_calls":
        return "tool_use", None
    if stop_sequence is not None:
        return "stop_sequence", stop_sequence
    return ("tool_use" if tool_calls else "end_turn"), None


def tool_input(arguments: str) -> dict[str, Any]:
    """A call's JSON arguments as `input`, read as the anthropic SDK reads a
    streamed one (partially, for a call cut short by max_tokens)."""
    try:
        value = jiter.from_json(arguments.encode(), partial_mode=True) if arguments else {}
    except ValueError:
        value = {}
    return value if isinstance(value, dict) else {}


def _tool_use(call: ToolCallResult) -> ToolUseBlock:
    return ToolUseBlock(
        type="tool_use", id=call.id, name=call.name, input=tool_input(call.arguments)
    )


def message(answer: Completion, *, response_id: str, model: str) -> Message:
    """A whole answer, as `/v1/messages` answers."""
    content: list[Any] = []
    if answer.reasoning:
        content.append(ThinkingBlock(type="thinking", thinking=answer.reasoning, signature=""))
    if answer.text:
        content.append(TextBlock(type="text", text=answer.text))
    content += [_tool_use(call) for call in answer.tool_calls]
    if not content:  # Anthropic's empty answer: one empty text block
        content.append(TextBlock(type="text", text=""))
    reason, sequence = stop_reason(
        answer.finish_reason, answer.stop_sequence, bool(answer.tool_calls)
    )
    return Message(
        id=response_id,
        type="message",
        role="assistant",
        model=model,
        content=content,
        stop_reason=reason,
        stop_sequence=sequence,
        usage=Usage(
            input_tokens=answer.usage.prompt_tokens, output_tokens=answer.usage.completion_tokens
        ),
    )


def _event(event: BaseModel) -> ServerSentEvent:
    """One of Anthropic's named events: `event: <type>` and its JSON."""
    return ServerSentEvent(event.to_json(indent=None), event=event.type, sep="\n")


class MessageEvents:
    """The events of one streamed answer. Each kind of output (reasoning,
    text, a tool call) opens a block when another kind was open, so the
    blocks follow the answer as it streams: thinking, text, tool_use."""

    def __init__(self, *, response_id: str, model: str):
        self.response_id, self.model = response_id, model
        self._open: str | None = None  # the kind of the open block
        self._blocks = 0  # blocks started; the open one is the last
        self._calls: dict[int, int] = {}  # a tool call's index -> its block's

    def opening(self) -> list[Event]:
        start = Message(
            id=self.response_id,
            type="message",
            role="assistant",
            model=self.model,
            content=[],
            stop_reason=None,
            stop_sequence=None,
            usage=Usage(input_tokens=0, output_tokens=0),
        )
        return [_event(RawMessageStartEvent(type="message_start", message=start))]

    def of(self, items: list[StreamItem]) -> list[Event]:
        """The events of items that arrived together; after the last item,
        the last block's stop, the stop reason and usage, and the end."""
        item, events = joined(items), []
        if item.reasoning:
            events += self._block(
                "thinking", ThinkingBlock(type="thinking", thinking="", signature="")
            )
            events.append(
                self._delta(ThinkingDelta(type="thinking_delta", thinking=item.reasoning))
            )
        if item.text:
            events += self._block("text", TextBlock(type="text", text=""))
            events.append(self._delta(TextDelta(type="text_delta", text=item.text)))
        for call in item.tool_calls:
            if call.id is not None:  # a call's first piece names it
                tool = ToolUseBlock(type="tool_use", id=call.id, name=call.name or "", input={})
                events += self._block(f"tool_use {call.index}", tool)
                self._calls[call.index] = self._blocks - 1
            if call.arguments:
                delta = InputJSONDelta(type="input_json_delta", partial_json=call.arguments)
                events.append(self._delta(delta, self._calls[call.index]))
        if not item.final:
            return events
        if not self._blocks:  # Anthropic's empty answer: one empty text block
            events += self._block("text", TextBlock(type="text", text=""))
        events += self._close()
        reason, sequence = stop_reason(item.finish_reason, item.stop_sequence, bool(self._calls))
        usage = MessageDeltaUsage(
            input_tokens=item.usage.prompt_tokens, output_tokens=item.usage.completion_tokens
        )
        delta = Delta(stop_reason=reason, stop_sequence=sequence)
        events.append(_event(RawMessageDeltaEvent(type="message_delta", delta=delta, usage=usage)))
        events.append(_event(RawMessageStopEvent(type="message_stop")))
        return events

    def failure(self, error: ApiError) -> list[Event]:
        """Anthropic's `error` event, which its SDK raises as an APIStatusError."""
        return [ServerSentEvent(json.dumps(anthropic_error_body(error)), event="error", sep="\n")]

    def _block(self, kind: str, block: BaseModel) -> list[Event]:
        """The events that make `kind` the open block: none if it is."""
        if self._open == kind:
            return []
        events = self._close()
        start = RawContentBlockStartEvent(
            type="content_block_start", index=self._blocks, content_block=block
        )
        self._open, self._blocks = kind, self._blocks + 1
        return [*events, _event(start)]

    def _close(self) -> list[Event]:
        if self._open is None:
            return []
        self._open = None
        return [_event(RawContentBlockStopEvent(type="content_block_stop", index=self._blocks - 1))]

    def _delta(self, delta: BaseModel, index: int | None = None) -> Event:
        index = self._blocks - 1 if index is None else index
        return _event(
            RawContentBlockDeltaEvent(type="content_block_delta", index=index, delta=delta)
        )


def model_list(names: list[str], created: int) -> dict[str, Any]:
    """`GET /v1/models` as Anthropic's API answers it (asked with an
    `anthropic-version` header, as the anthropic SDK sends)."""
    created_at = datetime.datetime.fromtimestamp(created, datetime.timezone.utc)
    models = [
        ModelInfo.model_construct(
            type="model", id=name, display_name=name, created_at=created_at, lifecycle="active"
        ).model_dump(mode="json", exclude_unset=True)
        for name in names
    ]
    return {
        "data": models,
        "has_more": False,
        "first_id": names[0] if names else None,
        "last_id": names[-1] if names else None,
    }
