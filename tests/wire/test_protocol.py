"""Wire protocol v1.4 without an engine: every field's rules and limits,
the worker's terse refusals and the client's detailed ones, and the stream
items' JSON."""

from __future__ import annotations

import json

import pydantic
import pytest

from encrypted_vllm.wire import protocol
from encrypted_vllm.wire.protocol import ErrorCode, ProtocolError


def refusal(plaintext: bytes | dict) -> ProtocolError:
    if isinstance(plaintext, dict):
        plaintext = json.dumps(plaintext).encode()
    with pytest.raises(ProtocolError) as caught:
        protocol.parse_request(plaintext)
    assert caught.value.code is ErrorCode.INVALID_INPUT
    return caught.value


@pytest.mark.parametrize(
    "plaintext, limit",
    [
        (
            {"messages": [{"role": "user", "content": "a"}] * (protocol.MAX_MESSAGES + 1)},
            "MAX_MESSAGES",
        ),
        (
            {"prompt": "a", "sampling_params": {"stop": ["s"] * (protocol.MAX_STOP_STRINGS + 1)}},
            "MAX_STOP_STRINGS",
        ),
        (
            {"prompt": "a", "sampling_params": {"stop": "s" * (protocol.MAX_STOP_CHARS + 1)}},
            "MAX_STOP_CHARS",
        ),
        (
            {"prompt": "a", "sampling_params": {"stop_token_ids": [1] * 65}},
            "MAX_STOP_TOKEN_IDS",
        ),
        ({"embed": {"input": ["a"] * (protocol.MAX_EMBED_INPUTS + 1)}}, "MAX_EMBED_INPUTS"),
        (
            {"embed": {"input": [[1] * (protocol.MAX_EMBED_INPUT_TOKENS + 1)]}},
            "MAX_EMBED_INPUT_TOKENS",
        ),
    ],
)
def test_schema_limits_are_refused_naming_the_limit(plaintext, limit):
    assert refusal(plaintext).reason.startswith(f"request exceeds {limit}=")


@pytest.mark.parametrize(
    "plaintext, reason",
    [
        (b"\xff\xfe", "plaintext is not UTF-8 JSON"),
        (b"[1, 2]", "plaintext is not a JSON object"),
        (b'{"prompt": "a", "secret_field": 1}', "request has an unknown field"),
        (b'{"prompt": "a", "sampling_params": {"n": 2}}', "request exceeds MAX_N=1"),
        (b'{"prompt": ""}', "the prompt is empty"),
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
        (b'{"embed": {"input": ["a", ""]}}', "an embeddings input is empty"),
        (b'{"embed": {"input": [[]]}}', "an embeddings input is empty"),
        (b'{"embed": {"input": [[-1]]}}', "a request field has the wrong type"),
        (b'{"embed": {"input": []}}', "a request field has a value it does not allow"),
        (b'{"embed": {"input": ["a"]}, "prompt": "b"}', "embed takes no other field"),
        (
            b'{"embed": {"input": ["a"]}, "sampling_params": {"max_tokens": 2}}',
            "embed takes no other field",
        ),
        (
            b'{"embed": {"input": ["a"], "truncate_prompt_tokens": 0}}',
            "truncate_prompt_tokens is -1 or a count of tokens to keep",
        ),
        (
            b'{"embed": {"input": ["a"], "dimensions": 0}}',
            "a request field has a value it does not allow",
        ),
        (
            b'{"prompt": "a",'
            b' "structured_output": {"json_schema": {"enum": [-9223372036854775809]}}}',
            "a JSON document in the request has an integer beyond 64 bits",
        ),
        (
            b'{"prompt": "a", "tools": [{"type": "function", "function": {"name": "f",'
            b' "parameters": {"type": "object", "maxProperties": 18446744073709551616}}}]}',
            "a JSON document in the request has an integer beyond 64 bits",
        ),
    ],
)
def test_invalid_plaintext_is_refused_with_a_fixed_reason(plaintext, reason):
    assert refusal(plaintext).reason == reason


PNG_URL = "data:image/png;base64,iVBORw0KGgo="


def user_parts(*parts) -> dict:
    return {"messages": [{"role": "user", "content": list(parts)}]}


def image(url: str = PNG_URL, **fields) -> dict:
    return {"type": "image_url", "image_url": {"url": url, **fields}}


def test_user_messages_hold_images_and_requests_name_adapters():
    request = protocol.parse_request(
        json.dumps(
            {
                **user_parts({"type": "text", "text": "What is it?"}, image(detail="low")),
                "adapter": "ft:org/support-v2",
            }
        ).encode()
    )
    (only,) = request.images
    assert (only.url, only.detail, only.is_data) == (PNG_URL, "low", True)
    assert request.adapter == "ft:org/support-v2"
    assert protocol.parse_request(json.dumps(user_parts(image("https://x.test/a.png"))).encode())


