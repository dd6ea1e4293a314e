"""OpenAI's Responses API through the gateway, called by the unmodified
`openai` SDK (sync and async, streamed and not), by the OpenAI Agents SDK as
it is, and by raw HTTP for the SSE framing and the refusals. Texts are
checked against the engine's own greedy output for the chat messages the
request stands for: on the tiny model (whose answers end by the token limit,
so `incomplete`), and on the real model (which stops by itself). Reasoning
items and a failure mid-stream come from a loopback endpoint whose jobs this
test takes and answers itself."""

from __future__ import annotations

import itertools
import json
import os
import time
from typing import Annotated, Literal

import httpx
import jsonschema
import openai
import pydantic
import pytest

from encrypted_vllm.dev import local_endpoint
from encrypted_vllm.dev.english import looks_like_english
from encrypted_vllm.wire import channel, protocol
from encrypted_vllm.wire.protocol import StreamItem, ToolCallDelta, Usage
from tests.gateway_process import GatewayProcess
from tests.jobs import CLOCK, WEATHER, chat_prompt_ids, greedy_text
from tests.played_worker import PlayedWorker, in_background

MODEL = "Org/Tiny-Model"  # what the live worker's card names (tests/conftest.py)
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}  # vLLM's extra
ASK = "What is the weather in Paris this week?"
# The Responses API's function tools are flat.
WEATHER_TOOL = {"type": "function", **WEATHER["function"]}
CLOCK_TOOL = {"type": "function", **CLOCK["function"]}
PARAMETERS = {tool["name"]: tool["parameters"] for tool in (WEATHER_TOOL, CLOCK_TOOL)}

# The events of one output item, in OpenAI's order (deltas: one or more).
MESSAGE_EVENTS = [
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
]
REASONING_EVENTS = [
    "response.output_item.added",
    "response.content_part.added",
    "response.reasoning_text.delta",
    "response.reasoning_text.done",
    "response.content_part.done",
    "response.output_item.done",
]
CALL_EVENTS = [
    "response.output_item.added",
    "response.function_call_arguments.delta",
    "response.function_call_arguments.done",
    "response.output_item.done",
]
OPENING = ["response.created", "response.in_progress"]


@pytest.fixture
def sdk(gateway, gateway_key) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url, api_key=gateway_key, max_retries=0, timeout=60)


@pytest.fixture
def async_sdk(gateway, gateway_key) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.url, api_key=gateway_key, max_retries=0, timeout=60)


async def greedy_chat(engine, tokenizer, messages, max_tokens: int, tools=None, **options) -> str:
    ids = chat_prompt_ids(tokenizer, messages, tools)
    return await greedy_text(engine, ids, max_tokens, **options)


def kinds(events) -> list[str]:
    """The events' types, each run of deltas as one."""
    return [kind for kind, _ in itertools.groupby(event.type for event in events)]


def job_of(response_id: str) -> str:
    assert response_id.startswith("resp_")
    return response_id.removeprefix("resp_")


# --- The openai SDK, unmodified, on the tiny model --------------------------------


