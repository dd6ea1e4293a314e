"""Property-based fuzzing of the handler on the real engine.

Random JSON, random bytes, truncated and bit-flipped tokens, wrong types and
huge fields: every case must end FAILED with a stable code (one error item,
nothing else), and the worker must then serve a valid job exactly. The
session summary reports how many cases ran.
"""

from __future__ import annotations

import base64
import itertools
import json

import pytest
from cryptography.fernet import Fernet
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from encrypted_vllm.wire import protocol
from encrypted_vllm.wire.protocol import ErrorCode, ProtocolError
from tests.jobs import GREEDY, greedy_text, open_all, run_job

FUZZ = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
_ids = itertools.count()

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
schema_keys = st.sampled_from(
    ["prompt", "messages", "sampling_params", "role", "content", "max_tokens", "temperature",
     "top_p", "top_k", "stop", "seed", "stop_token_ids", "ignore_eos", "logprobs", "n",
     "structured_output", "json_schema", "json_object", "regex", "choice", "grammar",
     "tools", "tool_choice", "parallel_tool_calls", "chat_template_kwargs", "describe",
     "type", "function", "name", "description", "parameters", "strict", "arguments",
     "tool_calls", "tool_call_id", "id", "text"]
)  # fmt: skip
schema_shaped = st.recursive(
    json_values,
    lambda children: (
        st.dictionaries(schema_keys, children, max_size=4) | st.lists(children, max_size=3)
    ),
    max_leaves=12,
)


def is_valid_request(plaintext: bytes) -> bool:
    try:
        protocol.Request.model_validate_json(plaintext)
    except ValueError:
        return False
    return True


@pytest.fixture(scope="module")
def fresh_token(key):
    fernet = Fernet(key)
    plaintext = b'{"prompt": "Sanity check.", "sampling_params": {"max_tokens": 4}}'
    return lambda: fernet.encrypt(plaintext).decode()


@pytest.fixture(scope="module")
def seal_plaintext(key):
    fernet = Fernet(key)
    return lambda plaintext: {"ciphertext": fernet.encrypt(plaintext).decode()}


@pytest.fixture
def refused(worker, fuzz_tally, request):
    async def check(job_input, *expected: ErrorCode) -> None:
        outputs = await run_job(worker, job_input)
        assert len(outputs) == 1 and set(outputs[0]) == {"error"}, outputs
        error = ProtocolError.parse(outputs[0]["error"])
        assert error is not None and error.code in expected, outputs
        fuzz_tally[request.node.name] += 1

    return check


@pytest.fixture
async def then_a_valid_job_is_exact(worker, client_channel, engine, hf_tokenizer):
    yield
    prompt = "After the fuzzing."
    request = protocol.validate_request(prompt=prompt, sampling_params=GREEDY)
    items = open_all(client_channel, await run_job(worker, client_channel.seal_request(request)))
    expected = await greedy_text(engine, hf_tokenizer(prompt).input_ids, GREEDY["max_tokens"])
    assert "".join(item.text for item in items) == expected


pytestmark = pytest.mark.usefixtures("then_a_valid_job_is_exact")


@FUZZ
@given(job_input=json_values)
async def test_random_job_inputs(refused, job_input):
    assume(not (isinstance(job_input, dict) and set(job_input) == {"ciphertext"}))
    await refused(job_input, ErrorCode.INVALID_INPUT)


@FUZZ
@given(data=st.binary(max_size=300) | st.text(max_size=300))
async def test_random_ciphertexts(refused, data):
    token = base64.urlsafe_b64encode(data).decode() if isinstance(data, bytes) else data
    await refused({"ciphertext": token}, ErrorCode.DECRYPTION_FAILED)


@FUZZ
@given(cut=st.integers(min_value=0, max_value=10_000))
async def test_truncated_tokens(refused, fresh_token, cut):
    token = fresh_token()
    await refused({"ciphertext": token[: cut % len(token)]}, ErrorCode.DECRYPTION_FAILED)


@FUZZ
@given(position=st.integers(min_value=0), bit=st.integers(min_value=0, max_value=7))
async def test_bit_flipped_tokens(refused, fresh_token, position, bit):
    raw = bytearray(base64.urlsafe_b64decode(fresh_token()))
    raw[position % len(raw)] ^= 1 << bit
    token = base64.urlsafe_b64encode(bytes(raw)).decode()
    await refused({"ciphertext": token}, ErrorCode.DECRYPTION_FAILED)


@FUZZ
@given(value=json_values | schema_shaped)
async def test_random_json_plaintexts(refused, seal_plaintext, value):
    plaintext = json.dumps(value).encode()
    assume(not is_valid_request(plaintext))
    await refused(seal_plaintext(plaintext), ErrorCode.INVALID_INPUT)


