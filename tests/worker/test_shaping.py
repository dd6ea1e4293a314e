"""Constant-rate streaming: the shaper on its own (every item one bucket,
nothing lost or reordered, counts in whole quanta), then the observer's test
on the real worker through the loopback endpoint: what RunPod sees of two
different completions, shaped and not."""

from __future__ import annotations

import asyncio
import os
import statistics
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from encrypted_vllm.client import library as client
from encrypted_vllm.dev import local_endpoint
from encrypted_vllm.wire import protocol
from encrypted_vllm.wire.channel import Channel, generate_key
from encrypted_vllm.wire.protocol import StreamItem, ToolCallDelta, Usage
from encrypted_vllm.worker import shaping

BUCKET = 256


async def shaped(items: list[StreamItem], interval_s=0.001, quantum=4) -> list[StreamItem]:
    async def source():
        for item in items:
            yield item
            await asyncio.sleep(0)

    shaper = shaping.Shaping(interval_s, BUCKET, quantum)
    return [item async for item in shaper.shape(source(), time.monotonic())]


texts = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=300)


@settings(max_examples=60, deadline=None)
@given(st.lists(texts, min_size=1, max_size=12), st.lists(texts, max_size=3))
def test_every_item_is_one_bucket_and_the_stream_joins_to_what_came_in(pieces, arguments):
    calls = tuple(
        ToolCallDelta(index, f"call_{index}", "get_weather", argument)
        for index, argument in enumerate(arguments)
    )
    items = [StreamItem(piece, reasoning=piece[:3]) for piece in pieces[:-1]]
    items.append(StreamItem(pieces[-1], "stop", Usage(12, 345), tool_calls=calls))

    out = asyncio.run(shaped(items))

    sealer = Channel(generate_key())
    assert {len(sealer.seal_item(item)["ciphertext"]) for item in out} == {
        len(sealer.seal_item(StreamItem())["ciphertext"])
    }
    assert all(len(item.to_json()) <= BUCKET for item in out)
    assert len(out) % 4 == 0
    (final,) = [item for item in out if item.final]
    assert (final.finish_reason, final.usage) == ("stop", Usage(12, 345))
    assert all(item.empty for item in out[out.index(final) + 1 :])
    assert "".join(item.text for item in out) == "".join(item.text for item in items)
    assert "".join(item.reasoning for item in out) == "".join(item.reasoning for item in items)
    joined = protocol.join_tool_calls([call for item in out for call in item.tool_calls])
    assert [(call.id, call.arguments) for call in joined] == [(c.id, c.arguments) for c in calls]


def test_an_interval_with_nothing_new_posts_an_empty_item():
    async def slow_source():
        yield StreamItem("a")
        await asyncio.sleep(0.05)
        yield StreamItem("b", "stop", Usage(1, 2))

    async def run():
        shaper = shaping.Shaping(0.01, BUCKET, 1)
        return [item async for item in shaper.shape(slow_source(), time.monotonic())]

    out = asyncio.run(run())
    assert out[0].text == "a" and out[-1].text == "b" and out[-1].final
    assert any(item.empty for item in out[1:-1])


def test_logprobs_are_refused_under_shaping():
    # An entry of 20 alternatives cannot be split to fit a bucket.
    assert "STREAM_INTERVAL_MS" in shaping.NO_LOGPROBS


# --- The observer's test, on the real worker ----------------------------------

INTERVAL_MS, QUANTUM = 50, 16
# Two completions of different text and length, each within one quantum.
JOBS = [("Short.", 6), ("A longer one, with more to say.", 40)]


@pytest.fixture(scope="module")
def shaped_worker(worker_env, tmp_path_factory):
    env = {
        **os.environ,
        **worker_env,
        "STREAM_INTERVAL_MS": str(INTERVAL_MS),
        "STREAM_ITEMS_QUANTUM": str(QUANTUM),
    }
    with local_endpoint.Serving(local_endpoint.LocalEndpoint()) as serving:
        worker = local_endpoint.WorkerProcess(
            serving, env, tmp_path_factory.mktemp("shaped") / "worker.log"
        )
        try:
            worker.wait_ready(timeout_s=600)
            yield serving
        finally:
            worker.stop()


def observe(serving, key) -> list[tuple]:
    """Run JOBS one after the other; for each, what RunPod saw (post times,
    post sizes, the client's polls, when it ended), the completion, and the
    job's status when the client returned it."""
    seen = []
    with client.Client(
        base_url=serving.url,
        api_key=serving.endpoint.api_key,
        encryption_key=key,
        poll_interval=0.02,
    ) as endpoint:
        for prompt, tokens in JOBS:
            sampling = {"temperature": 0, "max_tokens": tokens, "ignore_eos": True}
            completion = endpoint.run_sync(prompt, sampling_params=sampling)
            job = serving.endpoint.jobs[completion.job_id]
            returned_while = job.status
            deadline = time.monotonic() + 30
            while job.status != "COMPLETED" or time.monotonic() < (job.finished or 0) + 0.3:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            seen.append(
                (
                    [at for at, _ in job.posts],
                    [size for _, size in job.posts],
                    completion,
                    job.polls,
                    returned_while,
                    job.finished,
                )
            )
    return seen


def test_an_observer_learns_only_a_bucket_of_a_shaped_stream(shaped_worker, live, key):
    shaped_runs = observe(shaped_worker, key)
    plain_runs = observe(live.serving, key)

    texts = [run[2].text for run in shaped_runs]
    assert texts == [run[2].text for run in plain_runs]  # the same two completions
    assert texts[0] != texts[1]
    assert [run[2].usage.completion_tokens for run in shaped_runs] == [6, 40]

    # Shaped: identical sizes, identical counts (a whole quantum), a steady clock.
    (short, long) = shaped_runs
    assert len(short[0]) == len(long[0]) == QUANTUM
    assert set(short[1]) == set(long[1]) and len(set(short[1])) == 1
    intervals = [
        (later - earlier) * 1000
        for times, *_ in shaped_runs
        for earlier, later in zip(times, times[1:], strict=False)
    ]
    jitter = max(abs(interval - INTERVAL_MS) for interval in intervals)
    print(
        f"\nshaped: {len(intervals)} intervals, median {statistics.median(intervals):.1f} ms, "
        f"max deviation {jitter:.1f} ms"
    )
    assert abs(statistics.median(intervals) - INTERVAL_MS) < 5
    durations = [times[-1] - times[0] for times, *_ in shaped_runs]
    assert abs(durations[0] - durations[1]) < INTERVAL_MS / 1000
    # The client returned at the final item, while the stream still ran,
    # and kept polling to its end.
    for *_, polls, returned_while, finished in shaped_runs:
        assert returned_while == "IN_PROGRESS"
        assert polls[-1] >= finished

    # Unshaped, what an observer learns: the item counts and sizes differ
    # with the completion, and the stream ends when the text does.
    plain_counts = [len(times) for times, *_ in plain_runs]
    plain_bytes = [sum(sizes) for _, sizes, *_ in plain_runs]
    print(f"unshaped: item counts {plain_counts}, bytes {plain_bytes}")
    assert plain_counts[0] < plain_counts[1] and plain_bytes[0] < plain_bytes[1]
