"""Wire protocol v1: the one module that both the worker and the client import.

A job's input is `{"ciphertext": <Fernet token>}` whose plaintext is a JSON
`Request`; each streamed output item is `{"ciphertext": <Fernet token>}` whose
plaintext is a JSON `StreamItem`. README.md specifies the same thing in prose,
for clients in other languages.

Rules:
- Nothing crosses RunPod in the clear: every job input and every output item
  is one Fernet token, its plaintext padded so that the token's length tells
  only a size bucket.
- One schema validates requests on both sides: the client, to give a detailed
  message before anything is sent; the worker, to refuse what a client should
  not have sent.
- A refused job is a `ProtocolError`: a stable `ErrorCode` and a reason taken
  from a fixed set of sentences. Reasons may name a limit, never request
  content, not even a field name the request used.
"""

from __future__ import annotations

import enum
import hashlib
import heapq
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, NamedTuple

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

VERSION = 1

# Limits of the request schema, checked by the client and again by the worker.
MAX_MESSAGES = 1024
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 64

# Plaintext padding: an output item fills whole buckets of this many bytes (a
# multiple of AES's 16-byte block, so the token's length depends on the
# bucket count alone); a request fills the next power of two from 1 KiB.
ITEM_BUCKET_BYTES = 256
REQUEST_MIN_BYTES = 1024


class ErrorCode(enum.StrEnum):
    """The first word of every failed job's error string."""

    DECRYPTION_FAILED = "DECRYPTION_FAILED"
    TOKEN_EXPIRED = "TOKEN_EXPIRED"
    REPLAYED = "REPLAYED"
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
_INT64 = 2**63 - 1
_INT32 = 2**31 - 1
TokenId = Annotated[int, Field(ge=0, le=_INT32)]


def _limit(name: str, value: int, limit: int) -> None:
    """A schema limit, reported as its own error type so that the worker's
    refusal can name the limit (and nothing else)."""
    if value > limit:
        raise PydanticCustomError("protocol_limit", f"request exceeds {name}={limit}")


class SamplingParams(BaseModel):
    """The vLLM `SamplingParams` fields a request may set; omitted ones take
    the model's defaults (its generation_config.json), then vLLM's.

    `max_tokens` omitted means: until the model stops or its context is full.
    Fields that would change the shape of the stream (n, logprobs, ...) are
    not offered; sending one is an unknown field, like any other.
    """

    model_config = _STRICT

    max_tokens: int | None = Field(None, ge=1, le=_INT64)
    min_tokens: int | None = Field(None, ge=0, le=_INT64)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, le=_INT32)
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=0, le=_INT64)
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    include_stop_str_in_output: bool | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=100)
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None

    @model_validator(mode="after")
    def _within_limits(self) -> SamplingParams:
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        _limit("MAX_STOP_STRINGS", len(stops), MAX_STOP_STRINGS)
        _limit("MAX_STOP_CHARS", max(map(len, stops), default=0), MAX_STOP_CHARS)
        _limit("MAX_STOP_TOKEN_IDS", len(self.stop_token_ids or ()), MAX_STOP_TOKEN_IDS)
        return self

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
        _limit("MAX_MESSAGES", len(self.messages or ()), MAX_MESSAGES)
        return self


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


# The other pydantic error types, mapped to reasons that name nothing.
_VALIDATION_REASONS = {
    "json_invalid": "plaintext is not UTF-8 JSON",
    "model_type": "plaintext is not a JSON object",
    "extra_forbidden": "request has an unknown field",
    "missing": "request lacks a required field",
    "value_error": "request needs exactly one of prompt or messages",
}


def _refusal(error: ValidationError) -> ProtocolError:
    details = error.errors(include_input=False, include_url=False)
    for detail in details:
        if detail["type"] == "protocol_limit":
            return ProtocolError(ErrorCode.INVALID_INPUT, detail["msg"])
    kinds = [detail["type"] for detail in details]
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


# --- Keys, padding and the channel ----------------------------------------


