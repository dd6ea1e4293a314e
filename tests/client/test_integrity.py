"""Answers bound to their request (wire protocol v1.2): the real worker
behind a loopback endpoint that tampers with what it serves (tests/tampering.py),
and every client path: `run_sync`, `stream`, `items`, `AsyncClient`, a
finished job read back through `/status`, and the gateway.

Each tampering raises `StreamIntegrityError`, saying what was wrong and never
the text; honest loss of the stream's final item is recovered from
`/status`, with the whole answer."""

from __future__ import annotations

import os
import time

import httpx
import openai
import pytest

from encrypted_vllm.client.library import StreamIntegrityError
from encrypted_vllm.dev import local_endpoint
from tests.conftest import Live
from tests.gateway_process import GatewayProcess
from tests.tampering import TAMPERS, TamperingEndpoint, lost_final

GREEDY = {"temperature": 0, "max_tokens": 24, "ignore_eos": True}
WHAT_WAS_WRONG = {
    "replayed": "answers another request",
    "spliced": "answers another request",
    "swapped": "out of order",
    "dropped": "out of order",
    "repeated": "arrived twice",
    "cut": "ended without its final item",
}


@pytest.fixture(scope="module")
def tampering(worker_env, key, tmp_path_factory):
    """The real worker behind a TamperingEndpoint."""
    log_path = tmp_path_factory.mktemp("tampered-worker") / "worker.log"
    endpoint = TamperingEndpoint()
    with local_endpoint.Serving(endpoint) as serving:
        worker = local_endpoint.WorkerProcess(serving, {**os.environ, **worker_env}, log_path)
        try:
            worker.wait_ready(timeout_s=600)
            yield Live(serving, worker, key)
        finally:
            worker.stop()


def request(prompt: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}], "sampling_params": GREEDY}


def honest_answer(tampering: Live, prompt: str) -> str:
    """The honest text; the job is also the one the next tampering replays."""
    tampering.endpoint.tamper = None
    with tampering.client() as client:
        return client.run_sync(**request(prompt)).text


def by_run_sync(client, prompt):
    return client.run_sync(**request(prompt)).text


def by_stream(client, prompt):
    with client.stream(**request(prompt)) as deltas:
        return "".join(deltas)


def by_items(client, prompt):
    with client.items(**request(prompt)) as items:
        return "".join(item.text for item in items)


def completed(status, timeout_s: float = 60.0):
    """Polls `status()` every 20 ms until the job is COMPLETED; its last answer."""
    deadline = time.monotonic() + timeout_s
    while (answer := status())["status"] != "COMPLETED":
        assert time.monotonic() < deadline, "the job did not complete"
        time.sleep(0.02)
    return answer


def by_status(client, prompt):
    """A finished job read back later: /stream was drained by another
    reader, so its items come from /status."""
    job = client.submit(**request(prompt))
    completed(lambda: {"status": job.status()})
    client._call("GET", f"/stream/{job.id}")
    return job.result().text


PATHS = {"run_sync": by_run_sync, "stream": by_stream, "items": by_items, "status": by_status}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("tamper", TAMPERS)
def test_every_tampering_raises_on_every_path(tampering, tamper, path):
    honest = honest_answer(tampering, f"An honest answer before {tamper}.")
    tampering.endpoint.tamper = TAMPERS[tamper]
    with tampering.client() as client, pytest.raises(StreamIntegrityError) as caught:
        PATHS[path](client, f"Tampered by {tamper} through {path}.")
    assert WHAT_WAS_WRONG[tamper] in str(caught.value)
    assert honest[:8] not in str(caught.value)  # it says what was wrong, never the text


@pytest.mark.parametrize("tamper", TAMPERS)
async def test_every_tampering_raises_on_the_async_client(tampering, tamper):
    honest_answer(tampering, f"An honest answer before {tamper}, async.")
    tampering.endpoint.tamper = TAMPERS[tamper]
    async with tampering.async_client() as client:
        with pytest.raises(StreamIntegrityError):
            await client.run_sync(**request(f"Tampered by {tamper}, async."))
        with pytest.raises(StreamIntegrityError):
            async for _ in await client.stream(**request(f"Tampered by {tamper}, streamed.")):
                pass


@pytest.mark.parametrize("path", PATHS)
def test_an_honestly_lost_final_item_is_recovered_from_status(tampering, path):
    prompt = f"Lost at the end, through {path}."
    expected = honest_answer(tampering, prompt)
    tampering.endpoint.tamper = lost_final
    with tampering.client() as client:
        assert PATHS[path](client, prompt) == expected


async def test_an_honestly_lost_final_item_is_recovered_by_the_async_client(tampering):
    expected = honest_answer(tampering, "Lost at the end, async.")
    tampering.endpoint.tamper = lost_final
    async with tampering.async_client() as client:
        completion = await client.run_sync(**request("Lost at the end, async."))
    assert completion.text == expected and completion.finish_reason == "length"


def test_the_gateway_answers_tampering_with_openais_error_object(tampering, tmp_path):
    env = {
        **os.environ,
        "RUNPOD_API_KEY": tampering.endpoint.api_key,
        "ENCRYPTION_KEY": tampering.key,
    }
    gateway = GatewayProcess(["--base-url", tampering.serving.url], env, tmp_path / "gw.log")
    try:
        sdk = openai.OpenAI(base_url=gateway.url, api_key="unused", max_retries=0, timeout=60)
        (model,) = sdk.models.list().data
        honest_answer(tampering, "Before the gateway's replay.")
        tampering.endpoint.tamper = TAMPERS["replayed"]
        messages = [{"role": "user", "content": "Replayed at the gateway."}]
        extra = {"extra_body": {"ignore_eos": True}, "temperature": 0, "max_tokens": 24}
        with pytest.raises(openai.APIStatusError) as before_first_chunk:
            sdk.chat.completions.create(model=model.id, messages=messages, **extra)
        assert before_first_chunk.value.status_code == 502
        assert before_first_chunk.value.code == "stream_integrity"

        honest_answer(tampering, "Before the gateway's swap.")
        tampering.endpoint.tamper = TAMPERS["swapped"]
        stream = sdk.chat.completions.create(
            model=model.id, messages=messages, stream=True, **extra
        )
        with pytest.raises(openai.APIError) as mid_stream:
            for _chunk in stream:
                pass
        assert "out of order" in str(mid_stream.value)
    finally:
        gateway.stop()
    assert "stream_integrity" in gateway.log()


def test_the_raw_stream_carries_the_binding_and_the_order(tampering):
    """What a client in another language checks (docs/protocol.md)."""
    from encrypted_vllm.wire.channel import Channel, request_binding
    from encrypted_vllm.wire.protocol import validate_request

    tampering.endpoint.tamper = None
    channel = Channel(tampering.key)
    sealed = channel.seal_request(validate_request(**request("The raw stream.")))
    job_id = tampering.submit_raw(sealed)
    headers = {"Authorization": f"Bearer {tampering.endpoint.api_key}"}
    url = f"{tampering.serving.url}/status/{job_id}"
    status = completed(lambda: httpx.get(url, headers=headers).json())
    items = [channel.open_item(output) for output in status["output"]]
    assert [item.seq for item in items] == list(range(len(items)))
    assert {item.request for item in items} == {request_binding(sealed["ciphertext"])}
    assert items[-1].final and not any(item.final for item in items[:-1])