async def test_a_response_is_the_greedy_text_with_openais_fields_and_usage(
    sdk, live, engine, hf_tokenizer
):
    prompt = "Sanity check through the Responses API."
    answer = sdk.responses.create(
        model=MODEL, instructions="Be brief.", input=prompt, max_output_tokens=24, **GREEDY
    )
    # The same conversation as items: a developer message, a typed message of parts.
    as_items = sdk.responses.create(
        model=MODEL,
        input=[
            {"role": "developer", "content": "Be brief."},
            {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": prompt}],
            },
        ],
        max_output_tokens=24,
        **GREEDY,
    )

    rendered = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}]
    expected = await greedy_chat(engine, hf_tokenizer, rendered, 24)
    assert answer.output_text == as_items.output_text == expected
    job_id = job_of(answer.id)
    assert live.endpoint.jobs[job_id].status == "COMPLETED"  # the RunPod job behind it
    assert (answer.object, answer.model, answer.error) == ("response", MODEL, None)
    assert abs(answer.created_at - time.time()) < 60
    # The tiny model never stops by itself: the limit cut the answer.
    assert answer.status == "incomplete"
    assert answer.incomplete_details.reason == "max_output_tokens"
    (message,) = answer.output
    assert (message.type, message.role, message.status) == ("message", "assistant", "incomplete")
    assert message.id == f"msg_{job_id}_0"
    (part,) = message.content
    assert (part.type, part.text, part.annotations) == ("output_text", expected, [])
    prompt_tokens = len(chat_prompt_ids(hf_tokenizer, rendered))
    usage = answer.usage
    assert (usage.input_tokens, usage.output_tokens) == (prompt_tokens, 24)
    assert usage.total_tokens == prompt_tokens + 24
    assert usage.input_tokens_details.cached_tokens == 0
    assert usage.output_tokens_details.reasoning_tokens == 0
    # The request's settings, echoed as OpenAI does.
    assert (answer.instructions, as_items.instructions) == ("Be brief.", None)
    assert (answer.max_output_tokens, answer.temperature, answer.top_p) == (24, 0, None)
    assert (answer.tools, answer.tool_choice, answer.parallel_tool_calls) == ([], "auto", True)
    assert answer.text.format.type == "text" and answer.metadata == {}


async def test_a_stream_is_openais_events_in_order_with_the_whole_text(
    async_sdk, engine, hf_tokenizer
):
    prompt = "Stream the response, async."
    stream = await async_sdk.responses.create(
        model=MODEL, input=prompt, max_output_tokens=32, stream=True, **GREEDY
    )
    events = [event async for event in stream]

    expected = await greedy_chat(engine, hf_tokenizer, [{"role": "user", "content": prompt}], 32)
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert kinds(events) == [*OPENING, *MESSAGE_EVENTS, "response.incomplete"]
    created, in_progress, added, part_added, *rest = events
    deltas = [event for event in rest if event.type == "response.output_text.delta"]
    text_done, part_done, item_done, incomplete = rest[len(deltas) :]
    assert len(deltas) >= 2  # streamed, not in one piece
    assert "".join(delta.delta for delta in deltas) == text_done.text == expected
    assert part_done.part.text == item_done.item.content[0].text == expected
    for opening in (created, in_progress):
        assert opening.response.status == "in_progress" and opening.response.output == []
        assert opening.response.usage is None
    assert added.item.status == "in_progress" and added.item.content == []
    assert part_added.part.text == ""
    item_id = added.item.id
    assert {event.item_id for event in (part_added, *deltas, text_done, part_done)} == {item_id}
    assert item_done.item.id == item_id and item_done.item.status == "incomplete"
    final = incomplete.response
    assert final.status == "incomplete" and final.incomplete_details.reason == "max_output_tokens"
    assert final.output_text == expected and final.output[0].id == item_id
    assert final.usage.output_tokens == 32
    assert {event.response.id for event in (created, in_progress, incomplete)} == {final.id}
    assert item_id == f"msg_{job_of(final.id)}_0"


