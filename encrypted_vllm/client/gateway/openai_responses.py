"""OpenAI's Responses API (`POST /v1/responses`) as the gateway serves it,
in wire protocol terms: the request as one pydantic model (every field, its
default and its check beside it), its translation into a wire chat request,
and the answer and its stream events made of the worker's items, in the
`openai` package's own types.

Rules:
- Stateless: the gateway keeps nothing, so the caller sends the whole
  conversation in `input` every time (as the OpenAI Agents SDK and Agno's
  OpenResponses do by default). Whatever needs stored state is refused with
  a 400 that says so: `previous_response_id`, `conversation`, `store: true`,
  `background: true`, `item_reference` items.
- A request field maps onto the wire protocol or is refused with a 400 that
  names it. Accepted and not sent on, because they change nothing in the
  answer: `metadata`, `user`, `safety_identifier`, `prompt_cache_key`,
  `store: false`, `include: []`, `truncation: "disabled"` (the worker
  refuses an input longer than its context), `stream_options` (deltas carry
  no `obfuscation` padding: the worker pads its own items), a function
  tool's and a JSON schema format's `strict` and labels (the worker
  enforces a schema where it constrains the output, as vLLM's server does),
  `reasoning.summary` (no summary is made: a reasoning item's `content`
  holds the reasoning itself); and what an SDK sends back of an answer it
  got: items' `id`, `status` and `phase`, `output_text` parts' `annotations`
  and `logprobs`, and `reasoning` items, which are dropped as chat templates
  drop earlier turns' reasoning (and as `openai_chat` does).
- Names are translated, never meanings: `instructions` is a system message
  before `input`, a message's `developer` role is `system`, `input_text`
  and `output_text` parts are text parts, `input_image` parts (by
  `image_url`) are `image_url` parts, `function_call` items are an
  assistant message's `tool_calls` (consecutive ones, and the assistant
  message just before them, are one message), `function_call_output` items
  are tool messages, flat function tools are the wire's nested ones,
  `text.format` is `structured_output`, `max_output_tokens` is `max_tokens`.
  vLLM's extras are taken in the body as its own server takes them.
- Answers have OpenAI's shape: a `reasoning` item (with a REASONING_PARSER),
  a `message` item when there is text, one `function_call` item per call;
  `status` is `incomplete` (reason `max_output_tokens`) when the token limit
  cut the answer, and so is the item it cut. A stream is named events, each
  with an increasing `sequence_number`, in OpenAI's order; it ends with
  `response.completed` or `response.incomplete`, without `[DONE]`. A job
  that fails mid-stream ends with `response.failed` and then an `error`
  event whose `error` object makes the `openai` SDKs raise.
- Usage counts tokens as the worker does: no cache (`cached_tokens` 0), and
  reasoning counted in `output_tokens` (`reasoning_tokens` 0: the worker
  does not count it apart).
- Nothing here logs or keeps request content.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Annotated, Any, ClassVar, Literal

from openai.types.responses import (
    FunctionTool,
    Response,
    ResponseCompletedEvent,
    ResponseContentPartAddedEvent,
    ResponseContentPartDoneEvent,
    ResponseCreatedEvent,
    ResponseErrorEvent,
    ResponseFailedEvent,
    ResponseFunctionCallArgumentsDeltaEvent,
    ResponseFunctionCallArgumentsDoneEvent,
    ResponseFunctionToolCall,
    ResponseIncompleteEvent,
    ResponseInProgressEvent,
    ResponseOutputItemAddedEvent,
    ResponseOutputItemDoneEvent,
    ResponseOutputMessage,
    ResponseOutputText,
    ResponseReasoningItem,
    ResponseReasoningTextDeltaEvent,
    ResponseReasoningTextDoneEvent,
    ResponseTextConfig,
    ResponseTextDeltaEvent,
    ResponseTextDoneEvent,
    ResponseUsage,
    ToolChoiceFunction,
)
from openai.types.responses.response import IncompleteDetails
from openai.types.responses.response_error import ResponseError
from openai.types.responses.response_reasoning_item import Content as ReasoningText
from openai.types.shared import Reasoning
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    field_validator,
    model_validator,
)
from sse_starlette import ServerSentEvent

from encrypted_vllm.client.gateway.api import (
    ApiError,
    Event,
    checked_wire_request,
    openai_error_body,
    unsupported,
)
from encrypted_vllm.client.gateway.openai_chat import StructuredOutputs, joined
from encrypted_vllm.client.library import Completion
from encrypted_vllm.wire import protocol
from encrypted_vllm.wire.protocol import StreamItem

_OPENAI = ConfigDict(extra="forbid")  # an unknown field is refused, never dropped
_NO_STATE = "the gateway keeps no state: send the whole conversation in 'input'"
# OpenAI's hosted tools: they run on OpenAI's servers, which a worker is not.
_HOSTED_TOOLS = frozenset(
    {
        "web_search",
        "web_search_preview",
        "web_search_2025_08_26",
        "web_search_preview_2025_03_11",
        "file_search",
        "code_interpreter",
        "computer",
        "computer_use_preview",
        "image_generation",
        "mcp",
        "local_shell",
        "shell",
        "apply_patch",
        "custom",
        "tool_search",
    }
)

# Refusals raised in validators are InvalidRequest, not ValueError: pydantic
# lets them through, so they keep their own param and code.


# --- Requests -----------------------------------------------------------------


class ContentPart(BaseModel):
    """A text part: `input_text`, or `output_text` as an SDK sends back an
    answer it got."""

    model_config = _OPENAI

    type: Literal["input_text", "output_text"]
    text: str
    # Sent back with an answer; not sent on (module rules).
    annotations: list[dict[str, Any]] | None = None
    logprobs: list[dict[str, Any]] | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"type": "text", "text": self.text}


class ImagePart(BaseModel):
    """`input_image`: an image by its `image_url`, a data: URL (or an
    http(s) URL, which the worker fetches only where its ALLOW_IMAGE_URLS
    allows); it becomes the wire's `image_url` part. A `file_id` would need
    OpenAI's file storage."""

    model_config = _OPENAI

    type: Literal["input_image"]
    image_url: str
    detail: Literal["auto", "low", "high", "original"] | None = None

    def to_wire(self) -> dict[str, Any]:
        # "original" is OpenAI's own resizing rule: vLLM sizes images by the model.
        detail = {"detail": self.detail} if self.detail in ("auto", "low", "high") else {}
        return {"type": "image_url", "image_url": {"url": self.image_url, **detail}}


