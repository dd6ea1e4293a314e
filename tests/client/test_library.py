"""The client library on the production path: a loopback RunPod endpoint and
the real worker process on the tiny model."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import pydantic
import pytest
from cryptography.fernet import Fernet

from encrypted_vllm.client import library as client
from encrypted_vllm.dev import local_endpoint
from encrypted_vllm.wire import channel, protocol
from encrypted_vllm.wire.protocol import ErrorCode
from tests.jobs import GREEDY, greedy_text


async def expected_text(engine, hf_tokenizer, prompt: str, max_tokens: int) -> str:
    return await greedy_text(engine, hf_tokenizer(prompt).input_ids, max_tokens)


def test_generate_key_prints_a_fernet_key():
    result = subprocess.run(
        [sys.executable, "client.py", "--generate-key"], capture_output=True, text=True, check=True
    )
    key = result.stdout.strip()
    assert len(key) == 44
    Fernet(key.encode())  # raises if it is not a key


def test_an_image_part_carries_the_images_bytes_and_type(tmp_path):
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (3, 2), (200, 10, 10)).save(buffer, format="PNG")
    png = buffer.getvalue()
    (tmp_path / "red.png").write_bytes(png)
    part = client.image_part(tmp_path / "red.png")
    header, _, data = part["image_url"]["url"].partition(",")
    assert (part["type"], header, base64.b64decode(data)) == (
        "image_url",
        "data:image/png;base64",
        png,
    )
    assert client.image_part(png) == part
    assert client.image_part(b"\xff\xd8\xff\xe0rest")["image_url"]["url"].startswith(
        "data:image/jpeg;base64,"
    )
    with pytest.raises(ValueError, match="give its media_type"):
        client.image_part(b"not an image")
    webp = client.image_part(b"anything", media_type="image/webp")
    protocol.validate_request(messages=[{"role": "user", "content": [webp]}])


def test_an_invalid_request_is_refused_before_anything_is_sent(live):
    jobs_before = set(live.endpoint.jobs)
    with live.client() as endpoint:
        with pytest.raises(pydantic.ValidationError, match="top_p"):
            endpoint.stream("hi", sampling_params={"top_p": 3})
    assert set(live.endpoint.jobs) == jobs_before


async def test_run_sync_gives_the_greedy_text_with_usage_and_timings(live, engine, hf_tokenizer):
    prompt = "Sanity check."
    with live.client() as endpoint:
        completion = endpoint.run_sync(prompt, sampling_params=GREEDY)

    assert completion.text == await expected_text(engine, hf_tokenizer, prompt, 24)
    assert completion.usage == protocol.Usage(len(hf_tokenizer(prompt).input_ids), 24)
    assert completion.finish_reason == "length"
    assert 0 < completion.ttft_s <= completion.total_s


async def test_chunks_arrive_while_the_job_is_still_generating(live, engine, hf_tokenizer):
    """More than one poll brings text: every poll but the last saw the job
    still IN_PROGRESS, so the text was not held back to the end."""
    prompt = "A long story."
    sampling = {**GREEDY, "max_tokens": 1500}
    with live.client() as endpoint:
        with endpoint.stream(prompt, sampling_params=sampling) as deltas:
            text = "".join(deltas)
    completion = deltas.completion

    assert text == await expected_text(engine, hf_tokenizer, prompt, 1500)
    assert completion.arrivals >= 2
    assert completion.usage.completion_tokens == 1500


async def test_the_async_client_streams_and_runs(live, engine, hf_tokenizer):
    prompt = "Sanity check, async."
    async with live.async_client() as endpoint:
        stream = await endpoint.stream(prompt, sampling_params=GREEDY)
        async with stream:
            text = "".join([delta async for delta in stream])
        completion = await endpoint.run_sync(prompt, sampling_params=GREEDY)

    expected = await expected_text(engine, hf_tokenizer, prompt, 24)
    assert text == completion.text == expected
    assert stream.completion.usage == completion.usage


def wait_for(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_closing_a_stream_cancels_the_job_and_aborts_it_in_the_engine(live):
    # Long enough to outlast the stop signal's way to the worker (the runpod
    # SDK polls its stop client_channel again a second after an empty answer).
    sampling = {**GREEDY, "max_tokens": 2000}
    with live.client() as endpoint:
        stream = endpoint.stream("Stop me.", sampling_params=sampling)
        next(stream)
        stream.close()
        job = stream.job
        assert job.status() == "CANCELLED"

    line = f"job {job.id} stopped early: request aborted, 0 unfinished in the engine"
    wait_for(lambda: line in live.worker_log())


def test_a_client_timeout_cancels_the_job(live):
    sampling = {**GREEDY, "max_tokens": 480}
    with live.client(timeout=0.05) as endpoint:
        stream = endpoint.stream("Too slow.", sampling_params=sampling)
        with pytest.raises(client.JobTimeout):
            for _ in stream:
                pass
        assert stream.job.status() == "CANCELLED"


async def test_an_abandoned_async_stream_cancels_the_job(live):
    async with live.async_client() as endpoint:
        stream = await endpoint.stream("Abandon me.", sampling_params={**GREEDY, "max_tokens": 480})
        await anext(stream)
        await stream.aclose()
        assert await stream.job.status() == "CANCELLED"


async def test_items_that_arrived_together_are_ready_at_once(live):
    """`ready()` takes, without waiting, what came with the item just read:
    the rest of that /stream answer (paced items, a poll every 0.25 s)."""
    async with live.async_client(poll_interval=0.25) as endpoint:
        stream = await endpoint.items("Together.", sampling_params={**GREEDY, "max_tokens": 300})
        async with stream:
            pieces = [[item, *stream.ready()] async for item in stream]
    items = [item for piece in pieces for item in piece]
    assert "".join(item.text for item in items) == stream.completion.text
    assert items[-1].final and stream.completion.usage.completion_tokens == 300
    assert len(pieces) < len(items)  # some answers brought several items
    assert stream.ready() == []


async def test_a_stream_cancelled_by_a_cancel_scope_still_cancels_the_job(live):
    """As an ASGI server stops a request whose caller disconnected: anyio's
    cancel scope cancels every later await of the task, the cancel's too."""
    import anyio

    async with live.async_client() as endpoint:
        stream = await endpoint.stream("Leave me.", sampling_params={**GREEDY, "max_tokens": 480})
        with anyio.CancelScope() as scope:
            async for _ in stream:
                scope.cancel()
        assert scope.cancelled_caught
    # Closing the client waited for the cancel, which ran in a task of its own.
    assert live.endpoint.jobs[stream.job.id].status == "CANCELLED"