def generate_key() -> str:
    """A new random key for ENCRYPTION_KEY."""
    return Fernet.generate_key().decode()


KEY_HELP = (
    "ENCRYPTION_KEY must be a Fernet key: url-safe base64 of 32 random bytes "
    "(44 characters), or several such keys separated by commas while rotating. "
    "Make one with: python3 client.py --generate-key"
)


def load_keys(value: str | None) -> MultiFernet:
    """ENCRYPTION_KEY as a cipher: every key decrypts, the first encrypts.
    ValueError says what a valid key looks like and never repeats the value."""
    keys = [part.strip() for part in (value or "").split(",")]
    if not any(keys):
        raise ValueError(f"ENCRYPTION_KEY is not set. {KEY_HELP}")
    fernets = []
    for position, key in enumerate(keys, start=1):
        try:
            fernets.append(Fernet(key))
        except (ValueError, TypeError):
            where = f"key {position} of {len(keys)}" if len(keys) > 1 else "the key"
            raise ValueError(f"ENCRYPTION_KEY: {where} is malformed. {KEY_HELP}") from None
    return MultiFernet(fernets)


def pad_item(plaintext: bytes, bucket: int) -> bytes:
    """Trailing spaces (still valid JSON) up to whole buckets; 0 pads nothing."""
    if bucket <= 0:
        return plaintext
    return plaintext.ljust(-(-len(plaintext) // bucket) * bucket)


def pad_request(plaintext: bytes) -> bytes:
    """Trailing spaces up to the next power of two from REQUEST_MIN_BYTES."""
    size = max(REQUEST_MIN_BYTES, 1 << (len(plaintext) - 1).bit_length())
    return plaintext.ljust(size)


class Channel:
    """Fernet encryption of requests (client to worker) and stream items
    (worker to client) under ENCRYPTION_KEY."""

    def __init__(self, keys: str, *, item_bucket: int = ITEM_BUCKET_BYTES):
        self._fernet = load_keys(keys)
        self._item_bucket = item_bucket

    # Client side.

    def seal_request(self, request: Request) -> dict[str, str]:
        plaintext = pad_request(request.model_dump_json(exclude_defaults=True).encode())
        return {"ciphertext": self._fernet.encrypt(plaintext).decode()}

    def open_item(self, output: Any) -> StreamItem:
        """Decrypt one streamed output item; ProtocolError if it is not a
        valid item under these keys (wrong key, or tampered with)."""
        token = output.get("ciphertext") if isinstance(output, dict) else None
        if not isinstance(token, str):
            raise ProtocolError(ErrorCode.DECRYPTION_FAILED, "output item has no ciphertext")
        try:
            plaintext = self._fernet.decrypt(token)
        except (InvalidToken, ValueError):  # ValueError: not even ASCII
            raise ProtocolError(
                ErrorCode.DECRYPTION_FAILED, "output item is not valid under this key"
            ) from None
        try:
            return StreamItem.from_json(plaintext)
        except (ValueError, KeyError, TypeError):
            raise ProtocolError(
                ErrorCode.DECRYPTION_FAILED, "output item is not a wire protocol v1 item"
            ) from None

    # Worker side.

    def seal_item(self, item: StreamItem) -> dict[str, str]:
        plaintext = pad_item(item.to_json(), self._item_bucket)
        return {"ciphertext": self._fernet.encrypt(plaintext).decode()}

    def decrypt_token(self, token: str) -> tuple[bytes, int]:
        """The plaintext and its issue time; ProtocolError if not authentic."""
        try:
            return self._fernet.decrypt(token), self._fernet.extract_timestamp(token)
        except (InvalidToken, ValueError):  # ValueError: not even ASCII
            raise ProtocolError(
                ErrorCode.DECRYPTION_FAILED, "ciphertext is not a valid token for this worker's key"
            ) from None


class ReplayGuard:
    """Remembers each token it admits until the token expires anyway.

    Memory is bounded: when `capacity` tokens are remembered, the one issued
    earliest is forgotten and every token issued no later than it is refused
    from then on, so a forgotten token can still never be replayed. Under
    that much traffic the effective age limit shrinks; it never fails open.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._seen: set[bytes] = set()
        self._by_issue_time: list[tuple[int, bytes]] = []
        self._floor = -1  # tokens issued at or before this are refused

    def __len__(self) -> int:
        return len(self._seen)

    def admit(self, token_id: bytes, issued_at: int, expired_before: float) -> ErrorCode | None:
        """Record a token; the code that refuses it, or None when it is new."""
        while self._by_issue_time and self._by_issue_time[0][0] < expired_before:
            self._seen.discard(heapq.heappop(self._by_issue_time)[1])
        if token_id in self._seen:
            return ErrorCode.REPLAYED
        if issued_at <= self._floor:
            return ErrorCode.TOKEN_EXPIRED
        if len(self._seen) >= self.capacity:
            oldest, forgotten = heapq.heappop(self._by_issue_time)
            self._seen.discard(forgotten)
            self._floor = max(self._floor, oldest)
            if issued_at <= self._floor:
                return ErrorCode.TOKEN_EXPIRED
        self._seen.add(token_id)
        heapq.heappush(self._by_issue_time, (issued_at, token_id))
        return None


# Fernet's own allowance for a client clock running ahead of the worker's.
CLOCK_SKEW_S = 60
REPLAY_CAPACITY = 65536


class Admission(NamedTuple):
    request: Request
    issued_at: int  # when the client encrypted it (Fernet's timestamp, in seconds)


class Inbox:
    """The worker's side of the channel: admits a job's request once, while
    fresh, within the size limit, or refuses it with a ProtocolError."""

    def __init__(
        self,
        channel: Channel,
        *,
        ttl_s: float,
        max_request_bytes: int,
        replay_capacity: int = REPLAY_CAPACITY,
    ):
        self.channel = channel
        self.ttl_s = ttl_s
        self.max_request_bytes = max_request_bytes
        self._replays = ReplayGuard(replay_capacity)

    def admit(self, job_input: Any, now: float | None = None) -> Admission:
        token = self._token_of(job_input)
        plaintext, issued_at = self.channel.decrypt_token(token)
        now = time.time() if now is None else now
        if issued_at < now - self.ttl_s:
            raise ProtocolError(
                ErrorCode.TOKEN_EXPIRED, f"token is older than ENCRYPTION_TTL={self.ttl_s:g}s"
            )
        if issued_at > now + CLOCK_SKEW_S:
            raise ProtocolError(
                ErrorCode.TOKEN_EXPIRED,
                f"token is issued over {CLOCK_SKEW_S}s ahead of the worker: check the clocks",
            )
        token_id = hashlib.sha256(token.encode()).digest()[:16]
        refused = self._replays.admit(token_id, issued_at, expired_before=now - self.ttl_s)
        if refused is ErrorCode.REPLAYED:
            raise ProtocolError(refused, "this token was already accepted by this worker")
        if refused is ErrorCode.TOKEN_EXPIRED:
            raise ProtocolError(refused, "token is older than this worker's replay window")
        try:
            return Admission(Request.model_validate_json(plaintext), issued_at)
        except ValidationError as error:
            raise _refusal(error) from None

    def _token_of(self, job_input: Any) -> str:
        if not isinstance(job_input, dict) or set(job_input) != {"ciphertext"}:
            raise ProtocolError(
                ErrorCode.INVALID_INPUT, 'job input must be exactly {"ciphertext": "<token>"}'
            )
        token = job_input["ciphertext"]
        if not isinstance(token, str):
            raise ProtocolError(ErrorCode.INVALID_INPUT, "ciphertext must be a string")
        if len(token) > self.max_request_bytes:
            raise ProtocolError(
                ErrorCode.INVALID_INPUT,
                f"ciphertext exceeds MAX_REQUEST_BYTES={self.max_request_bytes}",
            )
        return token
