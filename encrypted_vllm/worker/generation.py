"""One request in the engine's terms, and the engine's output in the
protocol's: the translation between the wire protocol and vLLM.

Rules:
- vLLM does the work wherever it can: its renderer applies the chat template
  (tools and template kwargs included), its structured-output backend
  enforces schemas, grammars and forced tool calls while sampling, and its
  reasoning and tool parsers read the output. Nothing here parses a model's
  output format by hand.
- Forced tool calls (tool_choice "required" or a named function) are a JSON
  schema of the calls, compiled by the backend, and read back by vLLM's
  stateless helpers for that schema: they need no tool parser, and their
  arguments always match the tool's parameters. tool_choice "auto" needs the
  model's own format, so TOOL_CALL_PARSER.
- A request's images reach the renderer decoded and checked (`images`);
  its adapter, as the `LoRARequest` its key may use (`adapters`).
- Every failure is a `ProtocolError` with a fixed reason: vLLM's messages
  quote schemas, templates and tool names, so they are never passed on.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field, replace
from typing import Any

from vllm import PoolingParams, SamplingParams
from vllm.entrypoints.generate.base.protocol import DeltaMessage
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.exceptions import VLLMClientError, VLLMValidationError
from vllm.parser import ParserManager
from vllm.reasoning import ReasoningParserManager
from vllm.renderers import ChatParams
from vllm.renderers.chat_utils import get_tool_call_id_type
from vllm.renderers.inputs.preprocess import parse_model_prompt
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
from vllm.tool_parsers import ToolParserManager
from vllm.tool_parsers.streaming import (
    extract_named_tool_call_streaming,
    extract_required_tool_call_streaming,
)
from vllm.tool_parsers.utils import get_json_schema_from_tools

from encrypted_vllm.wire.protocol import (
    MAX_IMAGES,
    Embed,
    ErrorCode,
    NamedToolChoice,
    ProtocolError,
    Request,
    StreamItem,
    StructuredOutput,
    TextPart,
    TokenLogprob,
    ToolCallDelta,
    Usage,
    WorkerCard,
)
from encrypted_vllm.worker.adapters import Adapters
from encrypted_vllm.worker.images import load as load_images

log = logging.getLogger("worker")

# Prompts up to this long are tokenized on the event loop (see Planner.render).
INLINE_TOKENIZE_CHARS = 4096
# What vLLM's renderer names the prompt in its "longer than the context" errors.
_PROMPT_LENGTH_PARAMETERS = ("input_text", "input_tokens")
# OpenAI's floor for a log-probability, as vLLM's server applies it.
_MIN_LOGPROB = -9999.0
# vLLM loggers that may write request or output content (a template's
# refusal, a tool's name, a parser's traceback around model output): silenced
# but for the critical; a failed parse still reaches the caller, as text.
QUIET_LOGGERS = (
    "vllm.renderers",
    "vllm.tool_parsers",
    "vllm.parser",
    "vllm.reasoning",
    "vllm.v1.structured_output",
)


def check_parser_names(tool_call_parser: str | None, reasoning_parser: str | None) -> list[str]:
    """Problems with TOOL_CALL_PARSER and REASONING_PARSER, one line each."""
    problems = []
    for variable, name, registry in (
        ("TOOL_CALL_PARSER", tool_call_parser, ToolParserManager),
        ("REASONING_PARSER", reasoning_parser, ReasoningParserManager),
    ):
        known = registry.list_registered()
        if name and name not in known:
            problems.append(f"{variable}: {name!r} is not one of vLLM's: {', '.join(known)}")
    return problems


class Planner:
    """Turns requests into engine inputs for one engine, and makes the reader
    of each job's output. Built once, when the engine is up."""

    def __init__(
        self,
        engine,
        *,
        tool_call_parser: str | None = None,
        reasoning_parser: str | None = None,
        adapters: Adapters | None = None,
        allow_image_urls: bool = False,
    ):
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.CRITICAL)
        self.engine = engine
        self.adapters = adapters or Adapters()
        self.allow_image_urls = allow_image_urls
        model_config = engine.model_config
        self.model_config = model_config
        self.max_model_len: int = model_config.max_model_len
        self.tokenizer = engine.renderer.get_tokenizer()
        # The model's own defaults (generation_config.json), as `vllm serve` applies them.
        self.default_sampling = model_config.get_diff_sampling_param()
        self.chat_params = ChatParams(
            chat_template_kwargs={"add_generation_prompt": True, "continue_final_message": False}
        )
        # The chat template writes BOS itself, as in vLLM's chat API.
        self.chat_tokenize = engine.renderer.default_chat_tok_params.with_kwargs(
            add_special_tokens=False
        )
        self.tool_call_id_type = get_tool_call_id_type(model_config)
        self.tool_call_parser, self.reasoning_parser = tool_call_parser, reasoning_parser
        compose = {
            "reasoning_parser_name": reasoning_parser,
            "enable_auto_tools": True,
            "model_name": model_config.model,
            "is_harmony": model_config.hf_config.model_type == "gpt_oss",
            "tokenizer": self.tokenizer,
        }
        # ParserManager raises TypeError for a parser the tokenizer cannot serve.
        self.auto_parser_cls = (
            ParserManager.get_parser(tool_parser_name=tool_call_parser, **compose)
            if tool_call_parser
            else None
        )
        self.reasoning_parser_cls = ParserManager.get_parser(**compose)
        backend = engine.vllm_config.structured_outputs_config.backend
        self.task = "embed" if model_config.runner_type == "pooling" else "generate"
        embedding_size = model_config.embedding_size if self.task == "embed" else None
        self.card = WorkerCard(
            model=model_config.served_model_name,
            max_model_len=self.max_model_len,
            chat_template=bool(getattr(self.tokenizer, "chat_template", None)),
            tool_call_parser=tool_call_parser,
            reasoning_parser=reasoning_parser,
            structured_output_backend=backend,
            max_logprobs=model_config.max_logprobs,
            task=self.task,
            dimensions=embedding_size,
            matryoshka=self.task == "embed" and model_config.is_matryoshka,
            # vLLM allows 999 a prompt by default; the protocol, MAX_IMAGES.
            images=(
                min(model_config.multimodal_config.get_limit_per_prompt("image"), MAX_IMAGES)
                if model_config.is_multimodal_model
                else 0
            ),
            adapters=tuple(self.adapters.specs),
        )

    async def plan(
        self, request: Request, cache_salt: str | None = None, key_id: str | None = None
    ) -> JobPlan:
        """Everything the engine needs for this request; ProtocolError if the
        request cannot be served here. `cache_salt` keeps the engine's cached
        prefixes of this request apart from those of other salts (vLLM's own
        per-request salt, hashed into the first block's key); `key_id`, the
        key that opened it, decides which adapters it may name."""
        if self.task != "generate":
            raise ProtocolError(
                ErrorCode.INVALID_INPUT,
                "this worker serves an embedding model: ask it for embed, not a completion",
            )
        if request.effective_tool_choice == "auto" and self.auto_parser_cls is None:
            raise ProtocolError(
                ErrorCode.INVALID_INPUT,
                'tool_choice "auto" needs the worker\'s TOOL_CALL_PARSER; '
                'use "required", a named function, or "none"',
            )
        if (request.sampling_params.logprobs or 0) > self.model_config.max_logprobs:
            raise ProtocolError(
                ErrorCode.INVALID_INPUT,
                f"logprobs exceeds the worker's max_logprobs={self.model_config.max_logprobs}",
            )
        adapter = self.adapters.for_request(request.adapter, key_id) if request.adapter else None
        chat = ChatRequest.of(request) if request.messages is not None else None
        engine_input = await self._render(request, chat, cache_salt)
        if cache_salt is not None:
            engine_input["cache_salt"] = cache_salt
        prompt_ids = engine_input["prompt_token_ids"]
        reader = OutputReader(self, request, chat, prompt_ids)
        params = self._sampling_params(request, chat, reader)
        needed = len(prompt_ids) + (params.max_tokens or 1)
        if needed > self.max_model_len:
            raise ProtocolError(
                ErrorCode.INVALID_INPUT,
                f"prompt plus max_tokens exceed the model's context of {self.max_model_len} tokens",
            )
        engine_kwargs = reader.engine_kwargs()
        if adapter is not None:
            engine_kwargs["lora_request"] = adapter
        return JobPlan(engine_input, params, reader, engine_kwargs)

    async def plan_embed(self, embed: Embed, cache_salt: str | None = None) -> EmbedPlan:
        """The engine inputs and pooling parameters of an embeddings
        request; ProtocolError if it cannot be served here."""
        if self.task != "embed":
            raise ProtocolError(
                ErrorCode.INVALID_INPUT,
                "this worker serves a generative model: embed needs an embedding model",
            )
        dimensions = embed.dimensions
        if dimensions == self.card.dimensions:
            dimensions = None  # the vectors' own size: nothing to shorten
        if dimensions is not None:
            allowed = self.model_config.matryoshka_dimensions
            if not self.card.matryoshka:
                raise ProtocolError(
                    ErrorCode.INVALID_INPUT,
                    f"this model's embeddings have a fixed size of {self.card.dimensions}: "
                    "dimensions can only be that",
                )
            if dimensions > self.card.dimensions or (allowed and dimensions not in allowed):
                raise ProtocolError(
                    ErrorCode.INVALID_INPUT,
                    "dimensions is not a size this model's embeddings can be shortened to",
                )
        renderer = self.engine.renderer
        tokenize = renderer.default_cmpl_tok_params
        if embed.truncate_prompt_tokens is not None:
            truncate = min(embed.truncate_prompt_tokens, self.max_model_len)
            tokenize = tokenize.with_kwargs(truncate_prompt_tokens=truncate)
        prompts = [parse_model_prompt(self.model_config, each) for each in embed.input]
        # Short inputs inline, as for completions (see _render).
        inline = sum(len(each) for each in embed.input) <= INLINE_TOKENIZE_CHARS
        try:
            if inline:
                engine_inputs = renderer.render_cmpl(prompts, tokenize)
            else:
                engine_inputs = await renderer.render_cmpl_async(prompts, tokenize)
        except asyncio.CancelledError:
            raise
        except VLLMValidationError as error:
            if error.parameter in _PROMPT_LENGTH_PARAMETERS:
                raise ProtocolError(
                    ErrorCode.INVALID_INPUT,
                    f"an embeddings input is longer than the model's context of "
                    f"{self.max_model_len} tokens: shorten it or set truncate_prompt_tokens",
                ) from None
            raise self._render_refusal(error) from None
        except Exception as error:
            raise self._render_refusal(error) from None
        if cache_salt is not None:
            for engine_input in engine_inputs:
                engine_input["cache_salt"] = cache_salt
        params = PoolingParams(task="embed", dimensions=dimensions)
        return EmbedPlan(engine_inputs, params)

    async def _render(
        self, request: Request, chat: ChatRequest | None, cache_salt: str | None
    ) -> dict:
        renderer = self.engine.renderer
        images = request.images
        # vLLM tokenizes in a thread so that a long prompt never stalls the
        # other streams; but under load the hop back costs a job a turn of a
        # busy event loop and a GIL switch (about 10 ms at 64 streams on two
        # cores, measured) where tokenizing a short prompt inline costs 0.1 ms.
        inline = (
            request.tools is None and not images and _prompt_chars(request) <= INLINE_TOKENIZE_CHARS
        )
        chats = None
        if chat is not None:
            chats = [[message.to_template() for message in request.messages]]
            if images:
                loaded = await load_images(
                    images,
                    limit=self.card.images,
                    allow_urls=self.allow_image_urls,
                    cache_salt=cache_salt,
                )
                _put_images(chats[0], loaded)
        try:
            if chat is None:
                prompts = [parse_model_prompt(self.model_config, request.prompt)]
                if inline:
                    (engine_input,) = renderer.render_cmpl(prompts)
                else:
                    (engine_input,) = await renderer.render_cmpl_async(prompts)
            else:
                arguments = (chats, self._chat_params(request), self.chat_tokenize)
                if inline:
                    _, (engine_input,) = renderer.render_chat(*arguments)
                else:
                    _, (engine_input,) = await renderer.render_chat_async(*arguments)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            raise self._render_refusal(error) from None
        return engine_input

    def _chat_params(self, request: Request) -> ChatParams:
        if request.tools is None and not request.chat_template_kwargs:
            return self.chat_params
        kwargs = {
            **(request.chat_template_kwargs or {}),
            **self.chat_params.chat_template_kwargs,
            "tools": [tool.model_dump(exclude_none=True) for tool in request.tools or ()] or None,
        }
        return ChatParams(chat_template_kwargs=kwargs)

    def _render_refusal(self, error: Exception) -> ProtocolError:
        if isinstance(error, VLLMValidationError) and error.parameter in _PROMPT_LENGTH_PARAMETERS:
            return ProtocolError(
                ErrorCode.INVALID_INPUT,
                f"the prompt is longer than the model's context of {self.max_model_len} tokens",
            )
        log.info("could not render a prompt: %s", type(error).__name__)
        return ProtocolError(
            ErrorCode.INVALID_INPUT, "the input could not be rendered into a prompt for this model"
        )

    def _sampling_params(
        self, request: Request, chat: ChatRequest | None, reader: OutputReader
    ) -> SamplingParams:
        kwargs = {**self.default_sampling, **request.sampling_params.to_engine_kwargs()}
        constraint = reader.constraint()
        if constraint is not None:
            kwargs["structured_outputs"] = constraint
        if reader.parser is not None and chat is not None:
            # Parsers read their markers as text (hermes sets this for tools).
            kwargs["skip_special_tokens"] = chat.vllm.skip_special_tokens
        try:
            # skip_clone: these params are made for this one request, so the
            # engine need not deep-copy them (17 µs a job, measured), as
            # vLLM's own OpenAI server does for the same reason.
            return SamplingParams(**kwargs, output_kind=RequestOutputKind.DELTA, skip_clone=True)
        except (VLLMClientError, ValueError, TypeError):
            raise ProtocolError(
                ErrorCode.INVALID_INPUT, "sampling_params are inconsistent with each other"
            ) from None