def test_each_worker_error_code_reaches_the_caller_as_job_failed(live, key):
    request = protocol.validate_request(prompt="Sanity check.", sampling_params=GREEDY)
    sealed = channel.Channel(key).seal_request(request)
    an_hour_ago = int(time.time()) - 3600
    stale = Fernet(key.encode()).encrypt_at_time(b'{"prompt": "a"}', an_hour_ago).decode()
    foreign = channel.Channel(channel.generate_key()).seal_request(request)
    too_long = channel.Channel(key).seal_request(
        protocol.validate_request(prompt="word " * 3000, sampling_params={"max_tokens": 8})
    )

    live.submit_raw(sealed)  # accepted once
    cases = {
        ErrorCode.REPLAYED: sealed,
        ErrorCode.TOKEN_EXPIRED: {"ciphertext": stale},
        ErrorCode.DECRYPTION_FAILED: foreign,
        ErrorCode.INVALID_INPUT: too_long,
    }
    for code, job_input in cases.items():
        failure = live.failure_of(live.submit_raw(job_input))
        assert (failure.status, failure.code) == ("FAILED", code)


def test_two_tenants_on_one_worker_each_read_only_their_own_answers(live, tenant_key):
    with live.client() as alice, live.client(encryption_key=tenant_key) as bob:
        for own, other in ((alice, bob), (bob, alice)):
            answer = own.run_sync("Mine.", sampling_params=GREEDY)
            assert answer.usage.completion_tokens == 24
            # Every stored item opens under its own tenant's key, none under the other's.
            stored = live.stored_output(answer.job_id)
            assert "".join(own.channel.open_item(item).text for item in stored) == answer.text
            for item in stored:
                with pytest.raises(protocol.ProtocolError):
                    other.channel.open_item(item)
    log = live.worker_log()
    for key in (live.key, tenant_key):
        assert f'"key": "{channel.Key(key).id}"' in log