@FUZZ
@given(data=st.binary(max_size=200))
async def test_random_byte_plaintexts(refused, seal_plaintext, data):
    assume(not is_valid_request(data))
    await refused(seal_plaintext(data), ErrorCode.INVALID_INPUT)


@FUZZ
@given(
    field=st.sampled_from(
        ["max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop",
         "stop_token_ids", "presence_penalty", "repetition_penalty", "ignore_eos"]
    ),
    value=json_values,
)  # fmt: skip
async def test_wrong_types_and_values_in_sampling_params(refused, seal_plaintext, field, value):
    plaintext = json.dumps({"prompt": "a", "sampling_params": {field: value}}).encode()
    assume(not is_valid_request(plaintext))
    await refused(seal_plaintext(plaintext), ErrorCode.INVALID_INPUT)


@FUZZ
@given(
    huge=st.sampled_from(
        [
            {"prompt": "x" * (5 * 1024 * 1024)},
            {"prompt": "word " * 100_000},
            {"prompt": "a", "sampling_params": {"max_tokens": 2**62}},
            {"prompt": "a", "sampling_params": {"min_tokens": 2**62}},
            {"prompt": "a", "sampling_params": {"seed": 2**64}},
            {"prompt": "a", "sampling_params": {"top_k": 2**40}},
            {"prompt": "a", "sampling_params": {"stop": ["s"] * 10_000}},
            {"prompt": "a", "sampling_params": {"stop_token_ids": [2**40]}},
            {"messages": [{"role": "user", "content": "m"}] * 5_000},
            {"prompt": "a", "sampling_params": {"stop": "s" * 100_000}},
        ]
    )
)
async def test_huge_fields(refused, seal_plaintext, huge):
    await refused(seal_plaintext(json.dumps(huge).encode()), ErrorCode.INVALID_INPUT)


CHAT = {"messages": [{"role": "user", "content": "Fuzz."}], "sampling_params": {"max_tokens": 4}}


@FUZZ
@given(
    field=st.sampled_from(
        ["structured_output", "tools", "tool_choice", "parallel_tool_calls",
         "chat_template_kwargs", "describe"]
    ),
    value=json_values | schema_shaped,
)  # fmt: skip
async def test_wrong_types_and_values_in_the_v1_1_fields(refused, seal_plaintext, field, value):
    plaintext = json.dumps({**CHAT, field: value}).encode()
    assume(not is_valid_request(plaintext))
    await refused(seal_plaintext(plaintext), ErrorCode.INVALID_INPUT)


@FUZZ
@given(message=st.dictionaries(schema_keys, json_values | schema_shaped, max_size=5))
async def test_random_messages(refused, seal_plaintext, message):
    plaintext = json.dumps({**CHAT, "messages": [message]}).encode()
    assume(not is_valid_request(plaintext))
    await refused(seal_plaintext(plaintext), ErrorCode.INVALID_INPUT)


@settings(FUZZ, max_examples=40)
@given(schema=st.dictionaries(st.sampled_from(
    ["type", "properties", "items", "enum", "const", "pattern", "minimum", "maxLength",
     "required", "anyOf", "$ref", "format", "additionalProperties"]
), json_values, max_size=4))  # fmt: skip
@example(schema={"enum": [-(2**63) - 1]})  # found by CI: msgpack carries 64 bits at most
async def test_schemas_the_backend_may_refuse_fail_cleanly_or_constrain(
    worker, client_channel, seal_plaintext, fuzz_tally, schema
):
    """A schema either compiles and the job streams, or fails INVALID_INPUT
    with a fixed reason: the protocol refuses it, it does not compile, or the
    backend finds no token that keeps to it (after some items, then)."""
    plaintext = json.dumps(
        {"prompt": "Fuzz.", "sampling_params": {"max_tokens": 8},
         "structured_output": {"json_schema": schema}}
    ).encode()  # fmt: skip
    outputs = await run_job(worker, seal_plaintext(plaintext))
    if "error" in outputs[-1]:
        error = ProtocolError.parse(outputs[-1]["error"])
        assert error.code is ErrorCode.INVALID_INPUT
        assert error.reason in (
            "a JSON document in the request has an integer beyond 64 bits",
            "the structured output or tools could not be compiled into a grammar",
            "the engine could not keep to the structured output",
        )
        assert all(client_channel.open_item(output) for output in outputs[:-1])
    else:
        assert client_channel.open_item(outputs[-1]).final
    fuzz_tally["test_schemas_the_backend_may_refuse_fail_cleanly_or_constrain"] += 1
