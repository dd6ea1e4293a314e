"""The soak's jobs (bench/soak.py): a small table of distinct valid requests,
whose greedy answers are the truth, and families of fuzzed job inputs, each
with the one stable code its inputs must fail with.

Rules:
- Every valid request is greedy (temperature 0, ignore_eos, a fixed
  max_tokens), so it has exactly one right answer; the table is small, so
  that a quiet worker answers each of them before the load begins.
- CANARY goes into a share of every kind, in every place a request can
  carry text: prompts, messages, tool definitions, tool calls and results,
  schemas, template kwargs, choices, and the fuzzed inputs themselves.
- Fuzzed inputs are drawn from a seeded `random.Random`, in the families of
  tests/worker/test_fuzz.py, and made when they are sent (a token's age is part of
  what they are). A drawn plaintext that happens to be a valid request is
  drawn again: a fuzzed job must fail.
- Nothing here prints or logs.
"""

from __future__ import annotations

import base64
import json
import random
import string
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from cryptography.fernet import Fernet

from encrypted_vllm.wire import channel, protocol
from encrypted_vllm.wire.protocol import ErrorCode
from encrypted_vllm.worker.config import DEFAULT_ENCRYPTION_TTL_S

CANARY = "CANARY-4f1c9e"  # as tests/worker/test_privacy.py
# The long requests: long enough that a cancel after a few items, or a
# stop's grace (bench/soak.py: 1 s), finds many of them still streaming.
LONG_TOKENS = 256


def greedy(max_tokens: int) -> dict[str, Any]:
    return {"temperature": 0, "ignore_eos": True, "max_tokens": max_tokens}


@dataclass(frozen=True)
class ValidRequest:
    """One distinct valid request: `fields` are `AsyncClient.items` keywords."""

    name: str
    family: str  # prompt, chat, tools, structured, long
    fields: dict[str, Any]


def _tool(name: str, canary: bool) -> dict[str, Any]:
    marked = CANARY if canary else "a word"
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": f"looks up {marked}",
            "parameters": {
                "type": "object",
                "properties": {"q": {"type": "string", "enum": [marked, "fox"]}},
                "required": ["q"],
            },
        },
    }


def _tool_history() -> list[dict[str, Any]]:
    """A user turn, the assistant's call of `lookup` and the tool's result."""
    call = {
        "id": f"call-{CANARY}",
        "type": "function",
        "function": {"name": "lookup", "arguments": json.dumps({"q": CANARY})},
    }
    return [
        {"role": "user", "content": [{"type": "text", "text": f"find {CANARY}"}]},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": f"{CANARY} found"},
    ]


def valid_requests() -> list[ValidRequest]:
    """The truth table's requests: about half of them carry CANARY."""
    table = []
    for n in range(8):
        marked = f"{CANARY} {n}" if n % 2 else f"Soak {n}"
        prompt = f"{marked}: the quick brown fox jumps over the lazy dog."
        table.append(
            ValidRequest(
                f"prompt-{n}",
                "prompt",
                {
                    "prompt": prompt,
                    "sampling_params": greedy((8, 16, 24, 32)[n % 4]),
                },
            )
        )
    chats = [
        {"messages": [{"role": "system", "content": CANARY}, {"role": "user", "content": "Hi"}]},
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "two parts, "},
                        {"type": "text", "text": CANARY},
                    ],
                }
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Hello to you."},
                {"role": "user", "content": f"and {CANARY}?"},
            ]
        },
        {
            "messages": [{"role": "user", "content": "kwargs"}],
            "chat_template_kwargs": {"canary": CANARY},
        },
    ]
    for n, chat in enumerate(chats):
        table.append(ValidRequest(f"chat-{n}", "chat", {**chat, "sampling_params": greedy(16)}))
    lookup = _tool("lookup", canary=True)
    tools = [
        {"messages": _tool_history(), "tools": [lookup], "tool_choice": "required"},
        {
            "messages": [{"role": "user", "content": "call it"}],
            "tools": [lookup, _tool("other", canary=False)],
            "tool_choice": {"type": "function", "function": {"name": "other"}},
        },
        {"messages": _tool_history(), "tools": [lookup], "tool_choice": "none"},
        {"messages": [{"role": "user", "content": "maybe"}], "tools": [lookup]},  # "auto"
    ]
    for n, tool_job in enumerate(tools):
        table.append(
            ValidRequest(f"tools-{n}", "tools", {**tool_job, "sampling_params": greedy(40)})
        )
    schema = {"type": "object", "title": CANARY, "properties": {"a": {"type": "integer"}}}
    structured = [
        ({"json_schema": schema}, 20),
        ({"regex": "[a-z]{3,12}"}, 12),
        ({"choice": [CANARY, "fox", "dog"]}, 8),  # the answer may be the canary itself
    ]
    for n, (constraint, tokens) in enumerate(structured):
        table.append(
            ValidRequest(
                f"structured-{n}",
                "structured",
                {
                    "prompt": f"Constrained {n}: {CANARY}",
                    "structured_output": constraint,
                    "sampling_params": greedy(tokens),
                },
            )
        )
    for n in range(4):
        marked = f"{CANARY} long {n}" if n % 2 else f"Long {n}"
        table.append(
            ValidRequest(
                f"long-{n}",
                "long",
                {
                    "prompt": f"{marked}: the lazy dog sleeps.",
                    "sampling_params": greedy(LONG_TOKENS),
                },
            )
        )
    return table