def _part_tag(value: Any) -> str | None:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return {"input_text": "Text", "output_text": "Text", "input_image": "Image"}.get(kind)


MessagePart = Annotated[
    Annotated[ContentPart, Tag("Text")] | Annotated[ImagePart, Tag("Image")],
    Discriminator(
        _part_tag,
        custom_error_type="unsupported_content",
        custom_error_message="a message's content parts are input_text and input_image "
        "(audio and files are not supported)",
    ),
]


def _content(content: str | list[ContentPart | ImagePart]) -> str | list[dict[str, Any]]:
    return content if isinstance(content, str) else [part.to_wire() for part in content]


_ItemStatus = Literal["in_progress", "completed", "incomplete"]


class MessageItem(BaseModel):
    """A message of the conversation, with or without `"type": "message"`."""

    model_config = _OPENAI

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[MessagePart]
    # Sent back with an answer; not sent on (module rules).
    id: str | None = None
    status: _ItemStatus | None = None
    phase: Literal["commentary", "final_answer"] | None = None

    def to_wire(self) -> dict[str, Any]:
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": _content(self.content)}


class FunctionCallItem(BaseModel):
    """A call the model made, as its answer had it."""

    model_config = _OPENAI

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str  # JSON text; the wire protocol checks it is an object
    id: str | None = None
    status: _ItemStatus | None = None

    def to_wire(self) -> dict[str, Any]:
        function = {"name": self.name, "arguments": self.arguments}
        return {"id": self.call_id, "type": "function", "function": function}


