"""OpenAI's chat and completions API as the gateway serves it, in wire
protocol v1.1's terms: each route's request as one pydantic model (every
field, its default and its check beside it, as in vLLM's OpenAI protocol
module), its translation into a wire request, and the answers and stream
chunks made of the worker's items, in the `openai` package's own types.

Rules:
- A request field maps onto the wire protocol or is refused with a 400 that
  names it. Accepted and not sent on, because they change nothing in the
  answer: `user`, `metadata`, `store`; the labels of a JSON schema format
  (`name`, `description`, `strict`: the worker enforces the schema itself,
  as vLLM's server does); and what an SDK sends back of an answer it got:
  an assistant message's `refusal` (always null here) and its reasoning
  (`reasoning_content`, or vLLM's `reasoning`), which the wire protocol has
  no field for and models' chat templates drop from earlier turns.
- Names are translated, never meanings: OpenAI's `top_logprobs` is the
  wire's `logprobs`, `response_format` (or vLLM's `structured_outputs`) its
  `structured_output`, the `developer` role its `system`;
  `max_completion_tokens` wins over `max_tokens`.
- The wire protocol checks what it defines (its limits, each message role's
  fields, tools, tool_choice) and its refusals are named by the field the
  caller sent; the models here check what is OpenAI's alone.
- Answers and chunks have OpenAI's shapes: a stream opens with the role,
  then deltas, then `finish_reason` on an empty delta, then the usage chunk
  (with `stream_options.include_usage`). The worker's reasoning is
  `reasoning_content`, beside `content`.
- Nothing here logs or keeps request content.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar, Literal

from openai.types import Completion as TextCompletion
from openai.types import CompletionChoice, CompletionUsage, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage
from openai.types.chat.chat_completion import Choice, ChoiceLogprobs
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import ChoiceDelta
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from encrypted_vllm.client.gateway.api import (
    ApiError,
    Event,
    checked_wire_request,
    openai_error_body,
)
from encrypted_vllm.client.library import Completion
from encrypted_vllm.wire import protocol
from encrypted_vllm.wire.protocol import StreamItem

_OPENAI = ConfigDict(extra="forbid")  # an unknown field is refused, never dropped
_INT64 = 2**63 - 1


# --- Requests -----------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = _OPENAI

    include_usage: bool = False  # a last chunk with the usage, and `usage: null` on the others


class JsonSchemaFormat(BaseModel):
    model_config = _OPENAI

    name: str  # required, as in OpenAI's API; a label only
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None  # the schema is always enforced


class ResponseFormat(BaseModel):
    model_config = _OPENAI

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError('json_schema is given exactly when type is "json_schema"')
        return self

    def constraint(self) -> dict[str, Any] | None:
        if self.type == "json_object":
            return {"json_object": True}
        if self.type == "json_schema":
            return {"json_schema": self.json_schema.schema_}
        return None


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs` body field, for what OpenAI's
    `response_format` cannot say: a regex, a choice, a grammar."""

    model_config = _OPENAI

    json_: dict[str, Any] | str | None = Field(None, alias="json")  # a schema, or its JSON text
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    @field_validator("json_")
    @classmethod
    def _schema_object(cls, value: dict[str, Any] | str | None) -> dict[str, Any] | None:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise ValueError("json is not a JSON schema") from None
            if not isinstance(value, dict):
                raise ValueError("json is not a JSON schema")
        return value

    def constraint(self) -> dict[str, Any]:
        given = {
            "json_schema": self.json_,
            "regex": self.regex,
            "choice": self.choice,
            "grammar": self.grammar,
            "json_object": self.json_object or None,
        }
        return {name: value for name, value in given.items() if value is not None}


