"""Start-up: from a checked configuration to a running engine, timed.

Rules:
- Everything that can be checked without loading a model is checked first
  (ENGINE_ARGS, the parser names, the LoRA limits), so a bad variable stops
  the worker in seconds, not after a download; then LORA_MODULES' adapters
  are found (or downloaded), then the model.
- Each entry of MODELS is tried in turn; the first whose engine starts is
  served, and if none does the error names every model and its reason.
- The engine never logs requests; its structured-output backend is chosen
  here (see `DEFAULT_STRUCTURED_OUTPUTS`).
- vLLM's compile cache goes where the next worker of the endpoint finds it
  (`place_compile_cache`), in a folder of its own per vLLM version and
  device, so that a cache from another version or GPU is never read; a
  volume that cannot take it is passed over.
- Each phase of the boot is logged as it ends (`boot: ...`), what vLLM's own
  processes report included, and the boot ends with one `worker ready {...}`
  line (`BootReport`).
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch._inductor.runtime.cache_dir_utils import default_cache_dir
from vllm import AsyncEngineArgs
from vllm.config import LoRAConfig, StructuredOutputsConfig
from vllm.engine.async_llm_engine import AsyncLLMEngine

from encrypted_vllm.worker import models as utils
from encrypted_vllm.worker.adapters import Adapters
from encrypted_vllm.worker.config import ConfigError, WorkerConfig
from encrypted_vllm.worker.generation import check_parser_names

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
    "enable_lora",
    "max_lora_rank",
    "max_loras",
    "limit_mm_per_prompt",
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
    limits = {"max_lora_rank": config.max_lora_rank, "max_loras": config.max_loras}
    lora = {name: value for name, value in limits.items() if value is not None}
    try:
        LoRAConfig(**lora)  # vLLM's own checks (a rank it has kernels for), before any download
    except (TypeError, ValueError):
        problems.append("MAX_LORA_RANK or MAX_LORAS: not a value vLLM takes (ranks: 8, 16, 32...)")
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
    if config.lora_modules:
        arguments.update(enable_lora=True, **lora)
    if config.limit_mm_per_prompt is not None:
        arguments["limit_mm_per_prompt"] = config.limit_mm_per_prompt
    return arguments


def visible_gpus() -> int:
    return max(torch.cuda.device_count(), 1)


def resolve_adapters(config: WorkerConfig, report: BootReport | None = None) -> Adapters:
    """LORA_MODULES' adapters, found or downloaded; ConfigError if one
    cannot be (checked before any model is loaded)."""
    report = report or BootReport(time.monotonic())
    engine_arguments(config, "", "")  # a bad variable fails before any download
    started = time.monotonic()
    try:
        adapters = Adapters.resolve(
            config.lora_modules, config.sources, config.max_lora_rank, report.downloaded
        )
    except utils.ModelError as error:
        raise ConfigError(f"LORA_MODULES: {error}") from None
    if adapters:
        report.phase("adapters", started)
    return adapters


class NoModelStarted(Exception):
    """Every model of MODELS failed to resolve or to start; says why, each."""


def start_engine(config: WorkerConfig, report: BootReport | None = None) -> AsyncLLMEngine:
    """Boot the engine on the first model of MODELS that resolves and loads."""
    report = report or BootReport(time.monotonic())
    engine_arguments(config, "", "")  # a bad ENGINE_ARGS fails at once, not per model
    reasons = []
    for ref in config.models:
        try:
            started = time.monotonic()
            model_dir = utils.resolve(ref, config.sources, on_download=report.downloaded)
            report.phase("resolve", started)
            arguments = engine_arguments(config, str(model_dir), ref.name)
            started = time.monotonic()
            engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(**arguments))
            report.phase("engine", started)
        except utils.ModelError as error:
            reasons.append(str(error))
        except Exception as error:  # the engine's own failures are many and varied
            reasons.append(f"{ref}: the engine could not start: {type(error).__name__}: {error}")
        else:
            log.info("serving %s", ref)
            return engine
        log.warning("%s", reasons[-1])
    raise NoModelStarted("no model of MODELS could start:\n  " + "\n  ".join(reasons))


# --- The compile cache ----------------------------------------------------

# On RunPod a network volume, when one is attached, is mounted here and
# outlives the worker; otherwise the path is the container's own disk.
RUNPOD_VOLUME = Path("/runpod-volume")
# A volume with less free space than this is passed over: a compile cache
# takes tens of MB per model, and a write that fails half-way helps nobody.
MIN_FREE_BYTES = 1 << 30


def place_compile_cache(environ: dict[str, str] = os.environ, volume: Path = RUNPOD_VOLUME) -> str:
    """Sets VLLM_CACHE_ROOT, unless set, to a writable folder on the network
    volume (else the container's disk), keyed by vLLM version and device,
    and torch's kernel caches beside it; on the CPU build, turns off vLLM's
    AOT artifacts and Inductor's precompiled header. Returns the folder."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        # vLLM 0.32's CPU build saves AOT artifacts it cannot load back
        # ("'function' object has no attribute 'finalize_loading'"), so each
        # boot compiles again; without them its Inductor cache is reused.
        environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
        # Inductor's C++ precompiled header (about 150 MB, 6 s to build) lives
        # in $TMPDIR, which every new container has empty: build none.
        environ.setdefault("TORCHINDUCTOR_CPP_CACHE_PRECOMPILE_HEADERS", "0")
    folder = environ.get("VLLM_CACHE_ROOT") or str(_cache_folder(volume))
    environ["VLLM_CACHE_ROOT"] = folder
    # Torch writes its default kernel cache ($TMPDIR, lost with the
    # container) into the environment the first time it looks, which vLLM's
    # import does: that value is torch's, not a choice to keep.
    if environ.get("TORCHINDUCTOR_CACHE_DIR") == os.path.abspath(default_cache_dir()):
        del environ["TORCHINDUCTOR_CACHE_DIR"]
    # Torch keeps its own compiled kernels apart from vLLM's cache (vLLM
    # moves Inductor's beside its own only on its GPU path): both go there.
    environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(folder, "inductor"))
    environ.setdefault("TRITON_CACHE_DIR", os.path.join(folder, "triton"))
    return folder


