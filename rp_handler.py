"""RunPod serverless entry point: one vLLM engine, encrypted streaming jobs.

`python3 rp_handler.py` starts the worker exactly as the container does.

Rules:
- Configuration is read once (`config.WorkerConfig`); the key, the model and
  the engine are checked before the first job is taken, and the process exits
  non-zero with a clear message if any of them fails.
- `Worker.handler` is an async generator, so every job shares one event loop
  and one engine (continuous batching). Each yielded item is the encrypted
  text since the previous one; a stream yields at most its share of
  MAX_ITEMS_PER_SECOND, and the SDK posts each item before resuming us, so
  busy workers and slow networks coalesce tokens and lose none.
- Every finished job logs one `job done {...}` line of numbers.
- A dead engine fails every job in flight with ENGINE_ERROR and the worker
  exits non-zero, so that RunPod replaces it.
- A job fails only by yielding `{"error": "<CODE>: <reason>"}`: never by
  raising (the SDK would put a traceback into the job's error) and never
  inside successful output.
- Nothing from a request or its completion is logged.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

import torch
from vllm import AsyncEngineArgs, SamplingParams
from vllm.engine.async_llm_engine import AsyncLLMEngine
from vllm.exceptions import VLLMClientError, VLLMValidationError
from vllm.renderers import ChatParams
from vllm.renderers.inputs.preprocess import parse_model_prompt
from vllm.sampling_params import RequestOutputKind
from vllm.utils.gc_utils import freeze_gc_heap

import utils
from config import ConfigError, WorkerConfig
from protocol import ErrorCode, Inbox, ProtocolError, Request, StreamItem, Usage

log = logging.getLogger("worker")

# Engine arguments that have their own variable, or that would log prompts.
_RESERVED_ENGINE_ARGS = {
    "model",
    "gpu_memory_utilization",
    "max_model_len",
    "dtype",
    "tensor_parallel_size",
    "enable_log_requests",
}
# Prompts up to this long are tokenized on the event loop (see Worker._render).
INLINE_TOKENIZE_CHARS = 4096
# What vLLM's renderer names the prompt in its "longer than the context" errors.
_PROMPT_LENGTH_PARAMETERS = ("input_text", "input_tokens")


@dataclasses.dataclass
class JobRecord:
    """What the one log line of a finished job says: numbers, never text."""

    job: str
    model: str
    received: float = dataclasses.field(default_factory=time.monotonic)
    queue_wait_s: float | None = None  # since the client encrypted it: RunPod's queue and transit
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_item: float | None = None
    last_item: float | None = None
    finish_reason: str | None = None
    error: str | None = None

    def line(self) -> str:
        ttft = self.first_item - self.received if self.first_item else None
        streaming = (self.last_item or 0) - (self.first_item or 0)
        rate = self.completion_tokens / streaming if streaming > 0 else None
        fields = {
            "job": self.job,
            "model": self.model,
            "outcome": "failed" if self.error else "completed",
            "error": self.error,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "queue_wait_s": _rounded(self.queue_wait_s),
            "ttft_s": _rounded(ttft),
            "tokens_per_s": _rounded(rate, 1),
            "finish_reason": self.finish_reason,
        }
        return json.dumps({key: value for key, value in fields.items() if value is not None})


def _rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


class Worker:
    """Serves jobs on one engine; its only state is the bookkeeping of jobs in flight."""

    def __init__(
        self,
        engine: AsyncLLMEngine,
        inbox: Inbox,
        *,
        max_items_per_s: float = 0,
        on_engine_death: Callable[[], None] = lambda: None,
    ):
        self.engine = engine
        self.inbox = inbox
        self.max_items_per_s = max_items_per_s
        self.on_engine_death = on_engine_death
        self._aborting: set[asyncio.Task] = set()
        # Jobs' tasks while they await the engine, and those of them that
        # the engine's death watch cancelled (see _watch_engine).
        self._in_engine: set[asyncio.Task] = set()
        self._failing: set[asyncio.Task] = set()
        self._watch: asyncio.Task | None = None
        self._death_reported = False
        model_config = engine.model_config
        self.model_name: str = model_config.served_model_name
        self.max_model_len: int = model_config.max_model_len
        # The model's own defaults (generation_config.json), as `vllm serve` applies them.
        self.default_sampling = model_config.get_diff_sampling_param()
        self.chat_params = ChatParams(
            chat_template_kwargs={"add_generation_prompt": True, "continue_final_message": False}
        )
        # The chat template writes BOS itself, as in vLLM's chat API.
        self.chat_tokenize = engine.renderer.default_chat_tok_params.with_kwargs(
            add_special_tokens=False
        )

    async def handler(self, job: dict) -> AsyncIterator[dict]:
        """A RunPod job in, encrypted stream items out; one log line at its end."""
        record = JobRecord(job=str(job.get("id")), model=self.model_name)
        self._start_watch()
        failure: ProtocolError | None = None
        try:
            request, issued_at = self.inbox.admit(job.get("input"))
            record.queue_wait_s = max(time.time() - issued_at, 0.0)
            async for item in self.generate(request, record):
                yield self.inbox.channel.seal_item(item)
        except ProtocolError as error:
            failure = error
        except Exception as error:
            # A bug must fail the job, not reach the SDK, which would put the
            # exception's message (possibly request content) in the job's error.
            log.error("job %s: internal error %s", record.job, _where(error))
            failure = ProtocolError(ErrorCode.ENGINE_ERROR, "internal error in the worker")
        record.error = failure.code.value if failure else None
        log.info("job done %s", record.line())
        if failure:
            yield {"error": str(failure)}

    async def generate(self, request: Request, record: JobRecord) -> AsyncIterator[StreamItem]:
        """Plaintext deltas of one request; the last carries finish_reason and
        usage. Keeps `record` up to date."""
        request_id = record.job
        engine_input = await self._render(request)
        params = self._sampling_params(request)
        self._check_fits_context(engine_input, params)
        record.prompt_tokens = len(engine_input["prompt_token_ids"])
        finished = stopped = False
        held: list[str] = []  # text of deltas not yet sent
        next_item_due = 0.0

        def stop_early(_job: asyncio.Task | None = None) -> None:
            # Once, if the job ended before its request did. RunPod's stop
            # signal cancels the job's task wherever it waits: often in the
            # SDK's post of an item, while this generator sits at a yield and
            # would only be closed by a later garbage collection.
            nonlocal stopped
            if not (finished or stopped):
                stopped = True
                self._abort_soon(request_id)

        job = asyncio.current_task()
        job.add_done_callback(stop_early)
        try:
            # aclosing: leaving this loop early closes the engine's stream too.
            async with aclosing(self.engine.generate(engine_input, params, request_id)) as outputs:
                while True:
                    self._in_engine.add(job)
                    try:
                        output = await anext(outputs)
                    except StopAsyncIteration:
                        break
                    finally:
                        self._in_engine.discard(job)
                    delta = output.outputs[0]
                    record.completion_tokens += len(delta.token_ids)
                    held.append(delta.text)
                    if output.finished:
                        finished = True
                        record.finish_reason = delta.finish_reason
                        usage = Usage(record.prompt_tokens, record.completion_tokens)
                        item = StreamItem("".join(held), delta.finish_reason, usage)
                    elif delta.text and time.monotonic() >= next_item_due:
                        item = StreamItem("".join(held))
                    else:
                        continue  # held back: pacing, or a character not yet complete
                    held.clear()
                    record.last_item = time.monotonic()
                    record.first_item = record.first_item or record.last_item
                    yield item
                    next_item_due = record.last_item + self._item_interval()
        except asyncio.CancelledError:
            if job not in self._failing:
                raise  # RunPod's stop signal
            self._failing.discard(job)
            job.uncancel()
            raise self._engine_died(request_id, "stuck on the dead engine") from None
        except (VLLMClientError, ValueError) as error:
            log.info("engine refused request %s: %s", request_id, type(error).__name__)
            raise ProtocolError(ErrorCode.INVALID_INPUT, "the engine refused the request") from None
        except Exception as error:
            if self.engine.errored:
                raise self._engine_died(request_id, type(error).__name__) from None
            log.error("generation failed for %s: %s", request_id, type(error).__name__)
            raise ProtocolError(ErrorCode.ENGINE_ERROR, "generation failed") from None
        finally:
            job.remove_done_callback(stop_early)
            stop_early()

    def _item_interval(self) -> float:
        """Each stream's share of max_items_per_s, in seconds. An item costs
        an encryption here and an HTTP post to RunPod whether it holds one
        token or ten: pacing keeps that cost flat as streams multiply, while
        a lone stream still gets its tokens as they come."""
        if not self.max_items_per_s:
            return 0.0
        return self.engine.get_num_unfinished_requests() / self.max_items_per_s

    def _start_watch(self) -> None:
        loop = asyncio.get_running_loop()
        if self._watch is None or self._watch.done() or self._watch.get_loop() is not loop:
            self._watch = loop.create_task(self._watch_engine())

    async def _watch_engine(self, every_s: float = 0.5) -> None:
        """A dying engine fails the requests it holds with EngineDeadError,
        but a job caught on its way in (adding its request as the engine
        died) would wait forever: cancel those, to fail them too."""
        while True:
            await asyncio.sleep(every_s)
            if self.engine.errored:
                for task in self._in_engine - self._failing:
                    self._failing.add(task)
                    task.cancel()

    def _engine_died(self, request_id: str, why: str) -> ProtocolError:
        log.error("the engine died (%s); failing job %s", why, request_id)
        if not self._death_reported:
            self._death_reported = True
            self.on_engine_death()
        reason = "the engine died; this worker is being replaced"
        return ProtocolError(ErrorCode.ENGINE_ERROR, reason)

    def _abort_soon(self, request_id: str) -> None:
        task = asyncio.ensure_future(self._abort(request_id))
        self._aborting.add(task)  # a reference, until it is done
        task.add_done_callback(self._aborting.discard)

    async def _abort(self, request_id: str) -> None:
        if not self.engine.errored:
            await self.engine.abort(request_id)
        log.info(
            "job %s stopped early: request aborted, %d unfinished in the engine",
            request_id,
            self.engine.get_num_unfinished_requests(),
        )

    async def _render(self, request: Request) -> dict:
        renderer = self.engine.renderer
        # vLLM tokenizes in a thread so that a long prompt never stalls the
        # other streams; but under load the hop back costs a job a turn of a
        # busy event loop and a GIL switch (about 10 ms at 64 streams on two
        # cores, measured) where tokenizing a short prompt inline costs 0.1 ms.
        inline = _prompt_chars(request) <= INLINE_TOKENIZE_CHARS
        try:
            if request.prompt is not None:
                prompts = [parse_model_prompt(self.engine.model_config, request.prompt)]
                if inline:
                    (engine_input,) = renderer.render_cmpl(prompts)
                else:
                    (engine_input,) = await renderer.render_cmpl_async(prompts)
            else:
                chats = [[message.model_dump() for message in request.messages]]
                arguments = (chats, self.chat_params, self.chat_tokenize)
                if inline:
                    _, (engine_input,) = renderer.render_chat(*arguments)
                else:
                    _, (engine_input,) = await renderer.render_chat_async(*arguments)
        except Exception as error:
            raise self._render_refusal(error) from None
        return engine_input

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

    def _sampling_params(self, request: Request) -> SamplingParams:
        kwargs = {**self.default_sampling, **request.sampling_params.to_engine_kwargs()}
        try:
            # skip_clone: these params are made for this one request, so the
            # engine need not deep-copy them (17 µs a job, measured), as
            # vLLM's own OpenAI server does for the same reason.
            return SamplingParams(**kwargs, output_kind=RequestOutputKind.DELTA, skip_clone=True)
        except (VLLMClientError, ValueError, TypeError):
            raise ProtocolError(
                ErrorCode.INVALID_INPUT, "sampling_params are inconsistent with each other"
            ) from None

    def _check_fits_context(self, engine_input: dict, params: SamplingParams) -> None:
        needed = len(engine_input["prompt_token_ids"]) + (params.max_tokens or 1)
        if needed > self.max_model_len:
            raise ProtocolError(
                ErrorCode.INVALID_INPUT,
                f"prompt plus max_tokens exceed the model's context of {self.max_model_len} tokens",
            )


def _prompt_chars(request: Request) -> int:
    if request.prompt is not None:
        return len(request.prompt)
    return sum(len(message.content) for message in request.messages)


def _where(error: BaseException) -> str:
    """An exception's type and innermost frame, without its message."""
    frames = traceback.extract_tb(error.__traceback__)
    place = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    return f"{type(error).__name__}{place}"