class FunctionCallOutputItem(BaseModel):
    """A function's result, answering the call `call_id`."""

    model_config = _OPENAI

    type: Literal["function_call_output"]
    call_id: str
    output: str | list[MessagePart]
    id: str | None = None
    status: _ItemStatus | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"role": "tool", "tool_call_id": self.call_id, "content": _content(self.output)}


class ReasoningItem(BaseModel):
    """An earlier answer's reasoning, sent back: dropped (module rules)."""

    model_config = _OPENAI

    type: Literal["reasoning"]
    id: str | None = None
    summary: list[dict[str, Any]] = []
    content: list[dict[str, Any]] | None = None
    encrypted_content: str | None = None
    status: _ItemStatus | None = None


# Tags that `api.param_path` leaves out of a param, as it does type names.
_ITEM_TAGS = {
    "message": "Message",
    "function_call": "FunctionCall",
    "function_call_output": "FunctionCallOutput",
    "reasoning": "Reasoning",
}


def _item_tag(value: Any) -> str | None:
    kind = value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", None)
    return _ITEM_TAGS.get(kind) if isinstance(kind, str) else None


InputItem = Annotated[
    Annotated[MessageItem, Tag("Message")]
    | Annotated[FunctionCallItem, Tag("FunctionCall")]
    | Annotated[FunctionCallOutputItem, Tag("FunctionCallOutput")]
    | Annotated[ReasoningItem, Tag("Reasoning")],
    Discriminator(
        _item_tag,
        custom_error_type="unsupported_item",
        custom_error_message=(
            "only message, function_call, function_call_output and reasoning items are "
            "served here (item_reference needs stored state; hosted tools' items, OpenAI's servers)"
        ),
    ),
]


class FunctionToolDefinition(BaseModel):
    """A function tool, flat as the Responses API has it."""

    model_config = _OPENAI

    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; omitted: any object
    strict: bool | None = None  # a label: forced calls always match `parameters`

    def to_wire(self) -> dict[str, Any]:
        function = {
            "name": self.name,
            "description": self.description,
            "parameters": self.parameters,
            "strict": self.strict,
        }
        given = {key: value for key, value in function.items() if value is not None}
        return {"type": "function", "function": given}

    def echo(self) -> FunctionTool:
        return FunctionTool(**self.model_dump(exclude_unset=True))


class ToolChoiceFunctionName(BaseModel):
    """Forces a call of this one function."""

    model_config = _OPENAI

    type: Literal["function"]
    name: str


class JsonSchemaFormat(BaseModel):
    model_config = _OPENAI

    type: Literal["json_schema"]
    name: str  # required, as in OpenAI's API; a label only
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None  # the schema is always enforced


class SimpleFormat(BaseModel):
    model_config = _OPENAI

    type: Literal["text", "json_object"]


class TextConfig(BaseModel):
    model_config = _OPENAI

    format: Annotated[SimpleFormat | JsonSchemaFormat, Field(discriminator="type")] | None = None
    verbosity: str | None = None

    @field_validator("verbosity")
    @classmethod
    def _model_verbosity(cls, value: str | None) -> str | None:
        if value is not None:
            raise unsupported(
                "text.verbosity",
                "the answer's length is the model's own, bounded by max_output_tokens",
            )
        return value

    def constraint(self) -> dict[str, Any] | None:
        if isinstance(self.format, JsonSchemaFormat):
            return {"json_schema": self.format.schema_}
        if self.format is not None and self.format.type == "json_object":
            return {"json_object": True}
        return None


class ReasoningConfig(BaseModel):
    model_config = _OPENAI

    effort: str | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None  # none is made (rules)
    generate_summary: Literal["auto", "concise", "detailed"] | None = None  # its older name

    @field_validator("effort")
    @classmethod
    def _model_effort(cls, value: str | None) -> str | None:
        if value is not None:
            raise unsupported(
                "reasoning.effort",
                "the worker's model reasons as its chat template has it; a template's own "
                "switch can be set with chat_template_kwargs",
            )
        return value


class StreamOptions(BaseModel):
    model_config = _OPENAI

    include_obfuscation: bool | None = None  # no padding is added either way (rules)


