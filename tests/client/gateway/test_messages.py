"""Anthropic's Messages API through the gateway, called by the unmodified
`anthropic` SDK (sync and async, `messages.create` and `messages.stream`)
against the gateway processes of conftest: in front of the tiny model's
worker (whose answers end by the token limit) and the real model's (whose
answers end by themselves). Texts are checked against the engine's own
greedy output of the equivalent chat messages. The SDK also reads events
made of worker items this test writes (a thinking block, interleaved tool
calls, a failure mid-stream), served to it by a mock transport."""

from __future__ import annotations

import json

import anthropic
import httpx
import httpx2
import jsonschema
import pytest

from encrypted_vllm.client.gateway.anthropic_messages import MessageEvents, message
from encrypted_vllm.client.gateway.api import ApiError
from encrypted_vllm.client.library import Completion
from encrypted_vllm.wire.protocol import StreamItem, ToolCallDelta, ToolCallResult, Usage
from tests.jobs import CLOCK, WEATHER, chat_prompt_ids, greedy_text

MODEL = "Org/Tiny-Model"  # what the live worker's card names (tests/conftest.py)
GREEDY = {"extra_body": {"temperature": 0}}  # the SDK has no temperature argument
ASK = [{"role": "user", "content": "What is the weather in Paris this week?"}]


def as_anthropic(tool: dict) -> dict:
    """An OpenAI function tool of tests/jobs.py, as Anthropic's tool."""
    function = tool["function"]
    described = {"description": function["description"]} if "description" in function else {}
    return {"name": function["name"], **described, "input_schema": function["parameters"]}


TOOLS = [as_anthropic(WEATHER), as_anthropic(CLOCK)]
WEATHER_SCHEMA = WEATHER["function"]["parameters"]


@pytest.fixture
def sdk(gateway, gateway_key) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=gateway.origin, api_key=gateway_key, max_retries=0, timeout=120
    )


@pytest.fixture
def async_sdk(gateway, gateway_key) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(
        base_url=gateway.origin, api_key=gateway_key, max_retries=0, timeout=120
    )


async def truth(engine, tokenizer, messages, max_tokens: int, tools=None) -> str:
    """The engine's greedy answer to these chat messages, ended by the model
    or by `max_tokens`, as the gateway's request (which cannot ignore EOS)."""
    prompt = chat_prompt_ids(tokenizer, messages, tools)
    return await greedy_text(engine, prompt, max_tokens, ignore_eos=False)


# --- The anthropic SDK, unmodified, on the tiny model ------------------------------


def test_the_sdks_model_list_names_the_workers_model(sdk):
    (model,) = sdk.models.list().data
    assert (model.id, model.type, model.display_name) == (MODEL, "model", MODEL)


async def test_a_message_is_the_greedy_text_with_anthropics_fields(sdk, live, engine, hf_tokenizer):
    answer = sdk.messages.create(
        model=MODEL,
        max_tokens=24,
        system="Be brief.",
        messages=[{"role": "user", "content": "Sanity check through Anthropic's API."}],
        metadata={"user_id": "caller-7"},  # accepted, not sent on
        **GREEDY,
    )

    rendered = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Sanity check through Anthropic's API."},
    ]
    expected = await truth(engine, hf_tokenizer, rendered, 24)
    (block,) = answer.content
    assert (block.type, block.text) == ("text", expected)
    assert (answer.type, answer.role, answer.model) == ("message", "assistant", MODEL)
    assert (answer.stop_reason, answer.stop_sequence) == ("max_tokens", None)
    job_id = answer.id.removeprefix("msg_")
    assert answer.id.startswith("msg_") and live.endpoint.jobs[job_id].status == "COMPLETED"
    prompt_tokens = len(chat_prompt_ids(hf_tokenizer, rendered))
    assert (answer.usage.input_tokens, answer.usage.output_tokens) == (prompt_tokens, 24)


