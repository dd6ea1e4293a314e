"""The encrypted channel without an engine: sealing, opening, padding, one
key per client, age and replay limits, and refusals of the job input."""

from __future__ import annotations

import json
import time

import pytest
from cryptography.fernet import Fernet
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from encrypted_vllm.wire import protocol
from encrypted_vllm.wire.channel import (
    ITEM_BUCKET_BYTES,
    Channel,
    Inbox,
    Key,
    ReplayGuard,
    generate_key,
    load_keys,
)
from encrypted_vllm.wire.protocol import ErrorCode, ProtocolError, StreamItem, Usage

TTL = 900


@pytest.fixture
def key() -> str:
    return generate_key()


def inbox_for(keys: str, **limits) -> Inbox:
    limits = {"ttl_s": TTL, "max_request_bytes": 1 << 20, **limits}
    return Inbox(Channel(keys), **limits)


def sealed(key: str, plaintext: bytes, at: float | None = None) -> dict:
    fernet = Fernet(key.encode())
    token = fernet.encrypt(plaintext) if at is None else fernet.encrypt_at_time(plaintext, int(at))
    return {"ciphertext": token.decode()}


def refusal(inbox: Inbox, job_input, now: float | None = None) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        inbox.admit(job_input, now=now)
    return caught.value


def test_a_request_survives_the_round_trip(key):
    channel = Channel(key)
    request = protocol.validate_request(
        messages=[{"role": "user", "content": "Sanity check."}],
        sampling_params={"max_tokens": 8, "temperature": 0.7, "stop": ["\n"]},
    )

    job_input = channel.seal_request(request)

    assert set(job_input) == {"ciphertext"}
    assert inbox_for(key).admit(job_input).request == request


def test_stream_items_survive_the_round_trip(key):
    channel = Channel(key)
    items = [
        StreamItem("Hello"),
        StreamItem(" wörld ✓", finish_reason="stop", usage=Usage(5, 2)),
    ]
    assert [channel.open_item(channel.seal_item(item)) for item in items] == items


def test_the_item_plaintext_is_the_documented_json_padded_with_spaces(key):
    output = Channel(key).seal_item(StreamItem("hi", "length", Usage(3, 1)))
    plaintext = Fernet(key.encode()).decrypt(output["ciphertext"])
    assert len(plaintext) == ITEM_BUCKET_BYTES
    assert plaintext.rstrip(b" ") == plaintext.strip()
    assert json.loads(plaintext) == {
        "text": "hi",
        "finish_reason": "length",
        "usage": {"prompt_tokens": 3, "completion_tokens": 1},
    }


# --- Length hiding ---------------------------------------------------------


@given(st.lists(st.text(max_size=40), min_size=2, max_size=20))
def test_deltas_that_fit_one_bucket_give_ciphertexts_of_one_length(deltas):
    channel = Channel(generate_key())
    items = [StreamItem(text) for text in deltas[:-1]]
    items.append(StreamItem(deltas[-1], "length", Usage(123456, 7890)))
    lengths = {len(channel.seal_item(item)["ciphertext"]) for item in items}
    assert len(lengths) == 1