@dataclasses.dataclass
class _Source:
    """Where a wire message came from in the caller's request: the item,
    its content, and the item of each of its tool calls."""

    item: tuple
    content: tuple | None = None
    calls: list[tuple] = dataclasses.field(default_factory=list)


class ResponsesRequest(BaseModel):
    """`POST /v1/responses`."""

    model_config = _OPENAI

    id_prefix: ClassVar[str] = "resp_"

    model: str
    input: str | list[InputItem]
    instructions: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    tools: list[FunctionToolDefinition] | None = None  # []: none
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunctionName | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    include: list[str] | None = None  # [] only
    truncation: Literal["disabled", "auto"] | None = None  # "disabled" only
    # State, which the gateway does not keep: refused but for the defaults.
    store: bool | None = None
    background: bool | None = None
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    # Accepted and ignored.
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    # vLLM's extras, as its server takes them in the body (their ranges are
    # the wire protocol's).
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    structured_outputs: StructuredOutputs | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    _sources: list[_Source] = PrivateAttr(default_factory=list)

    @field_validator("tools", mode="before")
    @classmethod
    def _functions_only(cls, value: Any) -> Any:
        for index, tool in enumerate(value if isinstance(value, list) else ()):
            kind = tool.get("type") if isinstance(tool, dict) else None
            if isinstance(kind, str) and kind != "function":
                hosted = f"{kind} is one of OpenAI's hosted tools, which run on OpenAI's servers; "
                raise unsupported(
                    f"tools[{index}].type",
                    (hosted if kind in _HOSTED_TOOLS else "")
                    + "only function tools are served here",
                )
        return value

    @field_validator("include")
    @classmethod
    def _nothing_to_include(cls, value: list[str] | None) -> list[str] | None:
        if value:
            raise unsupported(
                "include[0]",
                "there is nothing more to include: logprobs, encrypted reasoning and hosted "
                "tools' results are not served here",
            )
        return value

    @field_validator("truncation")
    @classmethod
    def _no_truncation(cls, value: str | None) -> str | None:
        if value == "auto":
            raise unsupported(
                "truncation",
                "the gateway does not drop input to fit the model's context (the worker "
                "refuses an input longer than its context)",
            )
        return value

    @field_validator("store")
    @classmethod
    def _nothing_stored(cls, value: bool | None) -> bool | None:
        if value:
            raise unsupported(
                "store", "the gateway stores no response; set store to false or omit it"
            )
        return value

    @field_validator("background")
    @classmethod
    def _no_background(cls, value: bool | None) -> bool | None:
        if value:
            raise unsupported(
                "background", f"a background response needs stored state; {_NO_STATE}"
            )
        return value

    @field_validator("previous_response_id")
    @classmethod
    def _no_previous(cls, value: str | None) -> str | None:
        if value is not None:
            raise unsupported("previous_response_id", _NO_STATE)
        return value

    @field_validator("conversation")
    @classmethod
    def _no_conversation(cls, value: Any) -> Any:
        if value is not None:
            raise unsupported("conversation", _NO_STATE)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ResponsesRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        if self.structured_outputs is not None and self.text is not None:
            if self.text.constraint() is not None:
                raise ValueError("give text.format or structured_outputs, not both")
        return self

    error_body = staticmethod(openai_error_body)

    # Translation into a wire request.

    def wire_request(self) -> dict[str, Any]:
        """The wire request's fields, checked by the wire protocol's schema
        (InvalidRequest names the field of this request at fault)."""
        return checked_wire_request(self.to_wire(), self._caller_param)

    def to_wire(self) -> dict[str, Any]:
        tools = [tool.to_wire() for tool in self.tools or ()] or None
        choice = self.tool_choice
        if tools is None and choice in ("auto", "none"):
            choice = None  # without tools, both mean what no tool_choice means
        if isinstance(choice, ToolChoiceFunctionName):
            choice = {"type": "function", "function": {"name": choice.name}}
        constraint = (
            self.structured_outputs.constraint()
            if self.structured_outputs is not None
            else self.text.constraint()
            if self.text is not None
            else None
        )
        fields = {
            "messages": self._messages(),
            "sampling_params": self._sampling_params(),
            "structured_output": constraint,
            "tools": tools,
            "tool_choice": choice,
            "parallel_tool_calls": self.parallel_tool_calls if tools else None,
            "chat_template_kwargs": self.chat_template_kwargs,
        }
        return {name: value for name, value in fields.items() if value is not None}

    def _sampling_params(self) -> dict[str, Any]:
        params = {
            name: getattr(self, name)
            for name in protocol.SamplingParams.model_fields
            if name in ResponsesRequest.model_fields
        }
        params["max_tokens"] = self.max_output_tokens
        return {name: value for name, value in params.items() if value is not None}

    def _messages(self) -> list[dict[str, Any]]:
        """The conversation as wire messages; `_sources` says where each came from."""
        messages: list[dict[str, Any]] = []
        self._sources = sources = []
        if self.instructions is not None:
            messages.append({"role": "system", "content": self.instructions})
            sources.append(_Source(item=("instructions",), content=("instructions",)))
        if isinstance(self.input, str):
            messages.append({"role": "user", "content": self.input})
            sources.append(_Source(item=("input",), content=("input",)))
            return messages
        for index, item in enumerate(self.input):
            where = ("input", index)
            if isinstance(item, ReasoningItem):
                continue
            if isinstance(item, FunctionCallItem):
                last = messages[-1] if messages else None
                if last is not None and last["role"] == "assistant":  # the same answer's
                    last.setdefault("tool_calls", []).append(item.to_wire())
                    sources[-1].calls.append(where)
                else:
                    messages.append({"role": "assistant", "tool_calls": [item.to_wire()]})
                    sources.append(_Source(item=where, calls=[where]))
                continue
            content = "output" if isinstance(item, FunctionCallOutputItem) else "content"
            messages.append(item.to_wire())
            sources.append(_Source(item=where, content=(*where, content)))
        return messages

    def _caller_param(self, loc: tuple) -> tuple:
        """A wire error's location, as a location in this request."""
        head, rest = (loc[0], loc[1:]) if loc else (None, ())
        if head == "sampling_params":
            if not rest:  # without a name: a rule across several
                return ()
            name = "max_output_tokens" if rest[0] == "max_tokens" else rest[0]
            return (name, *rest[1:])
        if head == "messages":
            if len(rest) < 2 or not isinstance(rest[0], int):
                return ("input",)
            return self._message_param(self._sources[rest[0]], rest[2:])  # without the role tag
        if head == "tools":
            return (head, *(part for part in rest if part != "function"))
        if head == "tool_choice":
            return (head, *(part for part in rest if part != "function"))
        if head == "structured_output":
            if self.structured_outputs is not None:
                return ("structured_outputs", *rest)
            return ("text", "format", *(("schema",) if rest[:1] == ("json_schema",) else ()))
        if head is None:
            return ()
        return (head, *rest)

    @staticmethod
    def _message_param(source: _Source, rest: tuple) -> tuple:
        field, rest = (rest[0], rest[1:]) if rest else (None, ())
        if field == "content" and source.content is not None:
            return (*source.content, *rest)
        if field == "tool_calls" and rest and isinstance(rest[0], int):
            call, rest = source.calls[rest[0]], rest[1:]
            rest = tuple(part for part in rest if part != "function")
            return (*call, "call_id") if rest[:1] == ("id",) else (*call, *rest)
        if field == "tool_call_id":
            return (*source.item, "call_id")
        return source.item

    # Answers.

    def answer(self, completion: Completion, *, response_id: str, created: int, model: str) -> str:
        ids = _ItemIds(response_id.removeprefix(self.id_prefix))
        parts: list[tuple[str, Any]] = []
        if completion.reasoning:
            parts.append(("reasoning", completion.reasoning))
        if completion.text:
            parts.append(("message", completion.text))
        parts += [("function_call", call) for call in completion.tool_calls]
        cut = completion.finish_reason == "length"
        output = []
        for index, (kind, content) in enumerate(parts):
            status = "incomplete" if cut and index == len(parts) - 1 else "completed"
            item_id = ids.of(kind, index)
            if kind == "reasoning":
                output.append(_reasoning_item(item_id, content, status))
            elif kind == "message":
                output.append(_message_item(item_id, content, status))
            else:
                call = _call_item(item_id, content.id, content.name, content.arguments, status)
                output.append(call)
        response = self.response(
            response_id=response_id,
            created=created,
            model=model,
            status="incomplete" if cut else "completed",
            output=output,
            usage=completion.usage,
        )
        return _json(response)

    def chunks(self, *, response_id: str, created: int, model: str) -> ResponseEvents:
        return ResponseEvents(self, response_id=response_id, created=created, model=model)

    def response(
        self,
        *,
        response_id: str,
        created: int,
        model: str,
        status: str,
        output: list,
        usage: protocol.Usage | None = None,
        error: ApiError | None = None,
    ) -> Response:
        """The Response object: what was made so far, and the request's own
        settings, as OpenAI echoes them."""
        fields: dict[str, Any] = {
            "id": response_id,
            "object": "response",
            "created_at": created,
            "status": status,
            "background": False,
            "error": _response_error(error) if error is not None else None,
            "incomplete_details": (
                IncompleteDetails(reason="max_output_tokens") if status == "incomplete" else None
            ),
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "metadata": self.metadata or {},
            "model": model,
            "output": output,
            "parallel_tool_calls": self.parallel_tool_calls is not False,
            "previous_response_id": None,
            "prompt_cache_key": self.prompt_cache_key,
            "reasoning": Reasoning(
                effort=None,
                summary=self.reasoning.summary if self.reasoning is not None else None,
            ),
            "safety_identifier": self.safety_identifier,
            "temperature": self.temperature,
            "text": self._text_echo(),
            "tool_choice": self._tool_choice_echo(),
            "tools": [tool.echo() for tool in self.tools or ()],
            "top_p": self.top_p,
            "truncation": "disabled",
            "usage": _usage(usage) if usage is not None else None,
            "user": self.user,
        }
        if status == "completed":
            fields["completed_at"] = int(time.time())
        return Response(**fields)

    def _text_echo(self) -> ResponseTextConfig:
        given = self.text.format if self.text is not None else None
        if given is None:
            return ResponseTextConfig(format={"type": "text"})
        return ResponseTextConfig(format=given.model_dump(by_alias=True, exclude_unset=True))

    def _tool_choice_echo(self) -> Any:
        if isinstance(self.tool_choice, ToolChoiceFunctionName):
            return ToolChoiceFunction(type="function", name=self.tool_choice.name)
        return self.tool_choice or "auto"