async def test_a_stream_is_anthropics_events_in_order_and_the_whole_answer(
    sdk, engine, hf_tokenizer
):
    messages = [{"role": "user", "content": "Stream it the Anthropic way."}]
    kinds, texts = [], []
    with sdk.messages.stream(model=MODEL, max_tokens=32, messages=messages, **GREEDY) as stream:
        for event in stream:
            if event.type == "text":  # the SDK's own event, made of each text_delta
                texts.append(event.text)
            else:
                kinds.append(event.type)
        final = stream.get_final_message()

    expected = await truth(engine, hf_tokenizer, messages, 32)
    deltas = kinds.count("content_block_delta")
    assert kinds == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * deltas,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert deltas >= 2 and len(texts) == deltas  # streamed, not in one piece
    assert "".join(texts) == final.content[0].text == expected
    assert len(final.content) == 1 and final.stop_reason == "max_tokens"
    prompt_tokens = len(chat_prompt_ids(hf_tokenizer, messages))
    assert (final.usage.input_tokens, final.usage.output_tokens) == (prompt_tokens, 32)
    assert final.id.startswith("msg_") and final.model == MODEL


async def test_the_async_sdks_text_stream_joins_into_the_greedy_text(
    async_sdk, engine, hf_tokenizer
):
    messages = [{"role": "user", "content": [{"type": "text", "text": "Async, in text blocks."}]}]
    async with async_sdk.messages.stream(
        model=MODEL, max_tokens=20, messages=messages, **GREEDY
    ) as stream:
        text = "".join([piece async for piece in stream.text_stream])
        final = await stream.get_final_message()

    rendered = [{"role": "user", "content": "Async, in text blocks."}]
    assert text == final.content[0].text == await truth(engine, hf_tokenizer, rendered, 20)
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 20


def test_the_stream_is_named_sse_events_whose_type_is_their_name(gateway, gateway_key):
    body = {
        "model": MODEL,
        "max_tokens": 8,
        "messages": [{"role": "user", "content": "Framing."}],
        "stream": True,
    }
    headers = {"x-api-key": gateway_key, "anthropic-version": "2023-06-01"}
    with httpx.stream(
        "POST", f"{gateway.url}/messages", json=body, headers=headers, timeout=60
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()

    frames = raw.split("\n\n")
    assert frames[-1] == ""
    names = []
    for frame in frames[:-1]:
        name, data = frame.split("\n")
        assert name.startswith("event: ") and data.startswith("data: "), frame
        names.append(name.removeprefix("event: "))
        assert json.loads(data.removeprefix("data: "))["type"] == names[-1]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]


def test_a_forced_tool_use_has_an_input_that_validates(sdk):
    answer = sdk.messages.create(
        model=MODEL,
        max_tokens=200,
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
        **GREEDY,
    )
    (block,) = answer.content
    assert (block.type, block.name) == ("tool_use", "get_weather") and block.id
    jsonschema.validate(block.input, WEATHER_SCHEMA)
    assert (answer.stop_reason, answer.stop_sequence) == ("tool_use", None)


def test_a_streamed_tool_use_input_arrives_as_json_pieces(sdk):
    pieces, kinds = [], []
    with sdk.messages.stream(
        model=MODEL,
        max_tokens=200,
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
        **GREEDY,
    ) as stream:
        for event in stream:
            kinds.append(event.type)
            if event.type == "content_block_start":
                started = event.content_block
            if event.type == "input_json":  # the SDK's own event, of each input_json_delta
                pieces.append(event.partial_json)
        final = stream.get_final_message()

    (block,) = final.content
    assert (started.type, started.id, started.name) == ("tool_use", block.id, "get_weather")
    assert started.input == {} and len(pieces) >= 1
    assert json.loads("".join(pieces)) == block.input
    jsonschema.validate(block.input, WEATHER_SCHEMA)
    assert final.stop_reason == "tool_use" and kinds[-2:] == ["message_delta", "message_stop"]


