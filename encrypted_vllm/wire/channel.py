"""The encrypted channel: Fernet tokens for requests and stream items, the
padding that hides their lengths, and the worker's admission of a job.

Rules:
- Nothing crosses RunPod in the clear: every job input and every output item
  is one Fernet token, its plaintext padded so that the token's length tells
  only a size bucket.
- A client seals under the first key of its ENCRYPTION_KEY and reads answers
  under any of them. A worker opens a request under any of its keys and seals
  that job's answer under the very key that opened it, so that clients with
  different keys (tenants) never read each other's answers, and removing a
  key cuts its clients off.
- A key is named in logs only by its fingerprint (`Key.id`), which reveals
  nothing about the key.
- A token is admitted once, while fresh, within the size limit; anything
  else is a `ProtocolError` with a fixed reason.
- Every item of an answer names its request (`request_binding` of the
  request's token) and its place; requests under one key share prefix-cache
  entries with each other only (`Key.cache_salt`), so that no tenant can
  time another's prompts.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import hmac
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from encrypted_vllm.wire.protocol import (
    ErrorCode,
    ProtocolError,
    Request,
    StreamItem,
    parse_request,
)

# Plaintext padding: an output item fills whole buckets of this many bytes (a
# multiple of AES's 16-byte block, so the token's length depends on the
# bucket count alone); a request fills the next power of two from 1 KiB.
ITEM_BUCKET_BYTES = 256
REQUEST_MIN_BYTES = 1024

KEY_HELP = (
    "ENCRYPTION_KEY must be a Fernet key: url-safe base64 of 32 random bytes "
    "(44 characters), or several such keys separated by commas (one per client, "
    "or while rotating). Make one with: encrypted-vllm --generate-key"
)


REQUEST_BINDING_CHARS = 22  # 16 bytes in unpadded base64url


def request_binding(token: str) -> str:
    """What every item of a request's answer names it by (v1.2): the first
    16 bytes of the SHA-256 of its token, in base64url. The client knows its
    token and the worker the one it opened; an item, sealed under the key,
    cannot be made to name another request by anyone without the key."""
    digest = hashlib.sha256(token.encode()).digest()[:16]
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def generate_key() -> str:
    """A new random key for ENCRYPTION_KEY."""
    return Fernet.generate_key().decode()


class Key:
    """One key of ENCRYPTION_KEY."""

    def __init__(self, text: str):
        self.fernet = Fernet(text)
        # A fingerprint for logs: a hash of the key cannot be turned back
        # into it, and the prefix keeps ids of different keys apart.
        self.id = hashlib.sha256(b"encrypted-vllm-worker key id:" + text.encode()).hexdigest()[:8]
        # The salt of this key's prefix-cache entries: requests under other
        # keys never share them. A keyed hash, so it tells nothing of the key.
        self.cache_salt = hmac.new(
            text.encode(), b"encrypted-vllm-worker prefix cache", hashlib.sha256
        ).hexdigest()[:32]

    def __repr__(self) -> str:
        return f"Key(id={self.id!r})"


def load_keys(value: str | None) -> list[Key]:
    """ENCRYPTION_KEY's keys, in order. ValueError says what a valid key
    looks like and never repeats the value."""
    texts = [part.strip() for part in (value or "").split(",")]
    if not any(texts):
        raise ValueError(f"ENCRYPTION_KEY is not set. {KEY_HELP}")
    keys = []
    for position, text in enumerate(texts, start=1):
        try:
            keys.append(Key(text))
        except (ValueError, TypeError):
            where = f"key {position} of {len(texts)}" if len(texts) > 1 else "the key"
            raise ValueError(f"ENCRYPTION_KEY: {where} is malformed. {KEY_HELP}") from None
    return keys


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
    """Fernet under a list of keys: the first seals, any of them opens."""

    def __init__(self, keys: str | Sequence[Key], *, item_bucket: int = ITEM_BUCKET_BYTES):
        self.keys = load_keys(keys) if isinstance(keys, str) else list(keys)
        self.item_bucket = item_bucket
        self._sealer = self.keys[0].fernet
        self._opener = MultiFernet([key.fernet for key in self.keys])

    @property
    def key_id(self) -> str:
        """The fingerprint of the key this channel seals with."""
        return self.keys[0].id

    def under(self, key: Key) -> Channel:
        """This channel sealing and opening with `key` alone."""
        return Channel([key], item_bucket=self.item_bucket)

    # Client side.

    def seal_request(self, request: Request) -> dict[str, str]:
        plaintext = pad_request(request.model_dump_json(exclude_defaults=True).encode())
        return {"ciphertext": self._sealer.encrypt(plaintext).decode()}

    def open_item(self, output: Any) -> StreamItem:
        """Decrypt one streamed output item; ProtocolError if it is not a
        valid item under these keys (wrong key, or tampered with)."""
        token = output.get("ciphertext") if isinstance(output, dict) else None
        if not isinstance(token, str):
            raise ProtocolError(ErrorCode.DECRYPTION_FAILED, "output item has no ciphertext")
        try:
            plaintext = self._opener.decrypt(token)
        except (InvalidToken, ValueError):  # ValueError: not even ASCII
            raise ProtocolError(
                ErrorCode.DECRYPTION_FAILED, "output item is not valid under this key"
            ) from None
        try:
            return StreamItem.from_json(plaintext)
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ProtocolError(
                ErrorCode.DECRYPTION_FAILED, "output item is not a wire protocol item"
            ) from None

    # Worker side.

    def seal_item(self, item: StreamItem) -> dict[str, str]:
        return self.seal_plaintext(item.to_json())

    def seal_plaintext(self, plaintext: bytes) -> dict[str, str]:
        """An item's JSON, padded and sealed."""
        return {"ciphertext": self._sealer.encrypt(pad_item(plaintext, self.item_bucket)).decode()}

    def open_request(self, token: str) -> tuple[bytes, int, Key]:
        """The plaintext, its issue time and the key that opened it;
        ProtocolError if no key does."""
        for key in self.keys:
            try:
                plaintext = key.fernet.decrypt(token)
            except (InvalidToken, ValueError):  # ValueError: not even ASCII
                continue
            return plaintext, key.fernet.extract_timestamp(token), key
        raise ProtocolError(
            ErrorCode.DECRYPTION_FAILED, "ciphertext is not a valid token for this worker's key"
        )


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
    issued_at: int  # when the client encrypted it (Fernet's timestamp, whole seconds)
    channel: Channel  # seals this job's answer, under the key that opened it
    binding: str  # what each item of the answer names its request by
    cache_salt: str  # the prefix-cache salt of the key that opened it


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
        self._by_key = {key.id: channel.under(key) for key in channel.keys}

    def admit(self, job_input: Any, now: float | None = None) -> Admission:
        token = self._token_of(job_input)
        plaintext, issued_at, key = self.channel.open_request(token)
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
        return Admission(
            parse_request(plaintext),
            issued_at,
            self._by_key[key.id],
            request_binding(token),
            key.cache_salt,
        )

    def _token_of(self, job_input: Any) -> str:
        if isinstance(job_input, dict) and (
            "openai_route" in job_input or "openai_input" in job_input
        ):
            # RunPod's /openai/v1 route forwards plaintext; it is never read.
            raise ProtocolError(
                ErrorCode.INVALID_INPUT,
                "RunPod's OpenAI route sends plaintext, which this worker refuses: "
                "run encrypted-vllm-gateway beside your code and point your OpenAI client at it",
            )
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