# --- Answers -------------------------------------------------------------------


def _json(model: BaseModel) -> str:
    # exclude_unset: the fields OpenAI sends, null ones included, and no others.
    return model.model_dump_json(exclude_unset=True, by_alias=True, warnings=False)


class _ItemIds:
    """Output items' ids: their kind, the job and their place in the output."""

    PREFIXES: ClassVar[dict[str, str]] = {
        "reasoning": "rs",
        "message": "msg",
        "function_call": "fc",
    }

    def __init__(self, job_id: str):
        self.job_id = job_id

    def of(self, kind: str, output_index: int) -> str:
        return f"{self.PREFIXES[kind]}_{self.job_id}_{output_index}"


def _usage(usage: protocol.Usage) -> ResponseUsage:
    return ResponseUsage(
        input_tokens=usage.prompt_tokens,
        input_tokens_details={"cached_tokens": 0, "cache_write_tokens": 0},
        output_tokens=usage.completion_tokens,
        output_tokens_details={"reasoning_tokens": 0},
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
    )


def _response_error(error: ApiError) -> ResponseError:
    """A failed response's `error`: OpenAI's codes for it are few; the
    gateway's own code is in the stream's `error` event."""
    code = "rate_limit_exceeded" if error.status == 429 else "server_error"
    return ResponseError(code=code, message=error.message)