class ChatMessage(BaseModel):
    """One of `messages`. Each role's own fields are checked by the wire
    protocol's message types, so that both sides keep one rule."""

    model_config = _OPENAI

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    # Sent back by SDKs with an answer they got; not sent on (module rules).
    refusal: None = None
    reasoning_content: str | None = None
    reasoning: str | None = None

    def to_wire(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role}
        for name in ("content", "name", "tool_calls", "tool_call_id"):
            value = getattr(self, name)
            if value is not None:
                message[name] = value
        return message


class _Sampling(BaseModel):
    """The fields both routes share: OpenAI's sampling fields with OpenAI's
    ranges, and vLLM's extras as its server takes them in the body (their
    ranges are the wire protocol's)."""

    model_config = _OPENAI

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=_INT64)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    n: int | None = None  # 1 only: one job, one answer
    # vLLM's extras.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    structured_outputs: StructuredOutputs | None = None
    # Accepted and ignored.
    user: str | None = None

    @field_validator("n")
    @classmethod
    def _one_answer(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError("only n=1 is served: one answer per request")
        return value

    @model_validator(mode="after")
    def _stream_options_with_stream(self) -> _Sampling:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    error_body = staticmethod(openai_error_body)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def _sampling_params(self, max_tokens: int | None) -> dict[str, Any]:
        """The wire's sampling_params: the fields named alike on both sides, and max_tokens."""
        params = {
            name: getattr(self, name)
            for name in protocol.SamplingParams.model_fields
            if name in _Sampling.model_fields
        }
        params["max_tokens"] = max_tokens
        return {name: value for name, value in params.items() if value is not None}

    def _wire_renames(self) -> dict[str, str]:
        """Wire field -> the field of this request it came from."""
        return {"structured_output": "structured_outputs"}

    def wire_request(self) -> dict[str, Any]:
        """The wire request's fields, checked by the wire protocol's schema
        (InvalidRequest names the field of this request at fault)."""
        return checked_wire_request(self.to_wire(), self._caller_param)

    def _caller_param(self, loc: tuple) -> tuple:
        """A wire error's location, as a location in this request."""
        head, rest = (loc[0], loc[1:]) if loc else (None, ())
        if head == "sampling_params":  # without a name: a rule across several
            if not rest:
                return ()
            name, rest = rest[0], rest[1:]
            return (self._sampling_names().get(name, name), *rest)
        if head == "messages" and len(rest) >= 2:
            return (head, rest[0], *rest[2:])  # without the role's union tag
        if head is None:
            return ()
        return (self._wire_renames().get(head, head), *rest)

    def _sampling_names(self) -> dict[str, str]:
        return {}


class ChatCompletionRequest(_Sampling):
    """`POST /v1/chat/completions`."""

    id_prefix: ClassVar[str] = "chatcmpl-"

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)  # OpenAI's older name; the other wins
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=protocol.MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's extra
    # Accepted and ignored.
    metadata: dict[str, str] | None = None
    store: bool | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs to be true")
        if self.response_format is not None and self.structured_outputs is not None:
            raise ValueError("give response_format or structured_outputs, not both")
        return self

    def to_wire(self) -> dict[str, Any]:
        sampling = self._sampling_params(self.max_completion_tokens or self.max_tokens)
        if self.logprobs:
            sampling["logprobs"] = self.top_logprobs or 0
        constraint = (
            self.response_format.constraint()
            if self.response_format is not None
            else self.structured_outputs.constraint()
            if self.structured_outputs is not None
            else None
        )
        fields = {
            "messages": [message.to_wire() for message in self.messages],
            "sampling_params": sampling,
            "structured_output": constraint,
            "tools": self.tools,
            "tool_choice": self.tool_choice,
            "parallel_tool_calls": self.parallel_tool_calls,
            "chat_template_kwargs": self.chat_template_kwargs,
        }
        return {name: value for name, value in fields.items() if value is not None}

    def answer(self, completion: Completion, **head: Any) -> str:
        return chat_completion(completion, logprobs=self.logprobs, **head)

    def chunks(self, **head: Any) -> ChatChunks:
        return ChatChunks(include_usage=self.include_usage, **head)

    def _wire_renames(self) -> dict[str, str]:
        given = "response_format" if self.response_format is not None else "structured_outputs"
        return {"structured_output": given}

    def _sampling_names(self) -> dict[str, str]:
        given = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
        return {"max_tokens": given, "logprobs": "top_logprobs"}


