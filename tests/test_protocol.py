"""Wire protocol v1 without an engine: sealing, opening and refusals."""

from __future__ import annotations

import pydantic
import pytest
from cryptography.fernet import Fernet

import protocol
from protocol import Channel, ErrorCode, ProtocolError, StreamItem, Usage


@pytest.fixture
def key() -> str:
    return protocol.generate_key()


def sealed(key: str, plaintext: bytes) -> dict:
    return {"ciphertext": Fernet(key.encode()).encrypt(plaintext).decode()}


def refusal(channel: Channel, job_input) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        channel.open_request(job_input)
    return caught.value


def test_a_request_survives_the_round_trip(key):
    channel = Channel(key)
    request = protocol.validate_request(
        messages=[{"role": "user", "content": "Sanity check."}],
        sampling_params={"max_tokens": 8, "temperature": 0.7, "stop": ["\n"]},
    )

    job_input = channel.seal_request(request)

    assert set(job_input) == {"ciphertext"}
    assert "Sanity" not in job_input["ciphertext"]
    assert channel.open_request(job_input) == request


def test_stream_items_survive_the_round_trip(key):
    channel = Channel(key)
    items = [
        StreamItem("Hello"),
        StreamItem(" wörld ✓", finish_reason="stop", usage=Usage(5, 2)),
    ]
    assert [channel.open_item(channel.seal_item(item)) for item in items] == items


def test_the_item_plaintext_is_the_documented_json(key):
    output = Channel(key).seal_item(StreamItem("hi", "length", Usage(3, 1)))
    plaintext = Fernet(key.encode()).decrypt(output["ciphertext"])
    assert protocol.json.loads(plaintext) == {
        "text": "hi",
        "finish_reason": "length",
        "usage": {"prompt_tokens": 3, "completion_tokens": 1},
    }


@pytest.mark.parametrize(
    "plaintext, reason",
    [
        (b"\xff\xfe", "plaintext is not UTF-8 JSON"),
        (b"[1, 2]", "plaintext is not a JSON object"),
        (b'{"prompt": "a", "secret_field": 1}', "request has an unknown field"),
        (b'{"prompt": "a", "sampling_params": {"n": 2}}', "request has an unknown field"),
        (b'{"sampling_params": {}}', "request needs exactly one of prompt or messages"),
        (
            b'{"prompt": "a", "messages": [{"role": "user", "content": "b"}]}',
            "request needs exactly one of prompt or messages",
        ),
        (b'{"prompt": 7}', "a request field has the wrong type"),
        (
            b'{"prompt": "a", "sampling_params": {"max_tokens": "8"}}',
            "a request field has the wrong type",
        ),
        (
            b'{"prompt": "a", "sampling_params": {"top_p": 1.5}}',
            "a request field has a value it does not allow",
        ),
        (
            b'{"messages": [{"role": "wizard", "content": "b"}]}',
            "a request field has a value it does not allow",
        ),
        (b'{"messages": [{"role": "user"}]}', "request lacks a required field"),
    ],
)
def test_invalid_plaintext_is_refused_with_a_fixed_reason(key, plaintext, reason):
    error = refusal(Channel(key), sealed(key, plaintext))
    assert error.code is ErrorCode.INVALID_INPUT
    assert error.reason == reason


@pytest.mark.parametrize(
    "job_input",
    [None, "text", {}, {"prompt": "hi"}, {"ciphertext": 5}, {"ciphertext": "x", "prompt": "hi"}],
)
def test_malformed_job_input_is_invalid_input(key, job_input):
    assert refusal(Channel(key), job_input).code is ErrorCode.INVALID_INPUT


def test_a_foreign_or_tampered_token_fails_decryption(key):
    channel = Channel(key)
    request = protocol.validate_request(prompt="Sanity check.")
    foreign = Channel(protocol.generate_key()).seal_request(request)
    token = channel.seal_request(request)["ciphertext"]
    tampered = {"ciphertext": token[:-6] + ("A" if token[-6] != "A" else "B") + token[-5:]}

    for job_input in (foreign, tampered, {"ciphertext": "not a token"}):
        assert refusal(channel, job_input).code is ErrorCode.DECRYPTION_FAILED


def test_an_item_under_another_key_fails_decryption(key):
    item = Channel(protocol.generate_key()).seal_item(StreamItem("hi"))
    with pytest.raises(ProtocolError) as caught:
        Channel(key).open_item(item)
    assert caught.value.code is ErrorCode.DECRYPTION_FAILED


def test_the_client_side_validation_names_the_problem():
    with pytest.raises(pydantic.ValidationError, match="beam_width"):
        protocol.validate_request(prompt="hi", sampling_params={"beam_width": 2})


def test_error_strings_parse_back_into_codes():
    error = ProtocolError.parse("INVALID_INPUT: request has an unknown field")
    assert (error.code, error.reason) == (ErrorCode.INVALID_INPUT, "request has an unknown field")
    assert ProtocolError.parse("handler: Traceback ...") is None


@pytest.mark.parametrize("value", [None, "", "  ", "short", "A" * 44, "x" * 44 + ","])
def test_a_bad_key_is_explained_without_being_repeated(value):
    with pytest.raises(ValueError) as caught:
        protocol.load_keys(value)
    message = str(caught.value)
    assert "Fernet key" in message and "--generate-key" in message
    if value and value.strip():
        assert value.strip() not in message