def engine_arguments(config: WorkerConfig, model_dir: str, model_name: str) -> dict[str, Any]:
    """Keyword arguments for `AsyncEngineArgs`; ConfigError for a bad ENGINE_ARGS."""
    known = {field.name for field in dataclasses.fields(AsyncEngineArgs)}
    extra = config.engine_args
    problems = [
        f"ENGINE_ARGS: {name!r} has its own variable or is not allowed"
        for name in sorted(extra.keys() & _RESERVED_ENGINE_ARGS)
    ] + [
        f"ENGINE_ARGS: {name!r} is not a vLLM engine argument"
        for name in sorted(extra.keys() - known - _RESERVED_ENGINE_ARGS)
    ]
    if problems:
        raise ConfigError("invalid worker configuration:\n  " + "\n  ".join(problems))
    return {
        **extra,
        "model": model_dir,
        "served_model_name": extra.get("served_model_name", model_name),
        "gpu_memory_utilization": config.gpu_memory_utilization,
        "max_model_len": config.max_model_len,
        "dtype": config.dtype,
        "tensor_parallel_size": config.tensor_parallel_size or visible_gpus(),
        "enable_log_requests": False,
    }


def visible_gpus() -> int:
    return max(torch.cuda.device_count(), 1)


class NoModelStarted(Exception):
    """Every model of MODELS failed to resolve or to start; says why, each."""