class CompletionRequest(_Sampling):
    """`POST /v1/completions`: one prompt string, as vLLM's server takes it
    (OpenAI's prompt lists and token arrays are refused)."""

    id_prefix: ClassVar[str] = "cmpl-"

    prompt: str = Field(min_length=1)
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default here; null: no limit

    def answer(self, completion: Completion, **head: Any) -> str:
        return text_completion(completion, **head)

    def chunks(self, **head: Any) -> TextChunks:
        return TextChunks(include_usage=self.include_usage, **head)

    def to_wire(self) -> dict[str, Any]:
        fields = {
            "prompt": self.prompt,
            "sampling_params": self._sampling_params(self.max_tokens),
            "structured_output": (
                self.structured_outputs.constraint() if self.structured_outputs else None
            ),
        }
        return {name: value for name, value in fields.items() if value is not None}


# --- Answers --------------------------------------------------------------------


def usage_of(usage: protocol.Usage) -> CompletionUsage:
    return CompletionUsage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
    )


def _json(model: BaseModel) -> str:
    # exclude_unset: the fields OpenAI sends, null ones included, and no others.
    return model.model_dump_json(exclude_unset=True, warnings=False)


def chat_completion(
    answer: Completion, *, response_id: str, created: int, model: str, logprobs: bool
) -> str:
    """A whole chat completion, as `/v1/chat/completions` answers."""
    calls = [call.to_openai() for call in answer.tool_calls]
    message: dict[str, Any] = {
        "role": "assistant",
        "content": answer.text if answer.text or not calls else None,
        "refusal": None,
    }
    if calls:
        message["tool_calls"] = calls
    if answer.reasoning:
        message["reasoning_content"] = answer.reasoning
    choice = Choice(
        index=0,
        message=ChatCompletionMessage(**message),
        logprobs=ChoiceLogprobs(content=answer.logprobs, refusal=None) if logprobs else None,
        finish_reason=answer.finish_reason,
    )
    completion = ChatCompletion(
        id=response_id,
        object="chat.completion",
        created=created,
        model=model,
        choices=[choice],
        usage=usage_of(answer.usage),
    )
    return _json(completion)


def text_completion(answer: Completion, *, response_id: str, created: int, model: str) -> str:
    """A whole completion, as `/v1/completions` answers."""
    choice = CompletionChoice(
        text=answer.text, index=0, logprobs=None, finish_reason=answer.finish_reason
    )
    completion = TextCompletion(
        id=response_id,
        object="text_completion",
        created=created,
        model=model,
        choices=[choice],
        usage=usage_of(answer.usage),
    )
    return _json(completion)


def joined(items: list[StreamItem]) -> StreamItem:
    """Items that arrived together, as one: so that a stream's chunks follow
    its endpoint's answers, not the worker's item pacing. A tool call's
    fragments join as the worker joins them (one delta per call and chunk);
    the finish_reason, usage and stop_sequence are the last item's, the only
    one with them."""
    if len(items) == 1:
        return items[0]
    calls: list[protocol.ToolCallDelta] = []
    for call in (call for item in items for call in item.tool_calls):
        last = calls[-1] if calls else None
        if last is not None and last.index == call.index and call.id is None:
            calls[-1] = dataclasses.replace(last, arguments=last.arguments + call.arguments)
        else:
            calls.append(call)
    return StreamItem(
        text="".join(item.text for item in items),
        finish_reason=items[-1].finish_reason,
        usage=items[-1].usage,
        reasoning="".join(item.reasoning for item in items),
        tool_calls=tuple(calls),
        logprobs=tuple(entry for item in items for entry in item.logprobs),
        stop_sequence=items[-1].stop_sequence,
    )


