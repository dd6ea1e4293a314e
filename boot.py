"""Start-up: from a checked configuration to a running engine.

Rules:
- Everything that can be checked without loading a model is checked first
  (ENGINE_ARGS, the parser names), so a bad variable stops the worker in
  seconds, not after a download.
- Each entry of MODELS is tried in turn; the first whose engine starts is
  served, and if none does the error names every model and its reason.
- The engine never logs requests; its structured-output backend is chosen
  here (see `structured_outputs_config`).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from vllm import AsyncEngineArgs
from vllm.config import StructuredOutputsConfig
from vllm.engine.async_llm_engine import AsyncLLMEngine

import utils
from config import ConfigError, WorkerConfig
from generation import check_parser_names

log = logging.getLogger("worker")

# Engine arguments that have their own variable, or that would log prompts.
_RESERVED_ENGINE_ARGS = {
    "model",
    "gpu_memory_utilization",
    "max_model_len",
    "dtype",
    "tensor_parallel_size",
    "reasoning_parser",
    "enable_log_requests",
}
# xgrammar with compact JSON: under vLLM's default JSON grammar, which lets
# whitespace in anywhere, small models (and the tests' random one) loop on
# whitespace until max_tokens and never close the object; compact JSON is
# also what OpenAI's API returns. xgrammar compiles JSON schemas, regexes,
# choices, EBNF and Lark grammars, on GPUs and CPUs alike.
DEFAULT_STRUCTURED_OUTPUTS = {"backend": "xgrammar", "disable_any_whitespace": True}


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
    structured_outputs = None
    try:
        # An object, not a dict: vLLM 0.32 fails on a dict beside reasoning_parser.
        structured_outputs = StructuredOutputsConfig(
            **{**DEFAULT_STRUCTURED_OUTPUTS, **extra.get("structured_outputs_config", {})}
        )
    except (TypeError, ValueError):
        problems.append("ENGINE_ARGS: structured_outputs_config is not a valid vLLM one")
    problems += check_parser_names(config.tool_call_parser, config.reasoning_parser)
    if problems:
        raise ConfigError("invalid worker configuration:\n  " + "\n  ".join(problems))
    arguments = {
        **extra,
        "model": model_dir,
        "served_model_name": extra.get("served_model_name", model_name),
        "gpu_memory_utilization": config.gpu_memory_utilization,
        "max_model_len": config.max_model_len,
        "dtype": config.dtype,
        "tensor_parallel_size": config.tensor_parallel_size or visible_gpus(),
        "structured_outputs_config": structured_outputs,
        "enable_log_requests": False,
    }
    if config.reasoning_parser:
        # The backend then applies a constraint only once the reasoning ends.
        arguments["reasoning_parser"] = config.reasoning_parser
    return arguments


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