def test_a_stream_is_named_sse_events_without_done(gateway, gateway_key):
    body = {"model": MODEL, "input": "Framing.", "max_output_tokens": 8, "stream": True}
    headers = {"Authorization": f"Bearer {gateway_key}"}
    with httpx.stream(
        "POST", f"{gateway.url}/responses", json=body, headers=headers, timeout=60
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()

    events = raw.split("\n\n")
    assert events[-1] == "" and "[DONE]" not in raw
    numbers = []
    for event in events[:-1]:
        name, data = event.split("\n")
        payload = json.loads(data.removeprefix("data: "))
        assert name == f"event: {payload['type']}"
        numbers.append(payload["sequence_number"])
    assert numbers == list(range(len(numbers)))
    assert payload["type"] == "response.incomplete"


async def test_a_forced_function_call_has_arguments_that_validate_whole_and_streamed(
    sdk, async_sdk
):
    called = sdk.responses.create(
        model=MODEL,
        input=ASK,
        tools=[WEATHER_TOOL, CLOCK_TOOL],
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=200,
        temperature=0,
    )
    assert called.status == "completed" and called.incomplete_details is None
    (call,) = called.output
    assert (call.type, call.name, call.status) == ("function_call", "get_weather", "completed")
    assert call.call_id and call.id == f"fc_{job_of(called.id)}_0"
    jsonschema.validate(json.loads(call.arguments), WEATHER["function"]["parameters"])
    assert called.tool_choice.type == "function" and called.tool_choice.name == "get_weather"
    assert [tool.name for tool in called.tools] == ["get_weather", "get_time"]

    stream = await async_sdk.responses.create(
        model=MODEL,
        input=ASK,
        tools=[WEATHER_TOOL, CLOCK_TOOL],
        tool_choice="required",
        parallel_tool_calls=False,
        max_output_tokens=200,
        temperature=0,
        stream=True,
    )
    events = [event async for event in stream]
    assert kinds(events) == [*OPENING, *CALL_EVENTS, "response.completed"]
    added, *deltas, arguments_done, item_done, completed = events[2:]
    arguments = "".join(delta.delta for delta in deltas)
    assert added.item.arguments == "" and added.item.status == "in_progress"
    assert arguments == arguments_done.arguments == item_done.item.arguments
    (final,) = completed.response.output
    assert final.arguments == arguments and final.call_id == added.item.call_id
    jsonschema.validate(json.loads(arguments), PARAMETERS[final.name])


async def test_a_function_calls_result_round_trips_to_the_greedy_answer(sdk, engine, hf_tokenizer):
    asked = [{"role": "user", "content": ASK}]
    called = sdk.responses.create(
        model=MODEL,
        input=asked,
        tools=[WEATHER_TOOL, CLOCK_TOOL],
        tool_choice="required",
        max_output_tokens=200,
        temperature=0,
    )
    calls = called.output
    assert calls and {call.type for call in calls} == {"function_call"}
    # The SDK's own output items go back as they are, as agent loops send them.
    results = [
        {"type": "function_call_output", "call_id": call.call_id, "output": "18C and sunny"}
        for call in calls
    ]
    answer = sdk.responses.create(
        model=MODEL,
        input=[*asked, *calls, *results],
        tools=[WEATHER_TOOL, CLOCK_TOOL],
        tool_choice="none",
        max_output_tokens=16,
        **GREEDY,
    )

    rendered_calls = [
        {
            "id": call.call_id,
            "type": "function",
            "function": {"name": call.name, "arguments": json.loads(call.arguments)},
        }
        for call in calls
    ]
    rendered = [
        *asked,
        {"role": "assistant", "content": None, "tool_calls": rendered_calls},
        *(
            {"role": "tool", "tool_call_id": call.call_id, "content": "18C and sunny"}
            for call in calls
        ),
    ]
    expected = await greedy_chat(engine, hf_tokenizer, rendered, 16, tools=[WEATHER, CLOCK])
    assert answer.output_text == expected


class Point(pydantic.BaseModel):
    # Bounded, so that the random model's values end (tests/worker/test_generation.py).
    x: int = pydantic.Field(ge=-100, le=100)
    label: str = pydantic.Field(max_length=12)
    ok: bool


async def test_a_json_schema_text_format_answers_valid_json(async_sdk):
    """The SDK's own structured-output helper: it sends a strict json_schema
    `text.format` made from the pydantic model and parses the answer into it."""
    answer = await async_sdk.responses.parse(
        model=MODEL,
        input="A point, as JSON.",
        text_format=Point,
        max_output_tokens=200,
        temperature=0,
    )
    assert answer.status == "completed"
    assert isinstance(answer.output_parsed, Point)
    jsonschema.validate(json.loads(answer.output_text), Point.model_json_schema())
    assert answer.text.format.type == "json_schema" and answer.text.format.name == "Point"


def test_each_refusal_is_openais_error_object_naming_the_param(gateway, gateway_key, sdk):
    url, key = f"{gateway.url}/responses", {"Authorization": f"Bearer {gateway_key}"}
    base = {"model": MODEL, "input": "hi", "max_output_tokens": 2}

    def error(**request) -> dict:
        response = httpx.post(url, json={**base, **request}, headers=key, timeout=60)
        assert response.status_code == 400, response.text
        body = response.json()
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["type"] == "invalid_request_error"
        return body["error"]

    previous = error(previous_response_id="resp_abc")
    assert (previous["param"], previous["code"]) == (
        "previous_response_id",
        "unsupported_parameter",
    )
    assert "keeps no state" in previous["message"] and "whole conversation" in previous["message"]
    stored = error(store=True)
    assert (stored["param"], stored["code"]) == ("store", "unsupported_parameter")
    assert "stores no response" in stored["message"]
    unknown = error(frobnicate=1)
    assert (unknown["param"], unknown["code"]) == ("frobnicate", "unsupported_parameter")
    hosted = error(tools=[{"type": "web_search"}])
    assert (hosted["param"], hosted["code"]) == ("tools[0].type", "unsupported_parameter")
    assert "web_search" in hosted["message"] and "only function tools" in hosted["message"]
    assert error(include=["reasoning.encrypted_content"])["param"] == "include[0]"
    assert error(reasoning={"effort": "high"})["param"] == "reasoning.effort"
    assert error(conversation="conv_abc")["param"] == "conversation"
    reference = error(input=[{"role": "user", "content": "hi"}, {"type": "item_reference"}])
    assert reference["param"] == "input[1]"
    # The wire protocol's own rule, named at the caller's item.
    call = {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "[]"}
    not_an_object = error(input=[{"role": "user", "content": "hi"}, call])
    assert not_an_object["param"] == "input[1].arguments"
    assert "not a JSON object" in not_an_object["message"]

    # What the SDKs send and the gateway can honour is accepted.
    accepted = sdk.responses.create(
        **base,
        store=False,
        include=[],
        tools=[],
        metadata={"run": "7"},
        user="u",
        reasoning={},
        extra_body={"ignore_eos": True},
    )
    assert accepted.metadata == {"run": "7"} and accepted.usage.output_tokens == 2
    # The same refusal, as the SDK raises it.
    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        sdk.responses.create(**base, previous_response_id="resp_abc")


# --- Reasoning and a failure mid-stream, from a played worker -----------------------


@pytest.fixture(scope="module")
def played(tmp_path_factory):
    """A gateway (model `played`) in front of a loopback endpoint whose jobs
    the test takes and answers itself, as a worker would."""
    key = channel.generate_key()
    serving = local_endpoint.Serving(local_endpoint.LocalEndpoint(hold_s=0.2))
    directory = tmp_path_factory.mktemp("played-gateway")
    config = directory / "gateway.toml"
    config.write_text(f'[models.played]\nbase_url = "{serving.url}"\nmax_retries = 0\n')
    env = {
        **{name: value for name, value in os.environ.items() if name != "GATEWAY_API_KEY"},
        "RUNPOD_API_KEY": serving.endpoint.api_key,
        "ENCRYPTION_KEY": key,
    }
    process = GatewayProcess(["--config", str(config)], env, directory / "gateway.log")
    try:
        yield process, PlayedWorker(serving, key)
    finally:
        try:
            process.stop()
        finally:
            serving.close()


def played_sdk(process: GatewayProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=process.url, api_key="unused", max_retries=0, timeout=60)


# What a worker with a REASONING_PARSER and a TOOL_CALL_PARSER streams.
THINKING = [
    StreamItem(reasoning="The user asks "),
    StreamItem(reasoning="about Paris."),
    StreamItem(text="Let me check."),
    StreamItem(tool_calls=(ToolCallDelta(0, "call_a", "get_weather", '{"city": "Par'),)),
    StreamItem(tool_calls=(ToolCallDelta(0, arguments='is", "days": 2}'),)),
    StreamItem(tool_calls=(ToolCallDelta(1, "call_b", "get_time", '{"zone": "CET"}'),)),
    StreamItem(finish_reason="tool_calls", usage=Usage(40, 21)),
]


def test_reasoning_text_and_calls_are_output_items_whole_and_streamed(played):
    process, worker = played
    requests = []

    def answer_twice() -> None:
        for _ in range(2):
            job_id, request = worker.take()
            requests.append(request)
            for item in THINKING:
                worker.stream(job_id, item)

    answering = in_background(answer_twice)
    sdk = played_sdk(process)
    whole = sdk.responses.create(
        model="played", instructions="Think first.", input=ASK, tools=[WEATHER_TOOL, CLOCK_TOOL]
    )
    with sdk.responses.stream(
        model="played", instructions="Think first.", input=ASK, tools=[WEATHER_TOOL, CLOCK_TOOL]
    ) as stream:
        events = list(stream)
        streamed = stream.get_final_response()
    answering.join()

    # The wire request each job carried: instructions first, flat tools nested.
    for request in requests:
        assert [message.role for message in request.messages] == ["system", "user"]
        assert request.messages[0].content == "Think first."
        assert [tool.function.name for tool in request.tools] == ["get_weather", "get_time"]
        assert request.tools[0].function.parameters == WEATHER["function"]["parameters"]
        assert request.tool_choice is None  # "auto", the worker's default with tools
    assert kinds(events) == [
        *OPENING,
        *REASONING_EVENTS,
        *MESSAGE_EVENTS,
        *CALL_EVENTS,
        *CALL_EVENTS,
        "response.completed",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    for response in (whole, streamed):
        assert response.status == "completed"
        reasoning, message, weather, clock = response.output
        assert reasoning.type == "reasoning" and reasoning.summary == []
        assert [part.text for part in reasoning.content] == ["The user asks about Paris."]
        assert [part.type for part in reasoning.content] == ["reasoning_text"]
        assert message.type == "message" and response.output_text == "Let me check."
        assert (weather.call_id, weather.name) == ("call_a", "get_weather")
        assert json.loads(weather.arguments) == {"city": "Paris", "days": 2}
        assert (clock.call_id, clock.name, clock.arguments) == (
            "call_b",
            "get_time",
            '{"zone": "CET"}',
        )
        assert {item.status for item in response.output} == {"completed"}
        assert (response.usage.input_tokens, response.usage.output_tokens) == (40, 21)
        job_id = job_of(response.id)
        assert [item.id for item in response.output] == [
            f"{prefix}_{job_id}_{index}" for index, prefix in enumerate(["rs", "msg", "fc", "fc"])
        ]

    # A reasoning item sent back is dropped; the calls join one assistant message.
    def answer_briefly() -> None:
        job_id, request = worker.take()
        requests.append(request)
        worker.stream(job_id, StreamItem(text="Sunny.", finish_reason="stop", usage=Usage(9, 2)))

    answering = in_background(answer_briefly)
    results = [
        {"type": "function_call_output", "call_id": call_id, "output": "done"}
        for call_id in ("call_a", "call_b")
    ]
    again = sdk.responses.create(
        model="played", input=[{"role": "user", "content": ASK}, *whole.output, *results]
    )
    answering.join()
    assert again.output_text == "Sunny." and again.status == "completed"
    assert [message.role for message in requests[-1].messages] == [
        "user",
        "assistant",
        "tool",
        "tool",
    ]
    assistant = requests[-1].messages[1]
    assert assistant.content == [protocol.TextPart(type="text", text="Let me check.")]
    assert [call.id for call in assistant.tool_calls] == ["call_a", "call_b"]


def test_a_stream_that_fails_midway_ends_failed_and_the_sdk_raises(played):
    process, worker = played

    def first_text_then_failure() -> None:
        job_id, _ = worker.take()
        worker.stream(job_id, StreamItem(text="Hello"))
        time.sleep(0.3)
        worker.fail(job_id, "ENGINE_ERROR: generation failed")

    failing = in_background(first_text_then_failure)
    seen = []
    with pytest.raises(openai.APIError, match="generation failed") as raised:
        for event in played_sdk(process).responses.create(model="played", input="x", stream=True):
            seen.append(event)
    failing.join()

    assert raised.value.body["code"] == "engine_error"  # OpenAI's error object, nested
    assert kinds(seen) == [*OPENING, *MESSAGE_EVENTS[:3], "response.failed"]
    failed = seen[-1].response
    assert failed.status == "failed" and failed.error.code == "server_error"
    assert "generation failed" in failed.error.message
    (cut,) = failed.output
    assert cut.status == "incomplete" and cut.content[0].text == "Hello"


# --- The real model: a natural stop, and the OpenAI Agents SDK ----------------------


async def test_the_real_model_stops_by_itself_and_the_response_completes(
    real_gateway, gateway_key, real_engine, real_tokenizer
):
    sdk = openai.OpenAI(base_url=real_gateway.url, api_key=gateway_key, max_retries=0, timeout=120)
    (model,) = sdk.models.list().data
    prompt = "Write one sentence about the sea."
    stream = sdk.responses.create(
        model=model.id, input=prompt, max_output_tokens=96, temperature=0, stream=True
    )
    events = list(stream)

    messages = [{"role": "user", "content": prompt}]
    expected = await greedy_chat(real_engine, real_tokenizer, messages, 96, ignore_eos=False)
    assert kinds(events) == [*OPENING, *MESSAGE_EVENTS, "response.completed"]
    final = events[-1].response
    assert final.status == "completed" and final.incomplete_details is None
    assert final.output[0].status == "completed" and final.completed_at is not None
    assert final.output_text == expected and looks_like_english(expected), expected
    assert final.usage.output_tokens < 96


async def test_an_openai_agents_sdk_run_calls_its_tool_and_answers_greedily(
    real_gateway, gateway_key, real_engine, real_tokenizer
):
    from agents import Agent, ModelSettings, Runner, function_tool, set_tracing_disabled
    from agents.items import ToolCallItem, ToolCallOutputItem
    from agents.models.openai_responses import OpenAIResponsesModel

    set_tracing_disabled(True)  # its traces would go to OpenAI
    called = []

    @function_tool
    def get_weather(
        city: Literal["Paris", "Rome", "Oslo"], days: Annotated[int, pydantic.Field(ge=1, le=7)]
    ) -> str:
        """The weather in a city for the next days."""
        called.append((city, days))
        return "Sunny and 18C every day."

    client = openai.AsyncOpenAI(base_url=real_gateway.url, api_key=gateway_key, max_retries=0)
    (model,) = (await client.models.list()).data
    instructions = "You answer questions about the weather."
    agent = Agent(
        name="Weather",
        instructions=instructions,
        tools=[get_weather],
        model=OpenAIResponsesModel(model=model.id, openai_client=client),
        # Required on the first turn (one call: a forced array of calls would
        # run to the limit); the SDK resets it once the tool has run.
        model_settings=ModelSettings(
            tool_choice="required", parallel_tool_calls=False, temperature=0, max_tokens=64
        ),
    )
    question = "What is the weather in Oslo for the next three days?"
    result = await Runner.run(agent, question)

    (call,) = [item.raw_item for item in result.new_items if isinstance(item, ToolCallItem)]
    (output,) = [item.raw_item for item in result.new_items if isinstance(item, ToolCallOutputItem)]
    assert call.name == "get_weather" and len(called) == 1
    jsonschema.validate(json.loads(call.arguments), get_weather.params_json_schema)
    assert output["call_id"] == call.call_id
    # The conversation the SDK sent on its second turn, as chat messages.
    messages = [
        {"role": "system", "content": instructions},
        {"role": "user", "content": question},
        {
            "role": "assistant",
            "content": "",  # what the worker's renderer gives a message of calls alone
            "tool_calls": [
                {
                    "id": call.call_id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": json.loads(call.arguments)},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.call_id, "content": output["output"]},
    ]
    tools = [
        {
            "type": "function",
            "function": {
                "name": get_weather.name,
                "description": get_weather.description,
                "parameters": get_weather.params_json_schema,
                "strict": True,
            },
        }
    ]
    expected = await greedy_chat(
        real_engine, real_tokenizer, messages, 64, tools=tools, ignore_eos=False
    )
    assert result.final_output == expected and looks_like_english(expected), expected