async def test_a_tool_result_round_trip_is_the_greedy_text_of_the_chat(sdk, engine, hf_tokenizer):
    called = sdk.messages.create(
        model=MODEL,
        max_tokens=200,
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "any"},
        **GREEDY,
    )
    uses = [block for block in called.content if block.type == "tool_use"]
    assert called.stop_reason == "tool_use" and uses

    # The SDK's own blocks go back as they are, as agent loops send them.
    results = [
        {"type": "tool_result", "tool_use_id": use.id, "content": f"result {number}"}
        for number, use in enumerate(uses)
    ]
    history = [
        *ASK,
        {"role": "assistant", "content": called.content},
        {"role": "user", "content": [*results, {"type": "text", "text": "Thanks. Summarize."}]},
    ]
    answer = sdk.messages.create(
        model=MODEL,
        max_tokens=16,
        messages=history,
        tools=TOOLS,
        tool_choice={"type": "none"},
        **GREEDY,
    )

    calls = [
        {"id": use.id, "type": "function", "function": {"name": use.name, "arguments": use.input}}
        for use in uses
    ]
    rendered = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": calls},
        *[
            {"role": "tool", "tool_call_id": use.id, "content": f"result {number}"}
            for number, use in enumerate(uses)
        ],
        {"role": "user", "content": "Thanks. Summarize."},
    ]
    expected = await truth(engine, hf_tokenizer, rendered, 16, tools=[WEATHER, CLOCK])
    (block,) = answer.content
    assert block.text == expected and answer.stop_reason == "max_tokens"
    assert answer.usage.input_tokens == len(
        chat_prompt_ids(hf_tokenizer, rendered, [WEATHER, CLOCK])
    )


def test_an_output_format_answers_json_that_validates(sdk):
    answer = sdk.messages.create(
        model=MODEL,
        max_tokens=200,
        messages=ASK,
        output_config={"format": {"type": "json_schema", "schema": WEATHER_SCHEMA}},
        **GREEDY,
    )
    (block,) = answer.content
    jsonschema.validate(json.loads(block.text), WEATHER_SCHEMA)
    assert answer.stop_reason == "end_turn"  # the schema's end, not the limit


# --- Refusals, in Anthropic's error shape ---------------------------------------------


def assert_anthropic_error(caught: anthropic.APIStatusError, status: int, kind: str) -> str:
    assert caught.status_code == status
    assert set(caught.body) == {"type", "error"} and caught.body["type"] == "error"
    assert set(caught.body["error"]) == {"type", "message"}
    assert caught.body["error"]["type"] == kind
    return caught.body["error"]["message"]


def test_a_wrong_key_is_anthropics_authentication_error(gateway):
    wrong = anthropic.Anthropic(base_url=gateway.origin, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as caught:
        wrong.messages.create(model=MODEL, max_tokens=4, messages=ASK)
    assert_anthropic_error(caught.value, 401, "authentication_error")


@pytest.mark.parametrize(
    ("request_fields", "named"),
    [
        ({"extra_body": {"frequency_penalty": 1}}, "'frequency_penalty'"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "'tools[0]'"),
        ({"thinking": {"type": "enabled", "budget_tokens": 2048}}, "'thinking'"),
        ({"stop_sequences": ["stop"] * 17}, "MAX_STOP_STRINGS=16"),  # the wire's limit
        ({"tools": TOOLS, "tool_choice": {"type": "tool", "name": "nope"}}, "tool_choice"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "What is this?"},
                            {
                                "type": "document",
                                "source": {"type": "url", "url": "https://example.com/a.pdf"},
                            },
                        ],
                    }
                ]
            },
            "'messages[0].content[1]'",
        ),
        (
            {"messages": [*ASK, {"role": "assistant", "content": "The weather is"}]},
            "'messages[1]'",  # a prefill: the worker always starts a new turn
        ),
        ({"extra_body": {"temperature": 1.5}}, "'temperature'"),  # Anthropic's 0..1
    ],
)
def test_an_invalid_request_is_anthropics_bad_request_naming_the_field(sdk, request_fields, named):
    fields = {"model": MODEL, "max_tokens": 4, "messages": ASK, **request_fields}
    with pytest.raises(anthropic.BadRequestError) as caught:
        sdk.messages.create(**fields)
    assert named in assert_anthropic_error(caught.value, 400, "invalid_request_error")