# --- Fuzzed inputs ------------------------------------------------------------


@dataclass(frozen=True)
class FuzzCase:
    """One fuzzed job: `job_input` sent as it is, past the client's checks,
    or `request` sent through the client (valid to the schema, refused by
    the engine)."""

    job_input: Any = None
    request: dict[str, Any] | None = None


_TEXTS = [CANARY, "", "x", "日本語 🎉", "null", "{}", "gAAAAA", "\x00\ud7ff", "ciphertext"]
_KEYS = ["prompt", "messages", "sampling_params", "role", "content", "max_tokens",
         "temperature", "stop", "tools", "ciphertext", "input", CANARY]  # fmt: skip
_SAMPLING_FIELDS = ["max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p", "seed",
                    "stop", "stop_token_ids", "presence_penalty", "repetition_penalty",
                    "ignore_eos", "logprobs", "n"]  # fmt: skip


def _text(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return rng.choice(_TEXTS)
    alphabet = string.printable + "éß中🔒"
    return "".join(rng.choices(alphabet, k=rng.randrange(1, 24))) + rng.choice(["", CANARY])


def random_json(rng: random.Random, depth: int = 0) -> Any:
    kinds = 7 if depth < 3 else 5
    kind = rng.randrange(kinds)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, -1, 1, 2**31, 2**63, -(2**64), rng.randrange(-(10**6), 10**6)])
    if kind == 3:
        return rng.choice([0.5, -0.0, 1e308, -2.5, rng.uniform(-100, 100)])
    if kind == 4:
        return _text(rng)
    if kind == 5:
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = _KEYS if rng.random() < 0.5 else [_text(rng) for _ in range(4)]
    return {rng.choice(keys): random_json(rng, depth + 1) for _ in range(rng.randrange(1, 4))}


def _is_valid_request(plaintext: bytes) -> bool:
    try:
        protocol.Request.model_validate_json(plaintext)
    except ValueError:
        return False
    return True


def _invalid(rng: random.Random, draw: Callable[[random.Random], bytes], fallback: bytes) -> bytes:
    """A plaintext from `draw` that is not a valid request."""
    for _ in range(20):
        plaintext = draw(rng)
        if not _is_valid_request(plaintext):
            return plaintext
    return fallback


_UNKNOWN_FIELD = json.dumps({"prompt": "x", CANARY: 1}).encode()


def _plaintext(rng: random.Random) -> bytes:
    """Random bytes, random JSON, or JSON shaped like a request."""
    choice = rng.randrange(3)
    if choice == 0:
        return rng.randbytes(rng.randrange(200)) + rng.choice([b"", CANARY.encode()])
    if choice == 1:
        return json.dumps(random_json(rng)).encode()
    return json.dumps({"prompt": _text(rng), rng.choice(_KEYS): random_json(rng)}).encode()


def _wrong_field(rng: random.Random) -> bytes:
    field = rng.choice(_SAMPLING_FIELDS)
    return json.dumps({"prompt": CANARY, "sampling_params": {field: random_json(rng)}}).encode()


def _deep(depth: int) -> dict[str, Any]:
    node: dict[str, Any] = {"type": "string", "description": CANARY}
    for _ in range(depth):
        node = {"type": "object", "properties": {"a": node}}
    return node


_USER = {"role": "user", "content": CANARY}
_OVER_A_LIMIT = [
    {"prompt": f"{CANARY} " + "word " * 600},  # longer than the model's context
    {"prompt": CANARY, "sampling_params": {"max_tokens": 2**62}},
    {"prompt": CANARY, "sampling_params": {"stop": [CANARY] * (protocol.MAX_STOP_STRINGS + 1)}},
    {"prompt": CANARY, "sampling_params": {"logprobs": protocol.MAX_LOGPROBS + 1}},
    {"prompt": CANARY, "sampling_params": {"n": 2}},
    {"messages": [_USER] * (protocol.MAX_MESSAGES + 1)},
    {"messages": [_USER], "tools": [_tool("lookup", True), _tool("lookup", False)]},
    {"prompt": CANARY, "structured_output": {"json_schema": _deep(protocol.MAX_JSON_DEPTH)}},
    {"messages": [_USER], "chat_template_kwargs": {"tools": CANARY}},
]


def _over_a_limit(rng: random.Random) -> dict[str, Any]:
    if rng.random() < 0.02:
        # A ciphertext past MAX_REQUEST_BYTES (4 MiB), still under /run's 10 MB.
        return {"prompt": CANARY + "x" * (7 * 2**19)}
    return rng.choice(_OVER_A_LIMIT)


_ENGINE_REFUSES = [{"regex": f"({CANARY}"}, {"json_schema": {"type": CANARY}},
                   {"grammar": f"root ::= {CANARY}"}]  # fmt: skip