class _Chunks:
    """What every chunk of one stream repeats: its id, object, time and
    model, and `usage: null` when the last chunk will carry the usage."""

    OBJECT: ClassVar[str]

    def __init__(self, *, response_id: str, created: int, model: str, include_usage: bool):
        self._head = {"id": response_id, "object": self.OBJECT, "created": created, "model": model}
        if include_usage:
            self._head["usage"] = None
        self.include_usage = include_usage

    def failure(self, error: ApiError) -> list[Event]:
        """One event with OpenAI's error object, and no `[DONE]`."""
        return [json.dumps(openai_error_body(error))]


class ChatChunks(_Chunks):
    """The chunks of one streamed chat completion."""

    OBJECT = "chat.completion.chunk"

    def opening(self) -> list[Event]:
        return [self._chunk(ChoiceDelta(role="assistant", content=""))]

    def of(self, items: list[StreamItem]) -> list[Event]:
        """The chunks of items that arrived together: their delta; after the
        last item, the finish_reason, and the usage when asked for."""
        item, chunks = joined(items), []
        if item.text or item.reasoning or item.tool_calls or item.logprobs:
            delta: dict[str, Any] = {}
            if item.reasoning:
                delta["reasoning_content"] = item.reasoning
            if item.text:
                delta["content"] = item.text
            if item.tool_calls:
                delta["tool_calls"] = [call.to_dict() for call in item.tool_calls]
            logprobs = None
            if item.logprobs:
                logprobs = ChoiceLogprobs(content=item.logprobs, refusal=None)
            chunks.append(self._chunk(ChoiceDelta(**delta), logprobs=logprobs))
        if item.finish_reason is not None:
            chunks.append(self._chunk(ChoiceDelta(), finish_reason=item.finish_reason))
        if item.usage is not None and self.include_usage:
            usage = {**self._head, "choices": [], "usage": usage_of(item.usage)}
            chunks.append(_json(ChatCompletionChunk(**usage)))
        if item.final:
            chunks.append("[DONE]")
        return chunks

    def _chunk(self, delta: ChoiceDelta, *, logprobs=None, finish_reason=None) -> str:
        choice = ChunkChoice(index=0, delta=delta, logprobs=logprobs, finish_reason=finish_reason)
        return _json(ChatCompletionChunk(**self._head, choices=[choice]))


class TextChunks(_Chunks):
    """The chunks of one streamed completion. OpenAI's own type says every
    choice has a finish_reason, but its streams send null until the last;
    so the chunks are built unvalidated (`model_construct`), shape for shape."""

    OBJECT = "text_completion"

    def opening(self) -> list[Event]:
        return []

    def of(self, items: list[StreamItem]) -> list[Event]:
        item, chunks = joined(items), []
        if item.text:
            chunks.append(self._chunk(item.text))
        if item.finish_reason is not None:
            chunks.append(self._chunk("", item.finish_reason))
        if item.usage is not None and self.include_usage:
            usage = {**self._head, "choices": [], "usage": usage_of(item.usage)}
            chunks.append(_json(TextCompletion.model_construct(**usage)))
        if item.final:
            chunks.append("[DONE]")
        return chunks

    def _chunk(self, text: str, finish_reason: str | None = None) -> str:
        choice = CompletionChoice.model_construct(
            text=text, index=0, logprobs=None, finish_reason=finish_reason
        )
        return _json(TextCompletion.model_construct(**self._head, choices=[choice]))


def model_list(entries: list[tuple[str, str | None]], created: int) -> dict[str, Any]:
    """`GET /v1/models`: each model, and each LoRA adapter with the model it
    adapts as its `parent`, as `vllm serve` lists them."""
    models = []
    for name, parent in entries:
        model = Model(id=name, object="model", created=created, owned_by="runpod")
        listed = model.model_dump(exclude_unset=True)
        if parent is not None:
            listed["parent"] = parent
        models.append(listed)
    return {"object": "list", "data": models}
