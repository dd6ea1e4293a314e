"""RunPod serverless entry point: one vLLM engine, encrypted streaming jobs.

`python3 rp_handler.py` starts the worker exactly as the container does.

Rules:
- Configuration is read once (`config.WorkerConfig`); the key, the model and
  the engine are checked before the first job is taken, and the process exits
  non-zero with a clear message if any of them fails.
- `Worker.handler` is an async generator, so every job shares one event loop
  and one engine (continuous batching). Each yielded item is one encrypted
  delta. The SDK posts it before resuming us while the engine keeps
  accumulating deltas, so a slow network coalesces tokens and loses none.
- A job fails only by yielding `{"error": "<CODE>: <reason>"}`: never by
  raising (the SDK would put a traceback into the job's error) and never
  inside successful output.
- Nothing from a request or its completion is logged.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import sys
import traceback
from collections.abc import AsyncIterator
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
# What vLLM's renderer names the prompt in its "longer than the context" errors.
_PROMPT_LENGTH_PARAMETERS = ("input_text", "input_tokens")


class Worker:
    """Serves jobs on one engine; holds no state of its own beyond aborts in flight."""

    def __init__(self, engine: AsyncLLMEngine, inbox: Inbox):
        self.engine = engine
        self.inbox = inbox
        self._aborting: set[asyncio.Task] = set()
        model_config = engine.model_config
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
        """A RunPod job in, encrypted stream items out."""
        job_id = job.get("id")
        try:
            request = self.inbox.admit(job.get("input"))
            async for item in self.generate(request, request_id=str(job_id)):
                yield self.inbox.channel.seal_item(item)
        except ProtocolError as error:
            log.info("job %s failed: %s", job_id, error.code.value)
            yield {"error": str(error)}
        except Exception as error:
            # A bug must fail the job, not reach the SDK, which would put the
            # exception's message (possibly request content) in the job's error.
            log.error("job %s failed: internal error %s", job_id, _where(error))
            yield {"error": f"{ErrorCode.ENGINE_ERROR}: internal error in the worker"}

    async def generate(self, request: Request, request_id: str) -> AsyncIterator[StreamItem]:
        """Plaintext deltas of one request; the last carries finish_reason and usage."""
        engine_input = await self._render(request)
        params = self._sampling_params(request)
        self._check_fits_context(engine_input, params)
        completion_tokens = 0
        finished = stopped = False

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
                async for output in outputs:
                    delta = output.outputs[0]
                    completion_tokens += len(delta.token_ids)
                    if output.finished:
                        finished = True
                        usage = Usage(len(output.prompt_token_ids), completion_tokens)
                        yield StreamItem(delta.text, delta.finish_reason, usage)
                    elif delta.text:
                        yield StreamItem(delta.text)
        except (VLLMClientError, ValueError) as error:
            log.info("engine refused request %s: %s", request_id, type(error).__name__)
            raise ProtocolError(ErrorCode.INVALID_INPUT, "the engine refused the request") from None
        except Exception as error:
            log.error("generation failed for %s: %s", request_id, type(error).__name__)
            raise ProtocolError(ErrorCode.ENGINE_ERROR, "generation failed") from None
        finally:
            job.remove_done_callback(stop_early)
            stop_early()

    def _abort_soon(self, request_id: str) -> None:
        task = asyncio.ensure_future(self._abort(request_id))
        self._aborting.add(task)  # a reference, until it is done
        task.add_done_callback(self._aborting.discard)

    async def _abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)
        log.info(
            "job %s stopped early: request aborted, %d unfinished in the engine",
            request_id,
            self.engine.get_num_unfinished_requests(),
        )

    async def _render(self, request: Request) -> dict:
        renderer = self.engine.renderer
        try:
            if request.prompt is not None:
                prompt = parse_model_prompt(self.engine.model_config, request.prompt)
                (engine_input,) = await renderer.render_cmpl_async([prompt])
            else:
                messages = [message.model_dump() for message in request.messages]
                _, (engine_input,) = await renderer.render_chat_async(
                    [messages], self.chat_params, self.chat_tokenize
                )
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
            return SamplingParams(**kwargs, output_kind=RequestOutputKind.DELTA)
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

    worker = Worker(engine, config.inbox())
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
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
