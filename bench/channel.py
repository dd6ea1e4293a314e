"""What encryption and length-hiding padding cost per streamed item.

    .venv/bin/python bench/channel.py

Seals the same stream of deltas (one English word each, as a fast network
streams them) three ways in one run: plaintext JSON (what an unencrypted
worker would post), Fernet without padding, and Fernet with the default
padding bucket. Reports microseconds per item and bytes on the wire per
token, as posted by the runpod SDK (`{"output": ...}` as JSON).

Then, for scale, what the runpod SDK spends posting each item to RunPod:
its own `stream_result`, 16 jobs at a time, to a loopback aiohttp server in
a child process that answers every post with 200, as RunPod's job-stream
endpoint does. Reports this process's CPU time per post.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import re
import socket
import statistics
import sys
import time
import timeit

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from encrypted_vllm.wire import channel
from encrypted_vllm.wire.protocol import StreamItem, Usage  # noqa: E402
from encrypted_vllm.worker.config import WorkerConfig  # noqa: E402

TEXT = (
    "Fernet guarantees that a message encrypted using it cannot be manipulated "
    "or read without the key. It uses AES in CBC mode with a 128-bit key for "
    "encryption and HMAC with SHA256 for authentication, and every token "
    "carries the time at which it was created. Streaming a completion token "
    "by token means one such token per delta, so its cost must stay small "
    "next to the engine's own time per token, and its size must not tell an "
    "observer how long each token was."
)
DELTAS = re.findall(r"\s*\S+", TEXT)


def stream(deltas: list[str]) -> list[StreamItem]:
    items = [StreamItem(text) for text in deltas[:-1]]
    items.append(StreamItem(deltas[-1], "stop", Usage(42, len(deltas))))
    return items


def measure(seal, items: list[StreamItem], repeats: int = 7) -> tuple[float, float]:
    """(microseconds per item, median of repeats; wire bytes per item)."""
    runs = timeit.repeat(lambda: [seal(item) for item in items], number=20, repeat=repeats)
    per_item_us = statistics.median(runs) / (20 * len(items)) * 1e6
    wire = sum(len(json.dumps({"output": seal(item)})) for item in items) / len(items)
    return per_item_us, wire


def _answer_posts(port: int) -> None:
    from aiohttp import web

    async def accept(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/v2/stream/{job}", accept)
    web.run_app(app, host="127.0.0.1", port=port, print=None)


async def _post_items(item: dict, posts: int, jobs: int) -> float:
    """CPU µs per post of the SDK's stream_result, `jobs` posting at once."""
    from runpod.http_client import AsyncClientSession
    from runpod.serverless.modules import rp_http

    async with AsyncClientSession() as session:

        async def job(number: int, count: int) -> None:
            for _ in range(count):
                await rp_http.stream_result(session, {"output": item}, {"id": f"job-{number}"})

        await job(0, 50)  # warm: connections open
        started = time.process_time()
        await asyncio.gather(*(job(n, posts // jobs) for n in range(jobs)))
        return (time.process_time() - started) / (posts // jobs * jobs) * 1e6


def sdk_post_us(item: dict, posts: int = 2000, jobs: int = 16) -> float:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # The SDK reads its post address and log level (the worker's default,
    # not DEBUG's line per post) from the environment at import.
    os.environ["RUNPOD_WEBHOOK_POST_STREAM"] = f"http://127.0.0.1:{port}/v2/stream/$ID?gpu=bench"
    os.environ["RUNPOD_LOG_LEVEL"] = WorkerConfig.model_fields["runpod_log_level"].default
    server = multiprocessing.get_context("spawn").Process(target=_answer_posts, args=(port,))
    server.start()
    try:
        for _ in range(100):
            with socket.socket() as attempt:
                if attempt.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        else:
            raise SystemExit("the loopback server for the SDK's posts did not start")
        return asyncio.run(_post_items(item, posts, jobs))
    finally:
        server.terminate()
        server.join()


def main() -> None:
    key = channel.generate_key()
    items = stream(DELTAS)
    ways = {
        "plaintext (no encryption)": lambda item: json.loads(item.to_json()),
        "Fernet, no padding": channel.Channel(key, item_bucket=0).seal_item,
        f"Fernet, padded to {channel.ITEM_BUCKET_BYTES} B": channel.Channel(key).seal_item,
    }
    results = {name: measure(seal, items) for name, seal in ways.items()}
    base_us, base_bytes = results["plaintext (no encryption)"]
    print(f"{len(items)} items, one word each\n")
    print(f"{'':30} {'µs/item':>8} {'bytes/token':>12} {'× plaintext bytes':>18}")
    for name, (micros, wire) in results.items():
        print(f"{name:30} {micros:8.1f} {wire:12.0f} {wire / base_bytes:18.2f}")
    padded = channel.Channel(key).seal_item
    lengths = {len(padded(item)["ciphertext"]) for item in items}
    print(f"\ndistinct ciphertext lengths with padding: {len(lengths)}")
    post_us = sdk_post_us(padded(items[0]))
    print(f"the runpod SDK's post of one item to RunPod: {post_us:.0f} µs of CPU")
    summary = {name: {"us_per_item": round(us, 2), "bytes_per_token": round(b, 1)}
               for name, (us, b) in results.items()}  # fmt: skip
    print(json.dumps({**summary, "sdk_post_us": round(post_us, 1)}))


if __name__ == "__main__":
    main()