def _cache_folder(volume: Path) -> Path:
    import vllm

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    key = re.sub(r"[^A-Za-z0-9.-]+", "-", f"vllm-{vllm.__version__}-{device}")
    for base in (volume / "vllm-cache", Path.home() / ".cache" / "vllm"):
        if base.parent == volume and not volume.is_dir():
            continue  # no volume attached: never create one on the container's disk
        if _can_hold_a_cache(base / key):
            return base / key
    return Path(os.environ.get("TMPDIR", "/tmp")) / "vllm-cache" / key


def _can_hold_a_cache(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".writable-{os.getpid()}"
        probe.write_bytes(b"x")
        probe.unlink()
        return shutil.disk_usage(folder).free >= MIN_FREE_BYTES
    except OSError:
        return False


# --- The boot's phases ------------------------------------------------------


class BootReport:
    """The phases of one boot: timed here, or read from what vLLM's own
    processes log (they write to this process's stdout and stderr, which
    `watch_vllm` passes through a pipe, line by line, unchanged)."""

    # vLLM 0.32's own log lines, and what they tell.
    VLLM_LINES = {
        "weights": re.compile(r"Loading weights took ([0-9.]+) seconds"),
        "memory_profiling": re.compile(r"Memory profiling takes ([0-9.]+) seconds"),
        "cuda_graphs": re.compile(r"Graph capturing finished in ([0-9.]+) secs"),
        "engine_init": re.compile(
            r"init engine \(profile, create kv cache, warmup model\) took ([0-9.]+) s"
        ),
        "compilation": re.compile(r"\(compilation: ([0-9.]+) s"),
        "kv_cache_tokens": re.compile(r"KV cache size: ([0-9,]+) tokens"),
    }
    # A phase vLLM reports by its start and end lines only (the CPU build's
    # compilation, which runs as the model's warm-up).
    SPANS = {"warmup": (re.compile(r"Warming up model"), re.compile(r"Warming up done"))}
    CACHE_LINES = {
        "hit": re.compile(r"Directly load (the compiled graph|AOT compilation)"),
        "miss": re.compile(r"Compiling a graph for compile range|Compiling model again"),
    }

    def __init__(self, process_started: float):
        self.process_started = process_started  # time.monotonic() at process start
        self.fields: dict[str, Any] = {}
        self._span_starts: dict[str, float] = {}

    def phase(self, name: str, started: float) -> None:
        seconds = time.monotonic() - started
        self.fields[f"{name}_s"] = round(seconds, 2)
        log.info("boot: %s took %.1f s", name, seconds)

    def downloaded(self, size: int) -> None:
        self.fields["download_bytes"] = self.fields.get("download_bytes", 0) + size

    def read(self, line: str) -> str | None:
        """One line of vLLM's output: records the phase it reports, if any,
        and returns a `boot:` line saying so."""
        said = None
        for name, pattern in self.VLLM_LINES.items():
            match = pattern.search(line)
            if match:
                value = match.group(1).replace(",", "")
                if name == "kv_cache_tokens":
                    self.fields[name] = int(value)
                    said = f"the KV cache holds {int(value):,} tokens"
                else:
                    self.fields[f"{name}_s"] = float(value)
                    said = f"{name.replace('_', ' ')} took {float(value):.1f} s (vLLM)"
        for name, (start, end) in self.SPANS.items():
            if start.search(line):
                self._span_starts[name] = time.monotonic()
            elif end.search(line) and name in self._span_starts:
                seconds = time.monotonic() - self._span_starts.pop(name)
                self.fields[f"{name}_s"] = round(seconds, 2)
                said = f"{name} (compilation) took {seconds:.1f} s"
        for verdict, pattern in self.CACHE_LINES.items():
            if pattern.search(line) and self.fields.get("compile_cache") != "miss":
                self.fields["compile_cache"] = verdict
        return said

    def watch_vllm(self) -> None:
        """Routes this process's stdout and stderr, and so those of the
        engine processes it starts, through a pipe read by a thread that
        writes each line on unchanged and reads the phases from it, until
        `release_console` (at exit, whatever the path)."""
        read_end, write_end = os.pipe()
        self._console = os.dup(1)
        for fd in (1, 2):
            os.dup2(write_end, fd)
        os.close(write_end)

        def forward() -> None:
            with open(read_end, "rb", buffering=0) as pipe:
                for line in iter(pipe.readline, b""):
                    os.write(self._console, line)
                    try:
                        said = self.read(line.decode(errors="replace"))
                    except Exception:  # never stop forwarding: the worker would block
                        said = None
                    if said:
                        # Straight to the console: through the pipe, this
                        # thread could block on the pipe it alone drains.
                        os.write(self._console, f"INFO worker: boot: {said}\n".encode())

        self._forwarder = threading.Thread(target=forward, name="vllm-log", daemon=True)
        self._forwarder.start()
        atexit.register(self.release_console)

    def release_console(self) -> None:
        """Gives the console back, so that the pipe ends once the engine's
        processes are gone, and lets the thread pass on the last lines (an
        error, why the worker stopped) before the interpreter kills it."""
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        for fd in (1, 2):
            os.dup2(self._console, fd)
        self._forwarder.join(timeout=2.0)

    def ready_line(self) -> str:
        """`worker ready {...}`: every phase, and the total from process start."""
        self.fields["total_s"] = round(time.monotonic() - self.process_started, 2)
        return f"worker ready {json.dumps(self.fields)}"