def test_an_unknown_model_is_anthropics_not_found_error(sdk):
    with pytest.raises(anthropic.NotFoundError) as caught:
        sdk.messages.create(model="no-such-model", max_tokens=4, messages=ASK)
    assert_anthropic_error(caught.value, 404, "not_found_error")


# --- The SDK reading events of items written here -------------------------------------


def sdk_reading(events: list) -> anthropic.Anthropic:
    """An SDK whose every request is answered with these events, as the
    gateway frames them."""
    body = b"".join(event.encode() for event in events)

    def answer(_request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=body)

    transport = httpx2.MockTransport(answer)
    return anthropic.Anthropic(
        base_url="http://gateway.test",
        api_key="unused",
        max_retries=0,
        http_client=httpx2.Client(transport=transport),
    )


def events_of(batches: list[list[StreamItem]]) -> list:
    events = MessageEvents(response_id="msg_job-1", model=MODEL)
    return [*events.opening(), *(event for batch in batches for event in events.of(batch))]


def blocks(content) -> list[dict]:
    fields = ("type", "text", "thinking", "signature", "id", "name", "input")
    return [
        {name: value for name, value in block.to_dict().items() if name in fields}
        for block in content
    ]


def test_reasoning_text_and_tool_calls_stream_as_blocks_the_whole_answer_has():
    batches = [
        [StreamItem(reasoning="Let me "), StreamItem(reasoning="think.")],
        [
            StreamItem(text="Calling"),
            StreamItem(text=" now.", tool_calls=(ToolCallDelta(0, "call_a", "get_weather", "{"),)),
        ],
        [
            StreamItem(
                tool_calls=(
                    ToolCallDelta(0, arguments='"city": "Oslo", "days": 2}'),
                    ToolCallDelta(1, "call_b", "get_time", '{"zone": "CET"}'),
                )
            )
        ],
        [StreamItem(finish_reason="tool_calls", usage=Usage(11, 42))],
    ]
    sdk = sdk_reading(events_of(batches))
    with sdk.messages.stream(model=MODEL, max_tokens=64, messages=ASK) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()

    whole = message(
        Completion(
            text="Calling now.",
            finish_reason="tool_calls",
            usage=Usage(11, 42),
            job_id="job-1",
            ttft_s=None,
            total_s=1.0,
            arrivals=4,
            reasoning="Let me think.",
            tool_calls=[
                ToolCallResult("call_a", "get_weather", '{"city": "Oslo", "days": 2}'),
                ToolCallResult("call_b", "get_time", '{"zone": "CET"}'),
            ],
        ),
        response_id="msg_job-1",
        model=MODEL,
    )
    assert (
        blocks(final.content)
        == blocks(whole.content)
        == [
            {"type": "thinking", "thinking": "Let me think.", "signature": ""},
            {"type": "text", "text": "Calling now."},
            {
                "type": "tool_use",
                "id": "call_a",
                "name": "get_weather",
                "input": {"city": "Oslo", "days": 2},
            },
            {"type": "tool_use", "id": "call_b", "name": "get_time", "input": {"zone": "CET"}},
        ]
    )
    assert kinds.count("content_block_start") == kinds.count("content_block_stop") == 4
    assert final.stop_reason == whole.stop_reason == "tool_use"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (11, 42)
    assert final.id == whole.id == "msg_job-1"