def _output_text(text: str) -> ResponseOutputText:
    return ResponseOutputText(type="output_text", text=text, annotations=[], logprobs=[])


def _message_item(item_id: str, text: str, status: str) -> ResponseOutputMessage:
    content = [_output_text(text)] if text else []
    return ResponseOutputMessage(
        id=item_id, type="message", role="assistant", content=content, status=status
    )


def _reasoning_item(item_id: str, text: str, status: str) -> ResponseReasoningItem:
    content = [ReasoningText(type="reasoning_text", text=text)] if text else []
    return ResponseReasoningItem(
        id=item_id, type="reasoning", summary=[], content=content, status=status
    )


def _call_item(
    item_id: str, call_id: str, name: str, arguments: str, status: str
) -> ResponseFunctionToolCall:
    return ResponseFunctionToolCall(
        id=item_id,
        type="function_call",
        call_id=call_id,
        name=name,
        arguments=arguments,
        status=status,
    )


class _OpenItem:
    """The output item being streamed: its kind, place, id and content so far."""

    def __init__(self, kind: str, output_index: int, item_id: str):
        self.kind, self.output_index, self.item_id = kind, output_index, item_id
        self.text = ""  # the reasoning, the text, or the call's arguments
        self.call_index: int | None = None
        self.call_id = self.name = ""

    @property
    def where(self) -> dict[str, Any]:
        return {"item_id": self.item_id, "output_index": self.output_index}

    def item(self, status: str) -> BaseModel:
        if self.kind == "reasoning":
            return _reasoning_item(self.item_id, self.text, status)
        if self.kind == "message":
            return _message_item(self.item_id, self.text, status)
        return _call_item(self.item_id, self.call_id, self.name, self.text, status)

    def part(self) -> BaseModel | dict[str, str]:
        """Its content part (reasoning or text), as far as it is written: a
        reasoning part as each event type has its own (PartReasoningText)."""
        if self.kind == "reasoning":
            return {"type": "reasoning_text", "text": self.text}
        return _output_text(self.text)