@pytest.mark.parametrize(
    "plaintext, reason",
    [
        (
            user_parts(image("ftp://x.test/a.png")),
            "an image's URL is a data: URL or an http(s) URL",
        ),
        (
            user_parts(image("data:text/plain;base64,AAAA")),
            "an image's data URL is not data:image/<type>;base64,<data>",
        ),
        (
            user_parts(image("data:image/png,raw")),
            "an image's data URL is not data:image/<type>;base64,<data>",
        ),
        (
            user_parts(
                image("data:image/png;base64," + "A" * (protocol.MAX_IMAGE_BYTES // 3 * 4 + 8))
            ),
            f"request exceeds MAX_IMAGE_BYTES={protocol.MAX_IMAGE_BYTES}",
        ),
        (
            user_parts(image("https://x.test/" + "a" * protocol.MAX_IMAGE_URL_CHARS)),
            f"request exceeds MAX_IMAGE_URL_CHARS={protocol.MAX_IMAGE_URL_CHARS}",
        ),
        (user_parts(*[image()] * (protocol.MAX_IMAGES + 1)), "request exceeds MAX_IMAGES=64"),
        (
            {"messages": [{"role": "system", "content": [image()]}]},
            "only user messages hold images",
        ),
        (
            {"messages": [{"role": "tool", "tool_call_id": "c", "content": [image()]}]},
            "only user messages hold images",
        ),
        (
            user_parts({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}),
            "content parts are text, and image_url in user messages",
        ),
        (user_parts({"type": "video"}), "a user message's content parts are text and image_url"),
        ({"prompt": "a", "adapter": "two words"}, "a request field has a value it does not allow"),
        ({"embed": {"input": ["a"]}, "adapter": "x"}, "embed takes no other field"),
    ],
)
def test_images_and_adapters_are_refused_with_a_fixed_reason(plaintext, reason):
    assert refusal(plaintext).reason == reason


def test_a_card_says_which_images_and_adapters_a_worker_takes():
    card = protocol.WorkerCard(
        "m", 2048, True, None, None, "xgrammar", 20, images=4, adapters=("a", "b")
    )
    body = json.loads(json.dumps(card.to_dict()))
    assert (body["images"], body["adapters"]) == (4, ["a", "b"])
    assert protocol.WorkerCard.from_dict(body) == card
    # An older worker's card says neither: no images, no adapters.
    del body["images"], body["adapters"]
    assert (
        protocol.WorkerCard.from_dict(body).images,
        protocol.WorkerCard.from_dict(body).adapters,
    ) == (0, ())


def test_json_documents_may_hold_any_64_bit_integer():
    schema = {"enum": [-(2**63), 2**63 - 1]}
    request = protocol.parse_request(
        json.dumps({"prompt": "a", "structured_output": {"json_schema": schema}}).encode()
    )
    assert request.structured_output.json_schema == schema


def test_the_client_side_validation_names_the_problem():
    with pytest.raises(pydantic.ValidationError, match="beam_width"):
        protocol.validate_request(prompt="hi", sampling_params={"beam_width": 2})


def test_error_strings_parse_back_into_codes():
    error = ProtocolError.parse("REPLAYED: this token was already accepted by this worker")
    assert (error.code, error.reason) == (
        ErrorCode.REPLAYED,
        "this token was already accepted by this worker",
    )
    assert ProtocolError.parse("handler: Traceback ...") is None


def test_an_embedding_travels_as_little_endian_float32_in_base64():
    embedding = protocol.Embedding.of(3, [0.5, -1.25, 1e-3])
    assert embedding.base64 == "AAAAPwAAoL9vEoM6"  # struct.pack("<3f", ...), base64
    assert embedding.vector == pytest.approx([0.5, -1.25, 1e-3], rel=1e-6)
    item = protocol.StreamItem(
        embeddings=(embedding,), finish_reason="stop", usage=protocol.Usage(7, 0)
    )
    assert json.loads(item.to_json())["embeddings"] == [{"index": 3, "embedding": embedding.base64}]
    assert protocol.StreamItem.from_json(item.to_json()) == item
    assert not item.empty and not protocol.StreamItem(embeddings=(embedding,)).empty


@pytest.mark.parametrize(
    "body",
    [
        {"text": "", "embeddings": [{"index": -1, "embedding": "AAAAPw=="}]},
        {"text": "", "embeddings": [{"index": 0, "embedding": [0.5]}]},
        {"text": "", "stop_sequence": 7},
    ],
)
def test_an_items_new_fields_are_checked_when_read(body):
    with pytest.raises(TypeError):
        protocol.StreamItem.from_json(json.dumps(body).encode())


def test_the_stop_string_that_ended_an_answer_is_named():
    item = protocol.StreamItem(
        "done", finish_reason="stop", usage=protocol.Usage(1, 1), stop_sequence="END"
    )
    assert json.loads(item.to_json())["stop_sequence"] == "END"
    assert protocol.StreamItem.from_json(item.to_json()).stop_sequence == "END"