@dataclass
class EmbedPlan:
    engine_inputs: list[dict]  # one per input, in order
    params: PoolingParams


@dataclass
class JobPlan:
    engine_input: dict
    params: SamplingParams
    reader: OutputReader
    engine_kwargs: dict[str, Any]


def _put_images(messages: list[dict[str, Any]], loaded: list[dict[str, Any]]) -> None:
    """Puts the loaded images in place of the image_url parts, in order."""
    parts = iter(loaded)
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            message["content"] = [
                next(parts) if part["type"] == "image_url" else part for part in content
            ]


def _prompt_chars(request: Request) -> int:
    if request.prompt is not None:
        return len(request.prompt)
    total = 0
    for message in request.messages:
        content = message.content or ""
        if isinstance(content, str):
            total += len(content)
        else:
            total += sum(len(part.text) for part in content if isinstance(part, TextPart))
        total += sum(
            len(call.function.arguments) for call in getattr(message, "tool_calls", None) or ()
        )
    return total


def _constraint(output: StructuredOutput) -> StructuredOutputsParams:
    if output.json_schema is not None:
        return StructuredOutputsParams(json=output.json_schema)
    if output.json_object:
        return StructuredOutputsParams(json_object=True)
    if output.regex is not None:
        return StructuredOutputsParams(regex=output.regex)
    if output.choice is not None:
        return StructuredOutputsParams(choice=list(output.choice))
    return StructuredOutputsParams(grammar=output.grammar)