def test_a_wrong_api_key_is_an_authentication_error(live):
    with client.Client(base_url=live.serving.url, api_key="wrong", encryption_key=live.key) as c:
        with pytest.raises(client.AuthenticationError):
            c.run_sync("hi")


def test_an_unknown_endpoint_is_not_found(live):
    url = live.serving.url.replace("/v2/local", "/v2/no-such-endpoint")
    with client.Client(base_url=url, api_key=live.endpoint.api_key, encryption_key=live.key) as c:
        with pytest.raises(client.EndpointNotFound):
            c.run_sync("hi")


@pytest.fixture
def rate_limit(live):
    def limit(requests: int, per_s: float) -> None:
        live.endpoint.run_rate_limit = local_endpoint.RateLimit(requests, per_s)

    yield limit
    live.endpoint.run_rate_limit = None


def test_a_429_is_retried_until_the_job_is_taken(live, rate_limit):
    rate_limit(1, 0.5)
    refused_before = live.endpoint.counts["rate_limited"]
    with live.client() as endpoint:
        first = endpoint.run_sync("One.", sampling_params=GREEDY)
        second = endpoint.run_sync("Two.", sampling_params=GREEDY)
    assert first.usage.completion_tokens == second.usage.completion_tokens == 24
    assert live.endpoint.counts["rate_limited"] > refused_before


def test_a_429_that_persists_is_rate_limited(live, rate_limit):
    rate_limit(1, 60)
    with live.client(max_retries=1) as endpoint:
        endpoint.run_sync("One.", sampling_params=GREEDY)
        with pytest.raises(client.RateLimited):
            endpoint.run_sync("Two.", sampling_params=GREEDY)


async def test_100_concurrent_streaming_clients_each_get_their_own_text(live, engine, hf_tokenizer):
    prompts = [f"Client {n} asks about the quick brown fox." for n in range(100)]

    async def one(prompt: str) -> str:
        async with live.async_client() as endpoint:
            stream = await endpoint.stream(prompt, sampling_params=GREEDY)
            return "".join([delta async for delta in stream])

    texts = await asyncio.gather(*(one(prompt) for prompt in prompts))

    for prompt, text in zip(prompts, texts, strict=True):
        assert text == await expected_text(engine, hf_tokenizer, prompt, 24)


# --- Wire protocol v1.1 through the real worker process --------------------------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


