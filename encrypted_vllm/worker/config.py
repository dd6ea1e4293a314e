"""The worker's configuration: read once from the environment, validated whole.

Rules:
- `WorkerConfig.from_env()` is the only place that reads the worker's
  variables; everything else receives the typed object.
- Every problem is reported at once, one line per variable, and no line ever
  repeats a value: a misplaced key must not end up in a log.
- This module does not import vLLM, so checking configuration is instant.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from encrypted_vllm.wire import channel
from encrypted_vllm.worker.adapters import AdapterSpec, parse_lora_modules
from encrypted_vllm.worker.models import ModelRef, ModelSources, parse_models

# Chosen so that one worker keeps enough sequences in flight for continuous
# batching to fill a GPU (decode throughput flattens out around 32-64
# sequences for 7-8B models), while more jobs stay in RunPod's queue where its
# autoscaler sees them and another worker can take them.
DEFAULT_MAX_CONCURRENCY = 64
# Long enough for a job queued while a worker cold-starts (model download
# included) to still be accepted; a client can resend an expired job.
DEFAULT_ENCRYPTION_TTL_S = 900
# Stream items a second, all jobs together; past this rate a stream's items
# carry several tokens. An item costs about 10 us to encrypt and 100-140 us
# of the runpod SDK's CPU to post to RunPod (bench/channel.py), so 500 items
# a second cost about 6% of a core. Our client reads /stream four times a
# second: at the default MAX_CONCURRENCY each stream still gets two items a
# read (one per 128 ms), and a lone stream an item every 2 ms, each token as
# it comes.
DEFAULT_MAX_ITEMS_PER_S = 500.0
# Room for a prompt that fills a 128k-token context, padded and encrypted.
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024
# How long a stopping worker (SIGTERM) lets its jobs in hand run before it
# ends them with WORKER_STOPPED. RunPod documents no window between SIGTERM
# and SIGKILL; Docker's default is 10 s, and the engine's shutdown and the
# process's exit take about 2 s of it.
DEFAULT_STOP_GRACE_S = 6.0
# Under constant-rate streaming a stream's item count is rounded up to a
# multiple of this: its length then tells an observer only which band of 16
# items (at 50 ms an item, 0.8 s) it fell in.
DEFAULT_STREAM_ITEMS_QUANTUM = 16
# Under constant-rate streaming every item is exactly one bucket, which must
# hold the final item's finish_reason and usage beside some text.
MIN_SHAPED_BUCKET = 256


class ConfigError(ValueError):
    """The environment does not describe a worker that can start."""


class WorkerConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    models: tuple[ModelRef, ...] = Field(alias="MODELS", min_length=1)
    encryption_key: str = Field(alias="ENCRYPTION_KEY", repr=False)
    gpu_memory_utilization: float = Field(0.95, alias="GPU_MEMORY_UTILIZATION", gt=0, le=1)
    max_model_len: int | None = Field(None, alias="MAX_MODEL_LEN", ge=1)
    dtype: str = Field("auto", alias="DTYPE", min_length=1)
    tensor_parallel_size: int | None = Field(None, alias="TENSOR_PARALLEL_SIZE", ge=1)
    engine_args: dict[str, Any] = Field(default_factory=dict, alias="ENGINE_ARGS")
    max_concurrency: int = Field(DEFAULT_MAX_CONCURRENCY, alias="MAX_CONCURRENCY", ge=1)
    encryption_ttl_s: int = Field(DEFAULT_ENCRYPTION_TTL_S, alias="ENCRYPTION_TTL", ge=1)
    max_request_bytes: int = Field(DEFAULT_MAX_REQUEST_BYTES, alias="MAX_REQUEST_BYTES", ge=1024)
    max_items_per_s: float = Field(
        DEFAULT_MAX_ITEMS_PER_S, alias="MAX_ITEMS_PER_SECOND", ge=0, allow_inf_nan=False
    )
    padding_bucket: int = Field(channel.ITEM_BUCKET_BYTES, alias="PADDING_BUCKET", ge=0)
    # Constant-rate streaming (off at 0): one item of one bucket per interval.
    stream_interval_ms: int = Field(0, alias="STREAM_INTERVAL_MS", ge=0, le=60_000)
    stream_items_quantum: int = Field(
        DEFAULT_STREAM_ITEMS_QUANTUM, alias="STREAM_ITEMS_QUANTUM", ge=1, le=4096
    )
    stop_grace_s: float = Field(
        DEFAULT_STOP_GRACE_S, alias="STOP_GRACE_S", ge=0, le=3600, allow_inf_nan=False
    )
    # vLLM's parser names; checked against vLLM's registries at start.
    tool_call_parser: str | None = Field(None, alias="TOOL_CALL_PARSER")
    reasoning_parser: str | None = Field(None, alias="REASONING_PARSER")
    # LoRA adapters (see `adapters`), and vLLM's limits of them.
    lora_modules: tuple[AdapterSpec, ...] = Field((), alias="LORA_MODULES")
    max_lora_rank: int | None = Field(None, alias="MAX_LORA_RANK", ge=1)
    max_loras: int | None = Field(None, alias="MAX_LORAS", ge=1)
    # Images a prompt may hold (vLLM's limit_mm_per_prompt); unset: vLLM's default.
    limit_mm_per_prompt: dict[Literal["image"], int] | None = Field(
        None, alias="LIMIT_MM_PER_PROMPT"
    )
    # Whether images may be http(s) URLs, which the worker then fetches: a
    # request to a third party that sees the URL and the worker's address.
    allow_image_urls: bool = Field(False, alias="ALLOW_IMAGE_URLS")
    # The runpod SDK's own variable: at DEBUG it logs every job's input and
    # output (ciphertexts), so only quieter levels are accepted.
    runpod_log_level: Literal["INFO", "WARN", "ERROR"] = Field("INFO", alias="RUNPOD_LOG_LEVEL")
    # CACHED_MODELS_DIR, BAKED_MODELS_DIR and the Hugging Face variables.
    sources: ModelSources

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        models = parse_models(value)
        problems = [problem for ref in models if (problem := ref.problem())]
        if problems:
            # MODELS names models, not secrets: the entries are worth showing.
            raise ValueError("; ".join(problems))
        return models

    @field_validator("lora_modules", mode="before")
    @classmethod
    def _parse_lora_modules(cls, value: Any) -> Any:
        return parse_lora_modules(value) if isinstance(value, str) else value

    @field_validator("limit_mm_per_prompt", mode="before")
    @classmethod
    def _parse_limits(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        text = value.strip()
        if text.startswith("{"):
            try:
                limits = json.loads(text)
            except json.JSONDecodeError:
                raise ValueError('must be image=N, or JSON such as {"image": N}') from None
        else:
            pairs = [entry.partition("=") for entry in text.split(",") if entry.strip()]
            if not all(equals and count.strip().isdigit() for _, equals, count in pairs):
                raise ValueError('must be image=N, or JSON such as {"image": N}')
            limits = {name.strip(): int(count) for name, _, count in pairs}
        if not isinstance(limits, dict) or set(limits) - {"image"}:
            raise ValueError("only image limits are served by this worker (image=N)")
        if not all(type(count) is int and count >= 0 for count in limits.values()):
            raise ValueError("image=N takes a count of 0 or more")
        return limits

    @field_validator("encryption_key")
    @classmethod
    def _check_key(cls, value: str) -> str:
        channel.load_keys(value)  # its ValueError never repeats the key
        return value

    @field_validator("padding_bucket")
    @classmethod
    def _whole_blocks(cls, value: int) -> int:
        if value % 16:
            raise ValueError("must be a multiple of 16 (AES blocks), or 0 to turn padding off")
        return value

    @field_validator("engine_args", mode="before")
    @classmethod
    def _parse_engine_args(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise ValueError('must be a JSON object, e.g. {"enforce_eager": true}') from None
        if not isinstance(value, dict):
            raise ValueError('must be a JSON object, e.g. {"enforce_eager": true}')
        return value

    @field_validator("runpod_log_level", mode="before")
    @classmethod
    def _quiet_sdk(cls, value: Any) -> Any:
        if isinstance(value, str) and value.upper() not in ("INFO", "WARN", "ERROR"):
            raise ValueError(
                "must be INFO, WARN or ERROR: at more verbose levels the runpod SDK "
                "logs every job's input and output"
            )
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _adapter_keys_exist(self) -> WorkerConfig:
        ids = {key.id for key in channel.load_keys(self.encryption_key)}
        for spec in self.lora_modules:
            if spec.keys and not spec.keys <= ids:
                raise ValueError(
                    f"LORA_MODULES: adapter {spec.name!r} names a key id that is not one of "
                    "ENCRYPTION_KEY's (encrypted-vllm --key-id prints them)"
                )
        return self

    @model_validator(mode="after")
    def _shaping_fits(self) -> WorkerConfig:
        if self.stream_interval_ms and self.padding_bucket < MIN_SHAPED_BUCKET:
            raise ValueError(
                f"STREAM_INTERVAL_MS: constant-rate streaming needs PADDING_BUCKET of at "
                f"least {MIN_SHAPED_BUCKET}, every item being exactly one bucket"
            )
        return self

    def inbox(self) -> channel.Inbox:
        """The worker's channel, with this configuration's limits."""
        keys = channel.Channel(self.encryption_key, item_bucket=self.padding_bucket)
        return channel.Inbox(
            keys, ttl_s=self.encryption_ttl_s, max_request_bytes=self.max_request_bytes
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> WorkerConfig:
        environ = os.environ if environ is None else environ
        names = [field.alias for field in cls.model_fields.values() if field.alias]
        # An empty variable counts as unset, as RunPod's console leaves them.
        values = {name: environ[name] for name in names if environ.get(name, "").strip()}
        if "ENCRYPTION_KEY" not in values:
            # Let the key's own check explain what a valid key looks like.
            values["ENCRYPTION_KEY"] = ""
        problems = []
        try:
            values["sources"] = ModelSources.from_env(environ)
        except ValidationError as error:
            problems += _describe(error)
        try:
            config = cls.model_validate(values)
        except ValidationError as error:
            problems += [line for line in _describe(error) if not line.startswith("sources")]
        if problems:
            raise ConfigError("\n  ".join(["invalid worker configuration:", *problems]))
        return config


def _describe(error: ValidationError) -> list[str]:
    """One line per problem, naming the variable and never its value."""
    lines = []
    for detail in error.errors(include_input=False, include_url=False):
        message = detail["msg"].removeprefix("Value error, ")
        if not detail["loc"]:  # a rule across variables: it names them itself
            lines.append(message)
            continue
        name = detail["loc"][0]
        if detail["type"] == "missing":
            message = f"{name} is required"
        elif not message.startswith(str(name)):
            message = f"{name}: {message}"
        lines.append(message)
    return lines