@dataclass
class ChatRequest:
    """A chat request as vLLM's parsers read it: its own OpenAI request type,
    built in memory (about 40 µs), never served over HTTP."""

    vllm: ChatCompletionRequest

    @classmethod
    def of(cls, request: Request) -> ChatRequest:
        choice = request.effective_tool_choice
        try:
            vllm_request = ChatCompletionRequest(
                messages=[message.model_dump(exclude_none=True) for message in request.messages],
                tools=[tool.model_dump(exclude_none=True) for tool in request.tools or ()] or None,
                tool_choice=choice.model_dump() if isinstance(choice, NamedToolChoice) else choice,
                parallel_tool_calls=request.allows_parallel_tool_calls,
                structured_outputs=(
                    _constraint(request.structured_output) if request.structured_output else None
                ),
                chat_template_kwargs=request.chat_template_kwargs,
                include_reasoning=True,
            )
        except ValueError:  # pydantic's, or vLLM's own checks
            raise ProtocolError(
                ErrorCode.INVALID_INPUT, "the chat request is not one vLLM accepts"
            ) from None
        return cls(vllm_request)


class OutputReader:
    """Reads one job's engine deltas into protocol deltas, through vLLM's
    parsers: reasoning (REASONING_PARSER), then tool calls: the model's own
    format (TOOL_CALL_PARSER) for "auto", the forced-call schema for
    "required" and named functions."""

    def __init__(
        self,
        planner: Planner,
        request: Request,
        chat: ChatRequest | None,
        prompt_token_ids: list[int],
    ):
        self.planner, self.request, self.chat = planner, request, chat
        self.prompt_token_ids = prompt_token_ids
        self.forced = request.forced_tool_calls
        self.top_logprobs = request.sampling_params.logprobs
        self.parser = None
        if chat is not None:
            auto = request.effective_tool_choice == "auto"
            parser_cls = planner.auto_parser_cls if auto else planner.reasoning_parser_cls
            if parser_cls is not None:
                self.parser = parser_cls(
                    planner.tokenizer,
                    chat.vllm.tools,
                    chat_template_kwargs=request.chat_template_kwargs,
                    model_config=planner.model_config,
                )
                try:
                    chat.vllm = self.parser.adjust_request(chat.vllm)
                except ValueError:
                    raise ProtocolError(
                        ErrorCode.INVALID_INPUT, "the tools cannot be used with this model"
                    ) from None
        # Forced calls: the JSON text written so far, and whether a call began.
        self._forced_text = ""
        self._call_started = False
        self.saw_tool_calls = False

    def constraint(self) -> StructuredOutputsParams | None:
        """What the structured-output backend must enforce, if anything."""
        if self.forced:
            vllm = self.chat.vllm
            try:
                schema = get_json_schema_from_tools(
                    vllm.tool_choice, vllm.tools, vllm.parallel_tool_calls
                )
            except ValueError:  # tools whose $defs clash
                raise ProtocolError(
                    ErrorCode.INVALID_INPUT, "the tools' schemas cannot be combined"
                ) from None
            return StructuredOutputsParams(json=schema)
        if self.chat is not None:
            # The request's own, or what a parser made of it (a strict
            # tool's call format beside it, say).
            return self.chat.vllm.structured_outputs
        if self.request.structured_output is not None:
            return _constraint(self.request.structured_output)
        return None

    def engine_kwargs(self) -> dict[str, Any]:
        """Tells the engine whether the prompt already closed the reasoning,
        so that a constraint waits for the answer, as vLLM's server does."""
        if self.parser is None or self.parser.reasoning_parser is None:
            return {}
        return {
            "reasoning_ended": self.parser.is_reasoning_end(self.prompt_token_ids),
            "reasoning_parser_kwargs": {"chat_template_kwargs": self.request.chat_template_kwargs},
        }

    def read(self, output, finished: bool) -> Delta:
        """One engine delta (`CompletionOutput`) as text, reasoning, tool-call
        deltas and logprobs; parsers must see every delta, even empty ones."""
        delta = Delta(logprobs=self._logprobs(output))
        token_ids = list(output.token_ids)
        if self.parser is None:
            message = DeltaMessage(content=output.text)
        else:
            message = self.parser.parse_delta(
                output.text,
                token_ids,
                self.chat.vllm,
                prompt_token_ids=self.prompt_token_ids,
                finished=finished,
            )
        if message is None:
            return delta
        delta.reasoning = message.reasoning or ""
        if self.forced:
            delta.tool_calls = self._forced_calls(message.content or "")
        else:
            delta.text = message.content or ""
            calls = message.tool_calls
            if calls and self.request.parallel_tool_calls is False:
                calls = [call for call in calls if call.index == 0]
            delta.tool_calls = [_tool_call_delta(call) for call in calls]
        self.saw_tool_calls = self.saw_tool_calls or bool(delta.tool_calls)
        return delta

    def _forced_calls(self, text: str) -> list[ToolCallDelta]:
        previous, self._forced_text = self._forced_text, self._forced_text + text
        choice = self.chat.vllm.tool_choice
        if isinstance(choice, str):  # "required": a JSON array of calls
            message, _ = extract_required_tool_call_streaming(
                previous_text=previous,
                current_text=self._forced_text,
                tool_call_idx=None,
                tool_call_id_type=self.planner.tool_call_id_type,
            )
        elif text:  # a named function: the text is its arguments
            message, self._call_started = extract_named_tool_call_streaming(
                delta_text=text,
                function_name=choice.function.name,
                function_name_returned=self._call_started,
                tool_call_idx=None,
                tool_call_id_type=self.planner.tool_call_id_type,
                tokenizer=self.planner.tokenizer,
            )
        else:
            message = None
        return [_tool_call_delta(call) for call in message.tool_calls] if message else []

    def finish_reason(self, output) -> str:
        """OpenAI's finish_reason; ProtocolError where vLLM reports an error."""
        reason = output.finish_reason
        if reason == "error":
            if self.constraint_given:
                raise ProtocolError(
                    ErrorCode.INVALID_INPUT, "the engine could not keep to the structured output"
                )
            raise ProtocolError(ErrorCode.ENGINE_ERROR, "generation failed")
        if reason == "stop" and self.saw_tool_calls:
            return "tool_calls"
        return reason or "stop"

    @property
    def constraint_given(self) -> bool:
        return self.forced or self.request.structured_output is not None

    def _logprobs(self, output) -> list[TokenLogprob]:
        # vLLM's own formatter is a private method of its HTTP server, and it
        # lists the sampled token among the top alternatives; OpenAI lists
        # the k likeliest tokens. Hence these few lines.
        if self.top_logprobs is None or not output.logprobs:
            return []
        entries = []
        for token_id, candidates in zip(output.token_ids, output.logprobs, strict=False):
            chosen = candidates[token_id]
            ranked = sorted(candidates.values(), key=lambda candidate: candidate.rank or 0)
            entries.append(
                {
                    **_logprob_entry(chosen),
                    "top_logprobs": [_logprob_entry(c) for c in ranked[: self.top_logprobs]],
                }
            )
        return entries


