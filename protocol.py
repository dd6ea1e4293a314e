"""Wire protocol v1: the one module that both the worker and the client import.

A job's input is `{"ciphertext": <Fernet token>}` whose plaintext is a JSON
`Request`; each streamed output item is `{"ciphertext": <Fernet token>}` whose
plaintext is a JSON `StreamItem`. README.md specifies the same thing in prose,
for clients in other languages.

Rules:
- Nothing crosses RunPod in the clear: every job input and every output item
  is one Fernet token.
- One schema validates requests on both sides: the client, to give a detailed
  message before anything is sent; the worker, to refuse what a client should
  not have sent.
- A refused job is a `ProtocolError`: a stable `ErrorCode` and a reason taken
  from a fixed set of sentences. Reasons never contain request content, not
  even a field name the request used.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

VERSION = 1


class ErrorCode(enum.StrEnum):
    """The first word of every failed job's error string."""

    DECRYPTION_FAILED = "DECRYPTION_FAILED"
    INVALID_INPUT = "INVALID_INPUT"
    ENGINE_ERROR = "ENGINE_ERROR"


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


class SamplingParams(BaseModel):
    """The vLLM `SamplingParams` fields a request may set; omitted ones take
    the model's defaults (its generation_config.json), then vLLM's.

    `max_tokens` omitted means: until the model stops or its context is full.
    Fields that would change the shape of the stream (n, logprobs, ...) are
    not offered; sending one is an unknown field, like any other.
    """

    model_config = _STRICT

    max_tokens: int | None = Field(None, ge=1)
    min_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None

    def to_engine_kwargs(self) -> dict[str, Any]:
        """The fields the request set, as `vllm.SamplingParams` keywords."""
        return self.model_dump(exclude_none=True)


class Message(BaseModel):
    model_config = _STRICT

    role: Literal["system", "user", "assistant"]
    content: str


class Request(BaseModel):
    """A job's plaintext: a `prompt`, or chat `messages` that the worker
    renders with the model's chat template (with the generation prompt)."""

    model_config = _STRICT

    prompt: str | None = None
    messages: list[Message] | None = Field(None, min_length=1)
    sampling_params: SamplingParams = SamplingParams()

    @model_validator(mode="after")
    def _one_input(self) -> Request:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self


# Pydantic error types, mapped to reasons that name no field and echo nothing.
_VALIDATION_REASONS = {
    "json_invalid": "plaintext is not UTF-8 JSON",
    "model_type": "plaintext is not a JSON object",
    "extra_forbidden": "request has an unknown field",
    "missing": "request lacks a required field",
    "value_error": "request needs exactly one of prompt or messages",
}


def _refusal(error: ValidationError) -> ProtocolError:
    kinds = [detail["type"] for detail in error.errors(include_input=False)]
    for kind, reason in _VALIDATION_REASONS.items():
        if kind in kinds:
            return ProtocolError(ErrorCode.INVALID_INPUT, reason)
    if any(kind.endswith("_type") for kind in kinds):
        return ProtocolError(ErrorCode.INVALID_INPUT, "a request field has the wrong type")
    return ProtocolError(ErrorCode.INVALID_INPUT, "a request field has a value it does not allow")


# --- Stream items --------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class StreamItem:
    """One streamed delta; the last one of a job also has finish_reason and usage."""

    text: str
    finish_reason: str | None = None
    usage: Usage | None = None

    def to_json(self) -> bytes:
        body: dict[str, Any] = {"text": self.text}
        if self.finish_reason is not None:
            body["finish_reason"] = self.finish_reason
        if self.usage is not None:
            body["usage"] = {
                "prompt_tokens": self.usage.prompt_tokens,
                "completion_tokens": self.usage.completion_tokens,
            }
        return json.dumps(body, ensure_ascii=False).encode()

    @classmethod
    def from_json(cls, data: bytes) -> StreamItem:
        body = json.loads(data)
        usage = body.get("usage")
        return cls(
            text=body["text"],
            finish_reason=body.get("finish_reason"),
            usage=Usage(**usage) if usage is not None else None,
        )


# --- Keys and the channel ------------------------------------------------


def generate_key() -> str:
    """A new random key for ENCRYPTION_KEY."""
    return Fernet.generate_key().decode()


KEY_HELP = (
    "ENCRYPTION_KEY must be a Fernet key: url-safe base64 of 32 random bytes "
    "(44 characters). Make one with: python3 client.py --generate-key"
)


def load_keys(value: str | None) -> MultiFernet:
    """ENCRYPTION_KEY as a cipher; ValueError says what a valid key looks like
    and never repeats the value it was given."""
    if not value or not value.strip():
        raise ValueError(f"ENCRYPTION_KEY is not set. {KEY_HELP}")
    try:
        return MultiFernet([Fernet(value.strip())])
    except (ValueError, TypeError):
        raise ValueError(f"ENCRYPTION_KEY is malformed. {KEY_HELP}") from None


class Channel:
    """Fernet encryption of requests (client to worker) and stream items
    (worker to client), under one shared key."""

    def __init__(self, keys: str):
        self._fernet = load_keys(keys)

    # Client side.

    def seal_request(self, request: Request) -> dict[str, str]:
        plaintext = request.model_dump_json(exclude_defaults=True).encode()
        return {"ciphertext": self._fernet.encrypt(plaintext).decode()}

    def open_item(self, output: Any) -> StreamItem:
        """Decrypt one streamed output item; ProtocolError if it is not a
        valid item under this key (wrong key, or tampered with)."""
        token = output.get("ciphertext") if isinstance(output, dict) else None
        if not isinstance(token, str):
            raise ProtocolError(ErrorCode.DECRYPTION_FAILED, "output item has no ciphertext")
        try:
            return StreamItem.from_json(self._fernet.decrypt(token))
        except InvalidToken:
            raise ProtocolError(
                ErrorCode.DECRYPTION_FAILED, "output item is not valid under this key"
            ) from None
        except (ValueError, KeyError, TypeError):
            raise ProtocolError(
                ErrorCode.DECRYPTION_FAILED, "output item is not a wire protocol v1 item"
            ) from None

    # Worker side.

    def open_request(self, job_input: Any) -> Request:
        """Decrypt and validate a job's input; ProtocolError otherwise."""
        if not isinstance(job_input, dict) or set(job_input) != {"ciphertext"}:
            raise ProtocolError(
                ErrorCode.INVALID_INPUT, 'job input must be exactly {"ciphertext": "<token>"}'
            )
        token = job_input["ciphertext"]
        if not isinstance(token, str):
            raise ProtocolError(ErrorCode.INVALID_INPUT, "ciphertext must be a string")
        try:
            plaintext = self._fernet.decrypt(token)
        except InvalidToken:
            raise ProtocolError(
                ErrorCode.DECRYPTION_FAILED, "ciphertext is not a valid token for this worker's key"
            ) from None
        try:
            return Request.model_validate_json(plaintext)
        except ValidationError as error:
            raise _refusal(error) from None

    def seal_item(self, item: StreamItem) -> dict[str, str]:
        return {"ciphertext": self._fernet.encrypt(item.to_json()).decode()}


def validate_request(
    prompt: str | None = None,
    messages: Sequence[dict[str, str]] | None = None,
    sampling_params: dict[str, Any] | None = None,
) -> Request:
    """Build a Request, raising pydantic's detailed ValidationError locally."""
    return Request.model_validate(
        {
            "prompt": prompt,
            "messages": list(messages) if messages is not None else None,
            "sampling_params": sampling_params or {},
        }
    )
