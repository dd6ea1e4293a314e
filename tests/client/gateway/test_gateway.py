"""The gateway as its users run it: `python3 gateway.py` in front of the
loopback endpoint and the real worker process, called by the unmodified
`openai` SDK (sync and async, streamed and not), by LangChain and Agno as
they are, and by raw HTTP for the SSE framing and the error bodies. Texts
are checked against the engine's own greedy output. Failures come from the
real protocol: a closed port, a rate-limited loopback endpoint, and
loopback endpoints without a worker, whose jobs this test takes and answers
itself over RunPod's job API."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jsonschema
import openai
import pydantic
import pytest

from encrypted_vllm.dev import local_endpoint
from encrypted_vllm.wire import channel, protocol
from encrypted_vllm.wire.protocol import StreamItem
from tests.gateway_process import GatewayProcess
from tests.jobs import CLOCK, WEATHER, chat_prompt_ids, greedy_text
from tests.played_worker import PlayedWorker, in_background

ROOT = Path(__file__).resolve().parents[3]
MODEL = "Org/Tiny-Model"  # what the live worker's card names (tests/conftest.py)
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}
CANARY = "CANARY-7d2a51"
FERNET_TOKEN_PREFIX = "gAAAAA"


def wait_for(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture
def sdk(gateway, gateway_key) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url, api_key=gateway_key, max_retries=0, timeout=60)


@pytest.fixture
def async_sdk(gateway, gateway_key) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.url, api_key=gateway_key, max_retries=0, timeout=60)


async def greedy_chat(engine, hf_tokenizer, messages, max_tokens: int, tools=None) -> str:
    return await greedy_text(engine, chat_prompt_ids(hf_tokenizer, messages, tools), max_tokens)


# --- The openai SDK, unmodified ---------------------------------------------------


def test_the_models_route_names_the_workers_model(sdk, gateway):
    (model,) = sdk.models.list().data
    assert (model.id, model.object, model.owned_by) == (MODEL, "model", "runpod")
    assert gateway.url.startswith("http://127.0.0.1:")


async def test_a_chat_is_the_greedy_text_with_openais_fields_and_usage(
    sdk, live, engine, hf_tokenizer
):
    messages = [{"role": "user", "content": "Sanity check through the gateway."}]
    answer = sdk.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, **GREEDY)
    streamed = sdk.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=24, stream=True, **GREEDY
    )
    streamed_text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed)

    expected = await greedy_chat(engine, hf_tokenizer, messages, 24)
    assert answer.choices[0].message.content == streamed_text == expected
    assert answer.object == "chat.completion" and answer.model == MODEL
    assert abs(answer.created - time.time()) < 60
    job_id = answer.id.removeprefix("chatcmpl-")
    assert live.endpoint.jobs[job_id].status == "COMPLETED"  # the RunPod job behind it
    (choice,) = answer.choices
    assert (choice.index, choice.finish_reason, choice.logprobs) == (0, "length", None)
    assert (choice.message.role, choice.message.refusal, choice.message.tool_calls) == (
        "assistant",
        None,
        None,
    )
    prompt_tokens = len(chat_prompt_ids(hf_tokenizer, messages))
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (prompt_tokens, 24)
    assert answer.usage.total_tokens == prompt_tokens + 24


async def test_a_streamed_chat_opens_with_the_role_and_ends_with_usage(
    async_sdk, engine, hf_tokenizer
):
    messages = [
        {"role": "developer", "content": "Be brief."},  # OpenAI's newer name for system
        {"role": "user", "content": [{"type": "text", "text": "Stream it, async."}]},
    ]
    stream = await async_sdk.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_completion_tokens=32,
        max_tokens=4,  # max_completion_tokens wins
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY,
    )
    chunks = [chunk async for chunk in stream]

    rendered = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Stream it, async."},
    ]
    expected = await greedy_chat(engine, hf_tokenizer, rendered, 32)
    opening, *deltas, finish, usage = chunks
    assert opening.choices[0].delta.role == "assistant" and opening.choices[0].delta.content == ""
    assert "".join(chunk.choices[0].delta.content for chunk in deltas) == expected
    assert len(deltas) >= 2  # streamed, not in one piece
    assert finish.choices[0].finish_reason == "length"
    assert finish.choices[0].delta.content is None and finish.choices[0].delta.tool_calls is None
    assert usage.choices == [] and usage.usage.completion_tokens == 32
    assert usage.usage.prompt_tokens == len(chat_prompt_ids(hf_tokenizer, rendered))
    assert all(chunk.usage is None for chunk in chunks[:-1])
    assert {chunk.id for chunk in chunks} == {opening.id} and opening.id.startswith("chatcmpl-")
    assert {chunk.object for chunk in chunks} == {"chat.completion.chunk"}


async def test_completions_of_a_prompt_string_streamed_and_whole(
    sdk, async_sdk, engine, hf_tokenizer
):
    prompt = "A plain completion."
    streamed = sdk.completions.create(
        model=MODEL, prompt=prompt, max_tokens=20, stream=True, **GREEDY
    )
    chunks = list(streamed)
    whole = await async_sdk.completions.create(model=MODEL, prompt=prompt, max_tokens=20, **GREEDY)

    expected = await greedy_text(engine, hf_tokenizer(prompt).input_ids, 20)
    assert "".join(chunk.choices[0].text for chunk in chunks) == whole.choices[0].text == expected
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason == "length"
    assert {chunk.object for chunk in chunks} == {whole.object} == {"text_completion"}
    assert whole.id.startswith("cmpl-") and whole.usage.completion_tokens == 20
    assert whole.usage.prompt_tokens == len(hf_tokenizer(prompt).input_ids)


ASK = [{"role": "user", "content": "What is the weather in Paris this week?"}]


async def test_a_required_tool_call_and_its_result_round_trip(sdk, engine, hf_tokenizer):
    called = sdk.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=[WEATHER, CLOCK],
        tool_choice="required",
        max_tokens=200,
        temperature=0,
    )
    (choice,) = called.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    by_name = {
        tool["function"]["name"]: tool["function"]["parameters"] for tool in (WEATHER, CLOCK)
    }
    for call in choice.message.tool_calls:
        assert call.type == "function" and call.id
        jsonschema.validate(json.loads(call.function.arguments), by_name[call.function.name])

    # The SDK's own message object goes back as it is, as agent loops send it.
    results = [
        {"role": "tool", "tool_call_id": call.id, "content": "18C and sunny"}
        for call in choice.message.tool_calls
    ]
    history = [*ASK, choice.message, *results]
    answer = sdk.chat.completions.create(
        model=MODEL,
        messages=history,
        tools=[WEATHER, CLOCK],
        tool_choice="none",
        max_tokens=16,
        **GREEDY,
    )
    rendered_calls = [
        {
            "id": call.id,
            "type": "function",
            "function": {
                "name": call.function.name,
                "arguments": json.loads(call.function.arguments),
            },
        }
        for call in choice.message.tool_calls
    ]
    rendered = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": rendered_calls},
        *results,
    ]
    expected = await greedy_chat(engine, hf_tokenizer, rendered, 16, tools=[WEATHER, CLOCK])
    assert answer.choices[0].message.content == expected


# The model's own format, as the hermes parser reads it (tests/worker/test_generation.py):
# the regex makes the random model write it.
HERMES_CALLS = (
    r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome)", '
    r'"days": [1-7]\}\}\n</tool_call>\n<tool_call>\n\{"name": "get_time", '
    r'"arguments": \{"zone": "[A-Z]{3}"\}\}\n</tool_call>'
)


async def test_auto_tool_calls_stream_as_openai_tool_call_deltas(async_sdk):
    stream = await async_sdk.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=[WEATHER, CLOCK],
        tool_choice="auto",
        max_tokens=200,
        temperature=0,
        stream=True,
        extra_body={"structured_outputs": {"regex": HERMES_CALLS}},  # vLLM's field
    )
    calls: dict[int, dict] = {}
    content, finish_reasons, call_chunks = "", [], 0
    async for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        finish_reasons.append(chunk.choices[0].finish_reason)
        for piece in delta.tool_calls or ():
            call_chunks += 1
            call = calls.setdefault(piece.index, {"id": piece.id, "name": None, "arguments": ""})
            if piece.id is not None:  # the first piece of a call names it
                assert piece.type == "function" and piece.function.name
                call["name"] = piece.function.name
            call["arguments"] += piece.function.arguments or ""

    assert content == "" and finish_reasons[-1] == "tool_calls"
    assert [calls[index]["name"] for index in sorted(calls)] == ["get_weather", "get_time"]
    assert all(call["id"] for call in calls.values()) and call_chunks >= 2
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER["function"]["parameters"])
    jsonschema.validate(json.loads(calls[1]["arguments"]), CLOCK["function"]["parameters"])


class Point(pydantic.BaseModel):
    # Bounded, so that the random model's values end (tests/worker/test_generation.py).
    x: int = pydantic.Field(ge=-100, le=100)
    label: str = pydantic.Field(max_length=12)
    ok: bool


async def test_a_json_schema_response_format_answers_valid_json(async_sdk):
    """The SDK's own structured-output helper: it sends a strict json_schema
    format made from the pydantic model and parses the answer into it."""
    answer = await async_sdk.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "A point, as JSON."}],
        response_format=Point,
        max_tokens=200,
        temperature=0,
    )
    (choice,) = answer.choices
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Point)
    jsonschema.validate(json.loads(choice.message.content), Point.model_json_schema())


def test_logprobs_come_with_every_token(sdk):
    answer = sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Log-probabilities."}],
        max_tokens=6,
        logprobs=True,
        top_logprobs=3,
        **GREEDY,
    )
    entries = answer.choices[0].logprobs.content
    assert len(entries) == answer.usage.completion_tokens == 6
    for entry in entries:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].logprob == entry.logprob  # greedy: the likeliest


async def test_128_concurrent_streams_each_get_their_own_text(async_sdk, engine, hf_tokenizer):
    prompts = [f"Caller {n} asks the gateway about the quick brown fox." for n in range(128)]

    async def one(prompt: str) -> str:
        stream = await async_sdk.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=8,
            stream=True,
            **GREEDY,
        )
        return "".join([chunk.choices[0].delta.content or "" async for chunk in stream])

    texts = await asyncio.gather(*(one(prompt) for prompt in prompts))

    for prompt, text in zip(prompts, texts, strict=True):
        assert text == await greedy_chat(
            engine, hf_tokenizer, [{"role": "user", "content": prompt}], 8
        )


def test_items_that_arrive_together_make_one_chunk_with_nothing_lost():
    """What one /stream answer brings is relayed as one delta: the same text,
    each tool call's fragments joined, the last item's end."""
    from encrypted_vllm.client.gateway.openai_chat import joined

    items = [
        StreamItem(text="a", tool_calls=(protocol.ToolCallDelta(0, "call_0", "f", '{"x"'),)),
        StreamItem(
            text="b",
            tool_calls=(
                protocol.ToolCallDelta(0, arguments=": 1}"),
                protocol.ToolCallDelta(1, "call_1", "g", "{}"),
            ),
        ),
        StreamItem(text="c", finish_reason="tool_calls", usage=protocol.Usage(3, 5)),
    ]
    one = joined(items)
    assert (one.text, one.finish_reason, one.usage) == ("abc", "tool_calls", protocol.Usage(3, 5))
    assert one.tool_calls == (
        protocol.ToolCallDelta(0, "call_0", "f", '{"x": 1}'),
        protocol.ToolCallDelta(1, "call_1", "g", "{}"),
    )


# --- Agent frameworks, unmodified, as README's snippets build them -------------------


async def test_langchain_chats_and_calls_tools_through_the_gateway(
    gateway, gateway_key, engine, hf_tokenizer
):
    from langchain_openai import ChatOpenAI

    def chat_model(**options) -> ChatOpenAI:
        return ChatOpenAI(
            model=MODEL, base_url=gateway.url, api_key=gateway_key, max_retries=0, **options
        )

    prompt = "Hello from LangChain."
    expected = await greedy_chat(engine, hf_tokenizer, [{"role": "user", "content": prompt}], 16)
    greedy = chat_model(temperature=0, max_tokens=16, extra_body={"ignore_eos": True})
    assert greedy.invoke(prompt).content == expected
    assert "".join(chunk.content for chunk in greedy.stream(prompt)) == expected

    tools = chat_model(temperature=0, max_tokens=200).bind_tools(
        [WEATHER, CLOCK], tool_choice="get_weather"
    )
    (call,) = tools.invoke(ASK[0]["content"]).tool_calls
    assert call["name"] == "get_weather" and call["id"]
    jsonschema.validate(call["args"], WEATHER["function"]["parameters"])


async def test_an_agno_agent_answers_through_the_gateway(
    gateway, gateway_key, engine, hf_tokenizer, monkeypatch
):
    monkeypatch.setenv("AGNO_TELEMETRY", "false")  # its telemetry would leave loopback
    from agno.agent import Agent
    from agno.models.openai.like import OpenAILike

    model = OpenAILike(
        id=MODEL,
        base_url=gateway.url,
        api_key=gateway_key,
        temperature=0,
        max_tokens=16,
        extra_body={"ignore_eos": True},
        max_retries=0,
    )
    agent = Agent(model=model, telemetry=False)
    prompt = "Hello from Agno."
    expected = await greedy_chat(engine, hf_tokenizer, [{"role": "user", "content": prompt}], 16)
    assert agent.run(prompt).content == expected


# --- Raw HTTP: the SSE framing, the error bodies, disconnects -------------------------


def test_a_stream_is_sse_data_events_ending_with_done(gateway, gateway_key):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Framing."}],
        "max_tokens": 12,
        "stream": True,
        "ignore_eos": True,
    }
    headers = {"Authorization": f"Bearer {gateway_key}"}
    with httpx.stream(
        "POST", f"{gateway.url}/chat/completions", json=body, headers=headers, timeout=60
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()

    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = []
    for event in events[:-2]:
        assert event.startswith("data: ") and "\n" not in event, event
        chunks.append(json.loads(event.removeprefix("data: ")))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"] == [
        {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    ]
    for chunk in chunks:
        assert set(chunk) == {"id", "object", "created", "model", "choices"}
        assert chunk["object"] == "chat.completion.chunk" and chunk["model"] == MODEL


def test_each_refusal_is_openais_error_object_with_its_status(gateway, gateway_key, sdk):
    url, key = f"{gateway.url}/chat/completions", {"Authorization": f"Bearer {gateway_key}"}
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

    def error(status: int, **request) -> dict:
        response = httpx.post(url, timeout=60, **request)
        assert response.status_code == status, response.text
        body = response.json()
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
        return body["error"]

    unsupported = error(400, json={**chat, "logit_bias": {"1": 5}}, headers=key)
    assert (unsupported["param"], unsupported["code"]) == ("logit_bias", "unsupported_parameter")
    assert unsupported["type"] == "invalid_request_error"
    assert error(400, json={**chat, "n": 2}, headers=key)["param"] == "n"
    assert (
        error(400, json={**chat, "top_k": -7}, headers=key)["param"] == "top_k"
    )  # the wire's check
    assert "parse the JSON" in error(400, content=b"{not json", headers=key)["message"]
    refused = error(
        400, json={**chat, "messages": [{"role": "user", "content": "word " * 3000}]}, headers=key
    )
    assert (
        refused["code"] == "invalid_input"
        and "longer than the model's context" in refused["message"]
    )
    assert error(401, json=chat)["code"] == "invalid_api_key"
    assert (
        error(401, json=chat, headers={"Authorization": "Bearer wrong"})["code"]
        == "invalid_api_key"
    )
    missing = error(404, json={**chat, "model": "no-such-model"}, headers=key)
    assert (missing["param"], missing["code"]) == ("model", "model_not_found")

    # The same, as the SDK raises them.
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        sdk.chat.completions.create(**chat, logit_bias={"1": 5})
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(**{**chat, "model": "no-such-model"})
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=gateway.url, api_key="wrong", max_retries=0).models.list()


def test_a_caller_that_disconnects_has_its_job_cancelled(gateway, gateway_key, live):
    headers = {"Authorization": f"Bearer {gateway_key}"}
    long = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "A long answer, please."}],
        "max_tokens": 1900,
        "ignore_eos": True,
    }
    # Mid-stream: the first event names the job; then the caller hangs up.
    with httpx.stream(
        "POST", f"{gateway.url}/chat/completions", json={**long, "stream": True}, headers=headers
    ) as response:
        first = json.loads(next(response.iter_lines()).removeprefix("data: "))
    streamed_job = first["id"].removeprefix("chatcmpl-")
    wait_for(lambda: live.endpoint.jobs[streamed_job].status == "CANCELLED", 5)
    wait_for(lambda: f"job {streamed_job} stopped early" in live.worker_log())

    # Before a whole answer: the caller gives up waiting.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{gateway.url}/chat/completions", json=long, headers=headers, timeout=1)

    def left() -> list[dict]:
        return [line for line in gateway.request_lines() if line.get("status") == 499]

    wait_for(lambda: left(), 5)
    whole_job = left()[-1]["job"]
    wait_for(lambda: live.endpoint.jobs[whole_job].status == "CANCELLED", 5)
    (streamed_line,) = [line for line in gateway.request_lines() if line.get("job") == streamed_job]
    assert streamed_line["outcome"] == "disconnected"


def test_the_worker_refuses_runpods_plaintext_openai_route_pointing_to_the_gateway(live):
    plaintext = {
        "openai_route": "/v1/chat/completions",
        "openai_input": {"model": MODEL, "messages": [{"role": "user", "content": CANARY}]},
    }
    failure = live.failure_of(live.submit_raw(plaintext))
    assert failure.code is protocol.ErrorCode.INVALID_INPUT
    assert "encrypted-vllm-gateway" in failure.reason and CANARY not in str(failure)
    assert failure.job_id in live.worker_log() and CANARY not in live.worker_log()


def test_the_gateway_will_not_listen_beyond_loopback_without_a_key():
    env = {name: value for name, value in os.environ.items() if name != "GATEWAY_API_KEY"}
    result = subprocess.run(
        [
            sys.executable,
            "gateway.py",
            "--base-url",
            "http://127.0.0.1:9/v2/x",
            "--host",
            "0.0.0.0",
        ],
        cwd=ROOT,
        env={**env, "RUNPOD_API_KEY": "k", "ENCRYPTION_KEY": channel.generate_key()},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "GATEWAY_API_KEY" in result.stderr


# --- Several endpoints: fallbacks and every failure's status -------------------------


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Chain:
    """A gateway of several models (--config) and the endpoints behind them."""

    def __init__(self, gateway: GatewayProcess, played: PlayedWorker, queued, limited):
        self.gateway, self.played, self.queued, self.limited = gateway, played, queued, limited
        self.sdk = openai.OpenAI(base_url=gateway.url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def chain(live, tmp_path_factory):
    played_key = channel.generate_key()
    limit = local_endpoint.RateLimit(1, 3600)
    limit.take()  # spent: every /run is refused from now on
    endpoints = {
        "PLAYED": local_endpoint.LocalEndpoint(hold_s=0.2),
        "QUEUED": local_endpoint.LocalEndpoint(hold_s=0.2),  # no worker ever takes its jobs
        "LIMITED": local_endpoint.LocalEndpoint(run_rate_limit=limit),
    }
    servings = {name: local_endpoint.Serving(endpoint) for name, endpoint in endpoints.items()}
    down = f"http://127.0.0.1:{closed_port()}/v2/down"

    def model(url: str, keys: str = "", **options) -> str:
        lines = [f'base_url = "{url}"', "max_retries = 0"]
        if keys:
            lines += [f'api_key_env = "{keys}_API_KEY"', f'encryption_key_env = "{keys}_KEY"']
        lines += [f"{name} = {json.dumps(value)}" for name, value in options.items()]
        return "\n".join(lines)

    config = {
        "tiny": model(live.serving.url),
        "down": model(down, fallbacks=["tiny"]),
        "down-alone": model(down),
        "played": model(servings["PLAYED"].url, "PLAYED", fallbacks=["tiny"]),
        "played-alone": model(servings["PLAYED"].url, "PLAYED"),
        "queued": model(servings["QUEUED"].url, "QUEUED", timeout_s=1),
        "limited": model(servings["LIMITED"].url, "LIMITED", fallbacks=["tiny"]),
        "limited-alone": model(servings["LIMITED"].url, "LIMITED"),
        "wrong-key": model(live.serving.url, "WRONG"),
    }
    directory = tmp_path_factory.mktemp("chain")
    path = directory / "gateway.toml"
    path.write_text("".join(f"[models.{name}]\n{body}\n\n" for name, body in config.items()))
    env = {
        **{k: v for k, v in os.environ.items() if k != "GATEWAY_API_KEY"},  # loopback, no key
        "RUNPOD_API_KEY": live.endpoint.api_key,
        "ENCRYPTION_KEY": live.key,
        "PLAYED_API_KEY": endpoints["PLAYED"].api_key,
        "PLAYED_KEY": played_key,
        "QUEUED_API_KEY": endpoints["QUEUED"].api_key,
        "QUEUED_KEY": played_key,
        "LIMITED_API_KEY": endpoints["LIMITED"].api_key,
        "LIMITED_KEY": played_key,
        "WRONG_API_KEY": live.endpoint.api_key,
        "WRONG_KEY": channel.generate_key(),  # not one of the worker's keys
    }
    process = GatewayProcess(["--config", str(path)], env, directory / "gateway.log")
    played = PlayedWorker(servings["PLAYED"], played_key)
    try:
        yield Chain(process, played, endpoints["QUEUED"], endpoints["LIMITED"])
    finally:
        try:
            process.stop()
        finally:
            for serving in servings.values():
                serving.close()


def test_the_models_route_lists_every_configured_model(chain):
    names = [model.id for model in chain.sdk.models.list().data]
    assert names == [
        "tiny",
        "down",
        "down-alone",
        "played",
        "played-alone",
        "queued",
        "limited",
        "limited-alone",
        "wrong-key",
    ]


async def test_the_next_model_of_the_chain_serves_when_an_endpoint_cannot(
    chain, engine, hf_tokenizer
):
    messages = [{"role": "user", "content": "Fall back."}]
    expected = await greedy_chat(engine, hf_tokenizer, messages, 12)

    def ask(model: str) -> openai.types.chat.ChatCompletion:
        return chain.sdk.chat.completions.create(
            model=model, messages=messages, max_tokens=12, **GREEDY
        )

    def engine_error() -> None:
        job_id, request = chain.played.take()
        assert request.messages[0].content == "Fall back."  # the wire request, decrypted
        chain.played.fail(job_id, "ENGINE_ERROR: generation failed")

    played = in_background(engine_error)
    answers = {model: ask(model) for model in ("down", "limited", "played")}
    played.join()

    for answer in answers.values():
        assert answer.model == "tiny" and answer.choices[0].message.content == expected
    lines = {line.get("job"): line for line in chain.gateway.request_lines()}
    for model, answer in answers.items():
        line = lines[answer.id.removeprefix("chatcmpl-")]
        assert line["model"] == model
        assert (line["served_by"], line["fallbacks"], line["status"]) == ("tiny", [model], 200)
        assert line["endpoint"].endswith("/v2/local") and line["completion_tokens"] == 12
    assert chain.limited.counts["rate_limited"] >= 1


def test_each_failure_has_the_status_an_openai_client_expects(chain, live):
    def status(model: str, play=None) -> tuple[int, dict]:
        worker = in_background(play) if play else None
        response = httpx.post(
            f"{chain.gateway.url}/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": "x"}], "max_tokens": 4},
            timeout=60,
        )
        if worker:
            worker.join()
        return response.status_code, response.json()["error"]

    def failing(error: str):
        return lambda: chain.played.fail(chain.played.take()[0], error)

    def under_another_key() -> None:
        job_id, _ = chain.played.take()
        stranger = channel.Channel(channel.generate_key())
        chain.played.stream(job_id, StreamItem(text="x"), sealer=stranger)

    code, limited = status("limited-alone")
    assert (code, limited["code"]) == (429, "rate_limit_exceeded")
    assert status("down-alone")[0] == 502
    code, engine_failure = status("played-alone", failing("ENGINE_ERROR: generation failed"))
    assert (code, engine_failure["code"]) == (503, "engine_error")
    code, stopped = status("played-alone", failing("WORKER_STOPPED: submit it again"))
    assert (code, stopped["code"]) == (503, "worker_stopped")
    queued_before = set(chain.queued.jobs)
    code, timeout = status("queued")
    assert (code, timeout["code"]) == (504, "timeout")
    (queued_job,) = set(chain.queued.jobs) - queued_before
    assert chain.queued.jobs[queued_job].status == "CANCELLED"
    for model, play in (("wrong-key", None), ("played-alone", under_another_key)):
        code, mismatch = status(model, play)
        assert (code, mismatch["code"]) == (500, "decryption_failed")
        assert "ENCRYPTION_KEY" in mismatch["message"] and "do not match" in mismatch["message"]
    with pytest.raises(openai.RateLimitError):
        chain.sdk.chat.completions.create(
            model="limited-alone", messages=[{"role": "user", "content": "x"}]
        )


def test_a_failure_after_the_first_token_is_one_final_error_event(chain):
    def first_token_then_failure() -> None:
        job_id, _ = chain.played.take()
        chain.played.stream(job_id, StreamItem(text="Hello"))
        time.sleep(0.3)
        chain.played.fail(job_id, "ENGINE_ERROR: generation failed")

    played = in_background(first_token_then_failure)
    body = {"model": "played", "messages": [{"role": "user", "content": "x"}], "stream": True}
    with httpx.stream(
        "POST", f"{chain.gateway.url}/chat/completions", json=body, timeout=60
    ) as response:
        assert response.status_code == 200
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line]
    played.join()

    *chunks, last = map(json.loads, events)
    assert [chunk["choices"][0]["delta"].get("content") for chunk in chunks] == ["", "Hello"]
    assert last["error"]["code"] == "engine_error" and set(last) == {"error"}
    # Once a token has streamed, the fallback (tiny) does not serve it.
    (line,) = [
        line
        for line in chain.gateway.request_lines()
        if line.get("error") == "engine_error" and line.get("stream")
    ]
    assert "fallbacks" not in line and line["served_by"] == "played"

    played = in_background(first_token_then_failure)
    stream = chain.sdk.chat.completions.create(
        model="played", messages=[{"role": "user", "content": "x"}], stream=True
    )
    texts = []
    with pytest.raises(openai.APIError, match="generation failed"):
        for chunk in stream:
            texts.append(chunk.choices[0].delta.content)
    played.join()
    assert texts == ["", "Hello"]


# --- Nothing in the clear ---------------------------------------------------------------


def test_no_canary_key_or_ciphertext_in_the_gateways_log(gateway, gateway_key, sdk, live):
    """Every kind of request carries the canary, good and refused; the log
    has one line per request, and none of them holds the canary."""
    requests_before = len(gateway.request_lines())
    tool = {
        "type": "function",
        "function": {
            "name": "canary_tool",
            "description": CANARY,
            "parameters": {
                "type": "object",
                "properties": {"q": {"type": "string", "enum": [CANARY]}},
            },
        },
    }
    messages = [{"role": "system", "content": CANARY}, {"role": "user", "content": f"{CANARY} hi"}]
    sdk.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, **GREEDY)
    streamed = sdk.chat.completions.create(
        model=MODEL,
        messages=messages,
        tools=[tool],
        tool_choice="required",
        max_tokens=200,
        stream=True,
    )
    assert [chunk.choices[0].finish_reason for chunk in streamed][-1] == "tool_calls"
    sdk.completions.create(model=MODEL, prompt=CANARY, max_tokens=4, stop=[CANARY])
    sdk.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=40,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": CANARY, "schema": {"type": "object", "title": CANARY}},
        },
    )
    refused = [
        {"model": CANARY, "messages": messages},
        {"model": MODEL, "messages": messages, CANARY: 1},
        {"model": MODEL, "messages": [{"role": CANARY, "content": CANARY}]},
        {"model": MODEL, "messages": [{"role": "user", "content": CANARY * 2000}]},
        {"model": MODEL, "messages": messages, "structured_outputs": {"regex": f"({CANARY}"}},
    ]
    headers = {"Authorization": f"Bearer {gateway_key}"}
    for body in refused:
        response = httpx.post(
            f"{gateway.url}/chat/completions", json=body, headers=headers, timeout=60
        )
        assert response.status_code >= 400
    httpx.get(f"{gateway.origin}/{CANARY}", headers=headers)
    httpx.post(
        f"{gateway.url}/chat/completions", json={"model": MODEL}, headers={"Authorization": CANARY}
    )

    log = gateway.log()
    assert len(gateway.request_lines()) - requests_before == 4 + len(refused) + 2
    assert CANARY not in log
    for secret in (live.key, live.endpoint.api_key, gateway_key):
        assert secret not in log
    assert FERNET_TOKEN_PREFIX not in log