def _logprob_entry(candidate) -> dict[str, Any]:
    token = candidate.decoded_token or ""
    return {
        "token": token,
        "logprob": max(candidate.logprob, _MIN_LOGPROB),
        "bytes": list(token.encode("utf-8", errors="replace")),
    }


def _tool_call_delta(call) -> ToolCallDelta:
    function = call.function
    return ToolCallDelta(
        index=call.index,
        id=call.id,
        name=function.name if function else None,
        arguments=(function.arguments or "") if function else "",
    )


@dataclass
class Delta:
    """What the engine added since the previous item, not yet sent."""

    text: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.text or self.reasoning or self.tool_calls or self.logprobs)

    def add(self, other: Delta) -> None:
        self.text += other.text
        self.reasoning += other.reasoning
        self.logprobs += other.logprobs
        for call in other.tool_calls:
            last = self.tool_calls[-1] if self.tool_calls else None
            if last is not None and last.index == call.index and call.id is None:
                # A fragment of the call already pending: one delta, as OpenAI sends.
                self.tool_calls[-1] = ToolCallDelta(
                    last.index, last.id, last.name, last.arguments + call.arguments
                )
            else:
                self.tool_calls.append(call)

    def take(self, finish_reason: str | None = None, usage: Usage | None = None) -> StreamItem:
        """The pending delta as one item, and nothing pending after."""
        item = StreamItem(
            text=self.text,
            reasoning=self.reasoning,
            tool_calls=tuple(self.tool_calls),
            logprobs=tuple(self.logprobs),
            finish_reason=finish_reason,
            usage=usage,
        )
        self.text, self.reasoning, self.tool_calls, self.logprobs = "", "", [], []
        return item


def describe(planner: Planner, key_id: str | None = None) -> StreamItem:
    """The answer to `{"describe": true}`: the worker's card, in one item,
    naming the adapters that the asking key may use."""
    card = replace(planner.card, adapters=planner.adapters.names_for(key_id))
    return StreamItem(card=card, finish_reason="stop", usage=Usage(0, 0))