def test_a_stop_string_ends_the_stream_with_its_stop_sequence():
    batches = [
        [StreamItem(text="one two")],
        [StreamItem(finish_reason="stop", usage=Usage(3, 2), stop_sequence=" three")],
    ]
    with sdk_reading(events_of(batches)).messages.stream(
        model=MODEL, max_tokens=8, messages=ASK
    ) as stream:
        final = stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", " three")


def test_an_empty_answer_is_one_empty_text_block():
    batches = [[StreamItem(finish_reason="stop", usage=Usage(3, 1))]]
    with sdk_reading(events_of(batches)).messages.stream(
        model=MODEL, max_tokens=8, messages=ASK
    ) as stream:
        final = stream.get_final_message()
    assert blocks(final.content) == [{"type": "text", "text": ""}]
    assert final.stop_reason == "end_turn"


@pytest.mark.parametrize(
    ("status", "kind"),
    [(502, "api_error"), (503, "overloaded_error"), (504, "timeout_error"), (500, "api_error")],
)
def test_a_job_that_fails_mid_stream_ends_with_an_error_event_the_sdk_raises(status, kind):
    events = MessageEvents(response_id="msg_job-1", model=MODEL)
    failure = ApiError(status, "the worker failed the job: generation failed", "server_error")
    stream_events = [
        *events.opening(),
        *events.of([StreamItem(text="partial")]),
        *events.failure(failure),
    ]
    sdk = sdk_reading(stream_events)
    texts = []
    with pytest.raises(anthropic.APIStatusError) as caught:
        with sdk.messages.stream(model=MODEL, max_tokens=8, messages=ASK) as stream:
            texts += stream.text_stream
    assert texts == ["partial"]
    assert caught.value.body == {
        "type": "error",
        "error": {"type": kind, "message": "the worker failed the job: generation failed"},
    }


# --- The real model: natural stops and stop sequences ------------------------------


@pytest.fixture
def real_sdk(real_gateway, gateway_key) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=real_gateway.origin, api_key=gateway_key, max_retries=0, timeout=300
    )


@pytest.fixture
def real_model_name(real_gateway, gateway_key) -> str:
    listed = httpx.get(f"{real_gateway.url}/models", headers={"x-api-key": gateway_key})
    (model,) = listed.json()["data"]
    return model["id"]


SEA = [{"role": "user", "content": "Write one sentence about the sea."}]


async def test_the_real_model_ends_its_turn_with_the_engines_greedy_answer(
    real_sdk, real_model_name, real_engine, real_tokenizer
):
    answer = real_sdk.messages.create(model=real_model_name, max_tokens=96, messages=SEA, **GREEDY)
    expected = await truth(real_engine, real_tokenizer, SEA, 96)
    (block,) = answer.content
    assert block.text == expected and expected
    assert (answer.stop_reason, answer.stop_sequence) == ("end_turn", None)
    assert answer.usage.input_tokens == len(chat_prompt_ids(real_tokenizer, SEA))
    assert answer.usage.output_tokens < 96


async def test_a_stop_sequence_ends_the_real_models_answer_there(
    real_sdk, real_model_name, real_engine, real_tokenizer
):
    whole = await truth(real_engine, real_tokenizer, SEA, 64)
    words = whole.split()
    assert len(words) >= 6, whole
    stop = f" {words[4]}"  # a stop string the greedy answer holds
    expected = whole[: whole.index(stop)]
    request = {"model": real_model_name, "max_tokens": 64, "messages": SEA, **GREEDY}

    answer = real_sdk.messages.create(stop_sequences=[stop, "never-written-7c1"], **request)
    with real_sdk.messages.stream(stop_sequences=[stop], **request) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()

    assert answer.content[0].text == streamed == final.content[0].text == expected
    assert (answer.stop_reason, answer.stop_sequence) == ("stop_sequence", stop)
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", stop)