class ResponseEvents:
    """The events of one streamed response: created and in_progress, then
    each output item's, then completed or incomplete (or failed)."""

    def __init__(self, request: ResponsesRequest, *, response_id: str, created: int, model: str):
        self._request = request
        self._head = {"response_id": response_id, "created": created, "model": model}
        self._ids = _ItemIds(response_id.removeprefix(request.id_prefix))
        self._sequence = itertools.count()
        self._output: list[BaseModel] = []  # the items done
        self._open: _OpenItem | None = None

    def opening(self) -> list[Event]:
        response = self._response("in_progress")
        return [
            self._event(ResponseCreatedEvent, type="response.created", response=response),
            self._event(ResponseInProgressEvent, type="response.in_progress", response=response),
        ]

    def of(self, items: list[StreamItem]) -> list[Event]:
        """The events of items that arrived together, in the order the model
        writes them: reasoning, text, tool calls; after the last item, the
        end of the item it cut or completed, and the response's."""
        item, events = joined(items), []
        if item.reasoning:
            events += self._content("reasoning", item.reasoning)
        if item.text:
            events += self._content("message", item.text)
        for call in item.tool_calls:
            events += self._call(call)
        if item.final:
            status = "incomplete" if item.finish_reason == "length" else "completed"
            events += self._close(status)
            response = self._response(status, usage=item.usage)
            if status == "incomplete":
                kind, name = ResponseIncompleteEvent, "response.incomplete"
            else:
                kind, name = ResponseCompletedEvent, "response.completed"
            events.append(self._event(kind, type=name, response=response))
        return events

    def failure(self, error: ApiError) -> list[Event]:
        """`response.failed` (with the item being streamed, cut, in its
        output), then an `error` event with OpenAI's error object both
        nested, as OpenAI's API sends it and the `openai` SDKs raise it, and
        flat, as its reference documents it."""
        if self._open is not None:
            self._output.append(self._open.item("incomplete"))
            self._open = None
        response = self._response("failed", error=error)
        return [
            self._event(ResponseFailedEvent, type="response.failed", response=response),
            self._event(
                ResponseErrorEvent,
                type="error",
                code=error.code,
                message=error.message,
                param=error.param,
                error=openai_error_body(error)["error"],
            ),
        ]

    def _response(self, status: str, **fields: Any) -> Response:
        return self._request.response(
            **self._head, status=status, output=list(self._output), **fields
        )

    def _event(self, event_type: type[BaseModel], **fields: Any) -> ServerSentEvent:
        event = event_type(**fields, sequence_number=next(self._sequence))
        return ServerSentEvent(data=_json(event), event=fields["type"], sep="\n")

    def _start(self, kind: str) -> list[Event]:
        """Ends the item being streamed, and starts one of this kind."""
        events = self._close("completed")
        output_index = len(self._output)
        self._open = opened = _OpenItem(kind, output_index, self._ids.of(kind, output_index))
        if kind == "function_call":
            return events  # its name comes with its first fragment
        events.append(
            self._event(
                ResponseOutputItemAddedEvent,
                type="response.output_item.added",
                output_index=output_index,
                item=opened.item("in_progress"),
            )
        )
        events.append(
            self._event(
                ResponseContentPartAddedEvent,
                type="response.content_part.added",
                content_index=0,
                part=opened.part(),
                **opened.where,
            )
        )
        return events

    def _content(self, kind: str, delta: str) -> list[Event]:
        events = self._start(kind) if self._open is None or self._open.kind != kind else []
        opened = self._open
        opened.text += delta
        if kind == "reasoning":
            event, name, extra = ResponseReasoningTextDeltaEvent, "reasoning_text", {}
        else:
            event, name, extra = ResponseTextDeltaEvent, "output_text", {"logprobs": []}
        events.append(
            self._event(
                event,
                type=f"response.{name}.delta",
                content_index=0,
                delta=delta,
                **extra,
                **opened.where,
            )
        )
        return events

    def _call(self, call: protocol.ToolCallDelta) -> list[Event]:
        """A tool call's fragment: the first one (with its id and name)
        starts a function_call item; later ones add to its arguments."""
        events: list[Event] = []
        if call.id is not None:
            events = self._start("function_call")
            opened = self._open
            opened.call_index, opened.call_id, opened.name = call.index, call.id, call.name or ""
            events.append(
                self._event(
                    ResponseOutputItemAddedEvent,
                    type="response.output_item.added",
                    output_index=opened.output_index,
                    item=opened.item("in_progress"),
                )
            )
        opened = self._open
        if opened is None or opened.kind != "function_call" or opened.call_index != call.index:
            # The worker streams each call whole before the next: never the case.
            raise RuntimeError("a tool call's fragment came apart from its call")
        if call.arguments:
            opened.text += call.arguments
            events.append(
                self._event(
                    ResponseFunctionCallArgumentsDeltaEvent,
                    type="response.function_call_arguments.delta",
                    delta=call.arguments,
                    **opened.where,
                )
            )
        return events

    def _close(self, status: str) -> list[Event]:
        """The events that end the item being streamed, if there is one."""
        opened, self._open = self._open, None
        if opened is None:
            return []
        if opened.kind == "function_call":
            events = [
                self._event(
                    ResponseFunctionCallArgumentsDoneEvent,
                    type="response.function_call_arguments.done",
                    arguments=opened.text,
                    **opened.where,
                )
            ]
        else:
            if opened.kind == "reasoning":
                event, name, extra = ResponseReasoningTextDoneEvent, "reasoning_text", {}
            else:
                event, name, extra = ResponseTextDoneEvent, "output_text", {"logprobs": []}
            events = [
                self._event(
                    event,
                    type=f"response.{name}.done",
                    content_index=0,
                    text=opened.text,
                    **extra,
                    **opened.where,
                ),
                self._event(
                    ResponseContentPartDoneEvent,
                    type="response.content_part.done",
                    content_index=0,
                    part=opened.part(),
                    **opened.where,
                ),
            ]
        item = opened.item(status)
        self._output.append(item)
        events.append(
            self._event(
                ResponseOutputItemDoneEvent,
                type="response.output_item.done",
                output_index=opened.output_index,
                item=item,
            )
        )
        return events