def fernet_token_length(plaintext_bytes: int) -> int:
    """Fernet: version, timestamp, IV, AES-CBC with PKCS7, HMAC; url-safe base64."""
    encrypted = 16 * (plaintext_bytes // 16 + 1)
    return 4 * -(-(1 + 8 + 16 + encrypted + 32) // 3)


def test_a_delta_fills_whole_buckets(key):
    channel = Channel(key)
    bucket = ITEM_BUCKET_BYTES
    for text, buckets in [("a", 1), ("a" * 300, 2), ("a" * 600, 3)]:
        token = channel.seal_item(StreamItem(text))["ciphertext"]
        assert len(token) == fernet_token_length(buckets * bucket)


def test_without_padding_each_delta_length_shows(key):
    channel = Channel(key, item_bucket=0)
    lengths = {len(channel.seal_item(StreamItem("a" * n))["ciphertext"]) for n in (1, 20, 40)}
    assert len(lengths) == 3


@given(st.text(min_size=1, max_size=1000))
def test_every_request_up_to_one_kib_gives_one_ciphertext_length(prompt):
    channel = Channel(generate_key())
    request = protocol.validate_request(prompt=prompt)
    assume(len(request.model_dump_json(exclude_defaults=True).encode()) <= 1024)
    empty = protocol.validate_request(prompt="a")
    assert len(channel.seal_request(request)["ciphertext"]) == len(
        channel.seal_request(empty)["ciphertext"]
    )


def test_larger_requests_show_only_their_power_of_two(key):
    channel = Channel(key)
    lengths = [
        len(channel.seal_request(protocol.validate_request(prompt="x" * n))["ciphertext"])
        for n in (1100, 2000, 2100)
    ]
    assert lengths[0] == lengths[1] < lengths[2]


# --- Keys and rotation ---------------------------------------------------


def test_each_answer_is_sealed_under_the_key_that_opened_its_request():
    """Two clients (tenants) with their own keys on one worker: each reads
    its own answers and nobody else's."""
    alice, bob = generate_key(), generate_key()
    request = protocol.validate_request(prompt="mine")
    worker = inbox_for(f"{alice},{bob}")

    for own, other in ((alice, bob), (bob, alice)):
        admission = worker.admit(Channel(own).seal_request(request))
        assert admission.request == request
        assert admission.channel.key_id == Key(own).id
        item = admission.channel.seal_item(StreamItem("hi"))
        assert Channel(own).open_item(item) == StreamItem("hi")
        with pytest.raises(ProtocolError):
            Channel(other).open_item(item)


def test_a_client_encrypts_with_its_first_key_and_reads_under_any():
    old, new = generate_key(), generate_key()
    client = Channel(f"{new},{old}")
    worker = inbox_for(old)  # not yet moved to the new key: refuses the client
    assert refusal(worker, client.seal_request(protocol.validate_request(prompt="a"))).code is (
        ErrorCode.DECRYPTION_FAILED
    )
    assert client.open_item(Channel(old).seal_item(StreamItem("hi"))) == StreamItem("hi")


def test_a_key_is_named_by_a_fingerprint_that_is_not_the_key():
    first, second = generate_key(), generate_key()
    ids = [key.id for key in load_keys(f"{first},{second}")]
    assert ids == [Key(first).id, Key(second).id] and ids[0] != ids[1]
    assert all(len(key_id) == 8 and key_id not in first + second for key_id in ids)


def test_the_plaintext_openai_route_is_refused_unread(key):
    plaintext = {"openai_route": "/v1/chat/completions", "openai_input": {"messages": []}}
    error = refusal(inbox_for(key), plaintext)
    assert error.code is ErrorCode.INVALID_INPUT and "encrypted-vllm-gateway" in error.reason


@pytest.mark.parametrize("value", [None, "", "  ", "short", "A" * 44, "x" * 44 + ","])
def test_a_bad_key_is_explained_without_being_repeated(value):
    with pytest.raises(ValueError) as caught:
        load_keys(value)
    message = str(caught.value)
    assert "Fernet key" in message and "--generate-key" in message
    if value and value.strip():
        assert value.strip(", ") not in message


def test_a_bad_key_in_a_list_is_named_by_position():
    good = generate_key()
    with pytest.raises(ValueError, match="key 2 of 2 is malformed"):
        load_keys(f"{good},not-a-key")


# --- Age and replay ------------------------------------------------------


def test_a_token_older_than_the_ttl_has_expired(key):
    now = time.time()
    inbox = inbox_for(key)
    fresh = sealed(key, b'{"prompt": "a"}', at=now - TTL + 5)
    stale = sealed(key, b'{"prompt": "a"}', at=now - TTL - 5)

    assert inbox.admit(fresh, now=now).request.prompt == "a"
    error = refusal(inbox, stale, now=now)
    assert error.code is ErrorCode.TOKEN_EXPIRED and "ENCRYPTION_TTL=900" in error.reason


def test_a_client_clock_slightly_ahead_is_allowed_and_far_ahead_is_not(key):
    now = time.time()
    inbox = inbox_for(key)
    assert inbox.admit(sealed(key, b'{"prompt": "a"}', at=now + 30), now=now).request.prompt == "a"
    error = refusal(inbox, sealed(key, b'{"prompt": "a"}', at=now + 300), now=now)
    assert error.code is ErrorCode.TOKEN_EXPIRED


def test_a_token_is_accepted_once(key):
    inbox = inbox_for(key)
    job_input = Channel(key).seal_request(protocol.validate_request(prompt="once"))

    assert inbox.admit(job_input).request.prompt == "once"
    assert refusal(inbox, job_input).code is ErrorCode.REPLAYED
    assert refusal(inbox, job_input).code is ErrorCode.REPLAYED


def test_a_replay_after_the_window_is_refused_as_expired(key):
    now = time.time()
    inbox = inbox_for(key)
    job_input = sealed(key, b'{"prompt": "a"}', at=now)
    inbox.admit(job_input, now=now)
    assert refusal(inbox, job_input, now=now + TTL + 1).code is ErrorCode.TOKEN_EXPIRED


@settings(max_examples=300)
@given(
    st.lists(st.integers(0, 40), min_size=30, max_size=30),
    st.lists(st.integers(0, 29), max_size=80),
    st.integers(1, 40),
)
def test_the_replay_guard_never_admits_twice_and_stays_bounded(issue_times, tokens, capacity):
    """Tokens (each with its own issue time) arrive one per second: no token
    is admitted twice, memory stays within capacity, and with room enough
    every fresh token is admitted on first sight."""
    window = 10
    guard = ReplayGuard(capacity)
    admitted: set[int] = set()
    for now, token in enumerate(tokens):
        issued_at = issue_times[token]
        if issued_at < now - window:
            continue  # the Inbox refuses these before asking the guard
        verdict = guard.admit(token.to_bytes(2, "big"), issued_at, expired_before=now - window)
        if verdict is None:
            assert token not in admitted
            admitted.add(token)
        elif capacity >= len(set(tokens)):
            assert token in admitted and verdict is ErrorCode.REPLAYED
        assert len(guard) <= capacity


# --- Bounded input and refusals -----------------------------------------


def test_a_ciphertext_over_the_size_limit_is_refused_naming_the_limit(key):
    inbox = inbox_for(key, max_request_bytes=4096)
    job_input = Channel(key).seal_request(protocol.validate_request(prompt="x" * 5000))
    error = refusal(inbox, job_input)
    assert error.code is ErrorCode.INVALID_INPUT
    assert error.reason == "ciphertext exceeds MAX_REQUEST_BYTES=4096"


@pytest.mark.parametrize(
    "job_input",
    [None, "text", {}, {"prompt": "hi"}, {"ciphertext": 5}, {"ciphertext": "x", "prompt": "hi"}],
)
def test_malformed_job_input_is_invalid_input(key, job_input):
    assert refusal(inbox_for(key), job_input).code is ErrorCode.INVALID_INPUT


def test_a_foreign_or_tampered_token_fails_decryption(key):
    request = protocol.validate_request(prompt="Sanity check.")
    foreign = Channel(generate_key()).seal_request(request)
    token = Channel(key).seal_request(request)["ciphertext"]
    tampered = {"ciphertext": token[:-6] + ("A" if token[-6] != "A" else "B") + token[-5:]}

    for job_input in (foreign, tampered, {"ciphertext": "not a token"}):
        assert refusal(inbox_for(key), job_input).code is ErrorCode.DECRYPTION_FAILED


def test_an_item_under_another_key_fails_decryption(key):
    item = Channel(generate_key()).seal_item(StreamItem("hi"))
    with pytest.raises(ProtocolError) as caught:
        Channel(key).open_item(item)
    assert caught.value.code is ErrorCode.DECRYPTION_FAILED
