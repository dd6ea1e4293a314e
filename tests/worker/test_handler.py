"""The handler on the real engine: streamed text against the engine's own
greedy output, every refusal code, and the worker serving on after each."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from cryptography.fernet import Fernet

from encrypted_vllm.wire import channel, protocol
from encrypted_vllm.wire.protocol import ErrorCode
from tests.jobs import GREEDY, greedy_text, only_error, open_all, run_job


async def valid_job_succeeds(worker, client_channel, engine, hf_tokenizer) -> None:
    prompt = "The worker serves on."
    request = protocol.validate_request(prompt=prompt, sampling_params=GREEDY)
    items = open_all(client_channel, await run_job(worker, client_channel.seal_request(request)))
    expected = await greedy_text(engine, hf_tokenizer(prompt).input_ids, GREEDY["max_tokens"])
    assert "".join(item.text for item in items) == expected


async def test_prompt_job_streams_the_greedy_completion(
    worker, client_channel, engine, hf_tokenizer
):
    prompt = "Sanity check."
    request = protocol.validate_request(prompt=prompt, sampling_params=GREEDY)

    items = open_all(client_channel, await run_job(worker, client_channel.seal_request(request)))

    prompt_ids = hf_tokenizer(prompt).input_ids
    expected = await greedy_text(engine, prompt_ids, GREEDY["max_tokens"])
    assert "".join(item.text for item in items) == expected
    assert len(items) >= 2
    assert all(item.finish_reason is None and item.usage is None for item in items[:-1])
    assert items[-1].finish_reason == "length"
    assert items[-1].usage == protocol.Usage(len(prompt_ids), GREEDY["max_tokens"])


async def test_chat_job_applies_the_template_with_generation_prompt(
    worker, client_channel, engine, hf_tokenizer
):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Sanity check."},
    ]
    request = protocol.validate_request(messages=messages, sampling_params=GREEDY)

    items = open_all(client_channel, await run_job(worker, client_channel.seal_request(request)))

    prompt_ids = hf_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    expected = await greedy_text(engine, prompt_ids, GREEDY["max_tokens"])
    assert "".join(item.text for item in items) == expected
    assert items[-1].usage == protocol.Usage(len(prompt_ids), GREEDY["max_tokens"])


async def test_wrong_key_and_tampered_token_fail_decryption(
    worker, client_channel, engine, hf_tokenizer
):
    request = protocol.validate_request(prompt="Sanity check.", sampling_params=GREEDY)
    foreign = channel.Channel(channel.generate_key()).seal_request(request)
    token = bytearray(client_channel.seal_request(request)["ciphertext"], "ascii")
    token[len(token) // 2] ^= 0x01
    tampered = {"ciphertext": token.decode("ascii")}

    for job_input in (foreign, tampered):
        assert only_error(await run_job(worker, job_input)).code is ErrorCode.DECRYPTION_FAILED
        await valid_job_succeeds(worker, client_channel, engine, hf_tokenizer)


def _sealed_plaintext(key: str, plaintext: bytes) -> dict:
    return {"ciphertext": Fernet(key.encode()).encrypt(plaintext).decode()}


@pytest.mark.parametrize(
    "case",
    ["missing ciphertext", "not JSON", "unknown sampling field", "no prompt", "prompt too long"],
)
async def test_invalid_input_fails_and_the_worker_serves_on(
    case, key, worker, client_channel, engine, hf_tokenizer
):
    job_input = {
        "missing ciphertext": {"prompt": "Sanity check."},
        "not JSON": _sealed_plaintext(key, b"Sanity check."),
        "unknown sampling field": _sealed_plaintext(
            key, b'{"prompt": "Sanity check.", "sampling_params": {"beam_width": 4}}'
        ),
        "no prompt": _sealed_plaintext(key, b'{"sampling_params": {"max_tokens": 4}}'),
        "prompt too long": _sealed_plaintext(key, b'{"prompt": "' + b"word " * 5000 + b'"}'),
    }[case]

    error = only_error(await run_job(worker, job_input))

    assert error.code is ErrorCode.INVALID_INPUT
    assert "Sanity" not in str(error) and "beam_width" not in str(error)
    await valid_job_succeeds(worker, client_channel, engine, hf_tokenizer)


async def test_32_concurrent_jobs_each_get_their_own_text(
    worker, client_channel, engine, hf_tokenizer
):
    prompts = [f"Job {n}: the quick brown fox." for n in range(32)]
    requests = [protocol.validate_request(prompt=p, sampling_params=GREEDY) for p in prompts]

    results = await asyncio.gather(
        *(run_job(worker, client_channel.seal_request(request)) for request in requests)
    )

    for prompt, outputs in zip(prompts, results, strict=True):
        text = "".join(item.text for item in open_all(client_channel, outputs))
        assert text == await greedy_text(
            engine, hf_tokenizer(prompt).input_ids, GREEDY["max_tokens"]
        )


async def test_a_slow_consumer_gets_fewer_items_and_the_same_text(worker, client_channel):
    """In production each yield is an awaited HTTP post; meanwhile the engine
    merges deltas, so a slow network coalesces tokens and loses none."""
    request = protocol.validate_request(
        prompt="Sanity check.", sampling_params={**GREEDY, "max_tokens": 64}
    )

    fast = open_all(client_channel, await run_job(worker, client_channel.seal_request(request)))
    slow = []
    job = {"id": "slow-consumer", "input": client_channel.seal_request(request)}
    async for output in worker.handler(job):
        slow.append(client_channel.open_item(output))
        await asyncio.sleep(0.02)

    assert "".join(i.text for i in slow) == "".join(i.text for i in fast)
    assert slow[-1].usage == fast[-1].usage
    assert 1 <= len(slow) < len(fast)


async def test_a_replayed_or_expired_token_is_refused_and_the_worker_serves_on(
    key, worker, client_channel, engine, hf_tokenizer
):
    import time

    request = protocol.validate_request(prompt="Sanity check.", sampling_params=GREEDY)
    job_input = client_channel.seal_request(request)
    assert open_all(client_channel, await run_job(worker, job_input))
    assert only_error(await run_job(worker, job_input)).code is ErrorCode.REPLAYED

    an_hour_ago = int(time.time()) - 3600
    stale = Fernet(key.encode()).encrypt_at_time(b'{"prompt": "Sanity check."}', an_hour_ago)
    error = only_error(await run_job(worker, {"ciphertext": stale.decode()}))
    assert error.code is ErrorCode.TOKEN_EXPIRED
    await valid_job_succeeds(worker, client_channel, engine, hf_tokenizer)


@pytest.mark.parametrize("where", ["in the SDK's post", "waiting on the engine"])
async def test_a_cancelled_job_aborts_its_request_at_once(
    where, worker, client_channel, engine, caplog
):
    """RunPod's stop signal cancels the SDK's task for the job, wherever it
    waits: in its awaited post of an item (this generator then sits at a
    yield), or inside the handler, waiting for the engine. Either way the
    job logs its line, once, as cancelled."""
    caplog.set_level(logging.INFO, logger="worker")
    request = protocol.validate_request(
        prompt="Stop me.", sampling_params={**GREEDY, "max_tokens": 1500}
    )
    first_item = asyncio.Event()
    # Held elsewhere too, as the SDK's wrapper generator and the cancelled
    # task's traceback hold it: no garbage collection closes it for us.
    handler = worker.handler(
        {"id": f"cancel-{where}", "input": client_channel.seal_request(request)}
    )

    async def sdk_job() -> None:
        async for _ in handler:
            first_item.set()
            if where == "in the SDK's post":
                await asyncio.sleep(3600)  # the post the stop signal interrupts

    job = asyncio.create_task(sdk_job())
    await first_item.wait()
    if where == "waiting on the engine":
        await asyncio.sleep(0)  # let the job resume into the engine's stream
    assert engine.get_num_unfinished_requests() == 1
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job

    for _ in range(100):  # a few turns of the event loop
        if engine.get_num_unfinished_requests() == 0:
            break
        await asyncio.sleep(0.01)
    assert engine.get_num_unfinished_requests() == 0
    await handler.aclose()
    (line,) = [line for line in job_done_lines(caplog) if line["job"] == f"cancel-{where}"]
    assert line["outcome"] == "cancelled" and line["completion_tokens"] > 0


def job_done_lines(caplog) -> list[dict]:
    prefix = "job done "
    return [
        json.loads(record.getMessage().removeprefix(prefix))
        for record in caplog.records
        if record.name == "worker" and record.getMessage().startswith(prefix)
    ]


async def test_a_finished_job_logs_one_line_of_numbers_and_no_text(
    caplog, worker, client_channel, hf_tokenizer
):
    prompt = "Canary-7f3a says hello."
    request = protocol.validate_request(prompt=prompt, sampling_params=GREEDY)
    caplog.set_level(logging.INFO, logger="worker")

    items = open_all(client_channel, await run_job(worker, client_channel.seal_request(request)))

    (line,) = job_done_lines(caplog)
    assert line.pop("job").startswith("test-")
    assert line.pop("model") == worker.model_name
    assert line.pop("queue_wait_s") in (0, 1)  # whole seconds, as Fernet's timestamp
    assert 0 < line.pop("ttft_s") < 60
    assert line.pop("tokens_per_s") > 0
    assert line == {
        "key": client_channel.key_id,
        "outcome": "completed",
        "prompt_tokens": len(hf_tokenizer(prompt).input_ids),
        "completion_tokens": GREEDY["max_tokens"],
        "items": len(items),
        "finish_reason": "length",
    }
    completion = "".join(item.text for item in items)
    assert "Canary" not in caplog.text and completion not in caplog.text


async def test_a_failed_job_logs_its_error_code(caplog, key, worker):
    caplog.set_level(logging.INFO, logger="worker")

    only_error(await run_job(worker, _sealed_plaintext(key, b'{"prompt": 7}')))

    (line,) = job_done_lines(caplog)
    assert (line["outcome"], line["error"]) == ("failed", "INVALID_INPUT")
    assert line["completion_tokens"] == 0 and "ttft_s" not in line


async def test_pacing_merges_deltas_into_fewer_items_and_loses_nothing(
    engine, worker, client_channel
):
    """Under its item budget a stream's items carry several tokens each: the
    same text and usage as an item per engine step, in fewer encryptions."""
    from encrypted_vllm.worker.handler import Worker

    request = protocol.validate_request(
        prompt="Pace me.", sampling_params={**GREEDY, "max_tokens": 128}
    )
    every_step = Worker(engine, worker.inbox, max_items_per_s=0)
    paced = Worker(engine, worker.inbox, max_items_per_s=20)  # 50 ms an item

    unpaced_items = open_all(
        client_channel, await run_job(every_step, client_channel.seal_request(request))
    )
    paced_items = open_all(
        client_channel, await run_job(paced, client_channel.seal_request(request))
    )

    assert "".join(i.text for i in paced_items) == "".join(i.text for i in unpaced_items)
    assert paced_items[-1].usage == unpaced_items[-1].usage
    assert unpaced_items[-1].usage.completion_tokens == 128
    assert len(paced_items) < len(unpaced_items) / 2