class Family(NamedTuple):
    code: ErrorCode  # what its jobs must fail with
    weight: int  # its share of the fuzzed jobs
    make: Callable[[random.Random], FuzzCase]


class Fuzzer:
    """Makes the fuzzed inputs of every family, sealed for the worker's key
    where the family needs a token."""

    def __init__(self, key: str):
        self.fernet = Fernet(key)
        self.stranger = Fernet(channel.generate_key())  # a key the worker lacks
        request = protocol.validate_request(prompt=CANARY, sampling_params=greedy(8))
        # What a valid token seals, as the client pads it.
        self.valid_plaintext = channel.pad_request(
            request.model_dump_json(exclude_defaults=True).encode()
        )
        self.families = {
            "job input": Family(ErrorCode.INVALID_INPUT, 3, self._job_input),
            "openai route": Family(ErrorCode.INVALID_INPUT, 1, self._openai_route),
            "random ciphertext": Family(ErrorCode.DECRYPTION_FAILED, 2, self._random_ciphertext),
            "truncated token": Family(ErrorCode.DECRYPTION_FAILED, 2, self._truncated),
            "bit-flipped token": Family(ErrorCode.DECRYPTION_FAILED, 2, self._bit_flipped),
            "another key": Family(ErrorCode.DECRYPTION_FAILED, 1, self._another_key),
            "expired token": Family(ErrorCode.TOKEN_EXPIRED, 1, self._expired),
            "invalid plaintext": Family(ErrorCode.INVALID_INPUT, 3, self._invalid_plaintext),
            "wrong field": Family(ErrorCode.INVALID_INPUT, 3, self._wrong_field),
            "over a limit": Family(ErrorCode.INVALID_INPUT, 2, self._over_a_limit),
            "engine refuses": Family(ErrorCode.INVALID_INPUT, 1, self._engine_refuses),
        }

    def pick_family(self, rng: random.Random) -> str:
        names = list(self.families)
        return rng.choices(names, weights=[self.families[name].weight for name in names])[0]

    def make(self, family: str, seed: int) -> FuzzCase:
        return self.families[family].make(random.Random(seed))

    def _token(self) -> str:
        return self.fernet.encrypt(self.valid_plaintext).decode()

    def _job_input(self, rng: random.Random) -> FuzzCase:
        value = random_json(rng)
        if isinstance(value, dict) and set(value) == {"ciphertext"}:
            value["ciphertext"] = rng.choice([None, 1, [CANARY], {"t": CANARY}])
        return FuzzCase(job_input=value)

    def _openai_route(self, rng: random.Random) -> FuzzCase:
        body = {"messages": [{"role": "user", "content": CANARY}], "model": _text(rng)}
        return FuzzCase(job_input={"openai_route": "/v1/chat/completions", "openai_input": body})

    def _random_ciphertext(self, rng: random.Random) -> FuzzCase:
        forms = [
            lambda: base64.urlsafe_b64encode(rng.randbytes(rng.randrange(1, 300))).decode(),
            lambda: _text(rng),
            lambda: CANARY,
            lambda: "gAAAAA" + base64.urlsafe_b64encode(CANARY.encode() * 4).decode(),
        ]
        return FuzzCase(job_input={"ciphertext": rng.choice(forms)()})

    def _truncated(self, rng: random.Random) -> FuzzCase:
        token = self._token()
        return FuzzCase(job_input={"ciphertext": token[: rng.randrange(len(token))]})

    def _bit_flipped(self, rng: random.Random) -> FuzzCase:
        raw = bytearray(base64.urlsafe_b64decode(self._token()))
        raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        token = base64.urlsafe_b64encode(bytes(raw)).decode()
        return FuzzCase(job_input={"ciphertext": token})

    def _another_key(self, _rng: random.Random) -> FuzzCase:
        token = self.stranger.encrypt(self.valid_plaintext).decode()
        return FuzzCase(job_input={"ciphertext": token})

    def _expired(self, _rng: random.Random) -> FuzzCase:
        issued = int(time.time()) - 2 * DEFAULT_ENCRYPTION_TTL_S
        token = self.fernet.encrypt_at_time(self.valid_plaintext, issued).decode()
        return FuzzCase(job_input={"ciphertext": token})

    def _sealed(self, plaintext: bytes) -> FuzzCase:
        return FuzzCase(job_input={"ciphertext": self.fernet.encrypt(plaintext).decode()})

    def _invalid_plaintext(self, rng: random.Random) -> FuzzCase:
        return self._sealed(_invalid(rng, _plaintext, _UNKNOWN_FIELD))

    def _wrong_field(self, rng: random.Random) -> FuzzCase:
        return self._sealed(_invalid(rng, _wrong_field, _UNKNOWN_FIELD))

    def _over_a_limit(self, rng: random.Random) -> FuzzCase:
        return self._sealed(json.dumps(_over_a_limit(rng)).encode())

    def _engine_refuses(self, rng: random.Random) -> FuzzCase:
        request = {
            "prompt": f"{CANARY} constrained",
            "structured_output": rng.choice(_ENGINE_REFUSES),
            "sampling_params": greedy(8),
        }
        return FuzzCase(request=request)