def start_engine(config: WorkerConfig) -> AsyncLLMEngine:
    """Boot the engine on the first model of MODELS that resolves and loads."""
    engine_arguments(config, "", "")  # a bad ENGINE_ARGS fails at once, not per model
    reasons = []
    for ref in config.models:
        try:
            model_dir = utils.resolve(ref, config.sources)
            arguments = engine_arguments(config, str(model_dir), ref.name)
            engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(**arguments))
        except utils.ModelError as error:
            reasons.append(str(error))
        except Exception as error:  # the engine's own failures are many and varied
            reasons.append(f"{ref}: the engine could not start: {type(error).__name__}: {error}")
        else:
            log.info("serving %s", ref)
            return engine
        log.warning("%s", reasons[-1])
    raise NoModelStarted("no model of MODELS could start:\n  " + "\n  ".join(reasons))


def _sdk_local_mode(argv: list[str]) -> bool:
    """True where the runpod SDK would run its local test modes, which
    cannot run a streaming handler (they report success without running it)."""
    local_flags = ("--test_input", "--rp_serve_api")
    return not os.environ.get("RUNPOD_WEBHOOK_GET_JOB") or any(
        arg.startswith(local_flags) for arg in argv
    )


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = WorkerConfig.from_env()
    except ConfigError as error:
        log.error("%s", error)
        return 2
    if _sdk_local_mode(argv):
        log.error(
            "not running as a RunPod worker (RUNPOD_WEBHOOK_GET_JOB is unset, or a "
            "local SDK flag was given). The runpod SDK's local modes cannot run this "
            "streaming handler; test locally with: python3 test_local.py"
        )
        return 2
    try:
        engine = start_engine(config)
    except ConfigError as error:
        log.error("%s", error)
        return 2
    except NoModelStarted as error:
        log.error("%s", error)
        return 1

    # A dead engine cannot come back: fail what is in flight, then stop as
    # RunPod stops a worker (SIGTERM: the SDK takes no more jobs and reports
    # those in hand), and exit non-zero so that RunPod replaces this worker.
    worker = Worker(
        engine,
        config.inbox(),
        max_items_per_s=config.max_items_per_s,
        on_engine_death=lambda: os.kill(os.getpid(), signal.SIGTERM),
    )
    # Start-up leaves millions of long-lived objects (torch, vLLM, the
    # tokenizer); each full garbage collection walked them all, stalling
    # every stream for about half a second (measured). vLLM's own server
    # freezes them out of the collector the same way.
    freeze_gc_heap()
    # The SDK reads its log level at import; set it there and, in case the
    # SDK was imported earlier, on its logger too.
    os.environ["RUNPOD_LOG_LEVEL"] = config.runpod_log_level
    import runpod
    from runpod.serverless.modules.rp_logger import RunPodLogger

    RunPodLogger().set_level(config.runpod_log_level)

    runpod.serverless.start(
        {
            "handler": worker.handler,
            "concurrency_modifier": lambda _current: config.max_concurrency,
            # /run and /runsync then return every item, for clients that do not stream.
            "return_aggregate_stream": True,
        }
    )
    if engine.errored:
        log.error("the engine died; exiting so that RunPod replaces this worker")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