async def test_a_tool_call_round_trip_runs_encrypted_through_the_worker(live, engine, hf_tokenizer):
    """The model calls a tool (forced), the caller answers with the tool's
    result, and the model's final answer is the engine's greedy text."""
    import jsonschema

    ask = [{"role": "user", "content": "Weather in Paris?"}]
    with live.client() as endpoint:
        called = endpoint.run_sync(
            messages=ask,
            tools=[WEATHER],
            tool_choice="required",
            sampling_params={"temperature": 0, "max_tokens": 100},
        )
        (call,) = called.tool_calls
        assert call.name == "get_weather" and called.finish_reason == "tool_calls"
        jsonschema.validate(json.loads(call.arguments), WEATHER["function"]["parameters"])

        history = [
            *ask,
            {"role": "assistant", "content": None, "tool_calls": [call.to_openai()]},
            {"role": "tool", "tool_call_id": call.id, "content": "18C and sunny"},
        ]
        sampling = {"temperature": 0, "max_tokens": 16, "ignore_eos": True}
        with endpoint.items(
            messages=history, tools=[WEATHER], tool_choice="none", sampling_params=sampling
        ) as items:
            streamed = [item for item in items]
        answer = items.completion

    rendered = [
        *ask,
        {
            **history[1],
            "tool_calls": [
                {
                    **call.to_openai(),
                    "function": {"name": call.name, "arguments": json.loads(call.arguments)},
                }
            ],
        },
        history[2],
    ]
    prompt_ids = hf_tokenizer.apply_chat_template(
        rendered, tools=[WEATHER], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert answer.text == await greedy_text(engine, prompt_ids, 16)
    assert answer.tool_calls == [] and answer.usage.prompt_tokens == len(prompt_ids)
    assert "".join(item.text for item in streamed) == answer.text


def test_a_json_schema_job_runs_encrypted_through_the_worker(live):
    import jsonschema

    schema = {
        "type": "object",
        # Bounded, so that the random model's answer must end (tests/test_real_model.py).
        "properties": {
            "answer": {"type": "integer", "minimum": 0, "maximum": 999},
            "sure": {"type": "boolean"},
        },
        "required": ["answer", "sure"],
        "additionalProperties": False,
    }
    with live.client() as endpoint:
        completion = endpoint.run_sync(
            messages=[{"role": "user", "content": "A number, as JSON."}],
            structured_output={"json_schema": schema},
            sampling_params={"temperature": 0, "max_tokens": 200},
        )
    jsonschema.validate(json.loads(completion.text), schema)
    assert completion.finish_reason == "stop"


def test_describe_tells_what_the_endpoint_serves(live):
    with live.client() as endpoint:
        card = endpoint.describe()
    assert card.protocol == "1.4" and card.model == "Org/Tiny-Model"
    assert (card.max_model_len, card.tool_call_parser, card.chat_template) == (2048, "hermes", True)
    assert (card.task, card.dimensions, card.matryoshka) == ("generate", None, False)
    assert (card.images, card.adapters) == (0, ())  # a text model, no LORA_MODULES


async def test_an_answer_names_the_stop_string_that_ended_it(live, engine, hf_tokenizer):
    prompt = "Stop somewhere in here."
    whole = await expected_text(engine, hf_tokenizer, prompt, 24)
    # A stop string of the greedy text's letters, past its start.
    start = next(i for i in range(4, len(whole) - 3) if whole[i : i + 3].isalpha())
    stop = whole[start : start + 3]
    with live.client() as endpoint:
        stopped = endpoint.run_sync(prompt, sampling_params={**GREEDY, "stop": ["\u2603", stop]})
        not_stopped = endpoint.run_sync(prompt, sampling_params=GREEDY)
    assert (stopped.text, stopped.finish_reason) == (whole[: whole.index(stop)], "stop")
    assert stopped.stop_sequence == stop
    assert (not_stopped.finish_reason, not_stopped.stop_sequence) == ("length", None)


def test_an_empty_prompt_is_refused_here_with_a_detailed_message(live):
    with live.client() as endpoint:
        with pytest.raises(pydantic.ValidationError, match="the prompt is empty"):
            endpoint.run_sync("")


def test_an_unreachable_endpoint_is_named_in_the_error():
    with client.Client(
        base_url="http://127.0.0.1:9/v2/nowhere",
        api_key="k",
        encryption_key=channel.generate_key(),
        max_retries=0,
    ) as nowhere:
        with pytest.raises(client.ServerError, match=r"cannot reach 127\.0\.0\.1:9"):
            nowhere.run_sync("hi")
