"""What constant-rate streaming (STREAM_INTERVAL_MS) costs a stream, against
the same stream unshaped, on the same engine, in one run.

    .venv/bin/python bench/shaping.py [--interval-ms 50] [--tokens 16,64,256]

Jobs go through Worker.handler on the worker's model (MODELS, else the tiny
offline model), one at a time, greedy, ignoring EOS, --repeats of each
length, alternating shaped (PADDING_BUCKET 256, STREAM_ITEMS_QUANTUM 16)
and plain. Per length, medians: the time to the first item with text, to
the item that ends the text (the final one), and to the stream's last item
(a shaped stream's filler after its text); the items posted; the bytes on
the wire (the sealed items as the runpod SDK posts them) per token. Then
the limit: the text one shaped stream can carry, a bucket per interval.
The last line is the result as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from encrypted_vllm.dev.verify import apply_offline_defaults  # noqa: E402
from encrypted_vllm.wire import (
    channel,  # noqa: E402
    protocol,  # noqa: E402
)
from encrypted_vllm.worker import shaping  # noqa: E402
from encrypted_vllm.worker.config import WorkerConfig  # noqa: E402

BUCKET, QUANTUM = 256, 16


async def one_stream(worker, sealer, tokens: int) -> dict:
    request = protocol.validate_request(
        prompt="Shape me.",
        sampling_params={"temperature": 0, "max_tokens": tokens, "ignore_eos": True},
    )
    job = {"id": f"bench-{time.monotonic_ns()}", "input": sealer.seal_request(request)}
    started = time.monotonic()
    first_text = text_end = None
    items = wire = 0
    async for output in worker.handler(job):
        now = time.monotonic()
        items += 1
        wire += len(json.dumps({"output": output}))
        item = sealer.open_item(output)
        if item.text and first_text is None:
            first_text = now
        if item.final:
            text_end = now
    last = time.monotonic()
    return {
        "ttft_ms": (first_text - started) * 1000,
        "text_ms": (text_end - started) * 1000,
        "stream_ms": (last - started) * 1000,
        "items": items,
        "bytes_per_token": wire / tokens,
    }


async def measure(config: WorkerConfig, args) -> dict:
    from vllm.utils.gc_utils import freeze_gc_heap

    from encrypted_vllm.worker import boot
    from encrypted_vllm.worker.handler import Worker

    engine = boot.start_engine(config)
    freeze_gc_heap()
    try:
        inbox = config.inbox()
        workers = {
            "plain": Worker(engine, inbox, max_items_per_s=config.max_items_per_s),
            "shaped": Worker(
                engine, inbox, shaper=shaping.Shaping(args.interval_ms / 1000, BUCKET, QUANTUM)
            ),
        }
        sealer = channel.Channel(config.encryption_key)
        await one_stream(workers["plain"], sealer, 8)  # warm-up
        results = {}
        for tokens in args.tokens:
            runs = {name: [] for name in workers}
            for _ in range(args.repeats):
                for name, worker in workers.items():
                    runs[name].append(await one_stream(worker, sealer, tokens))
            results[tokens] = {
                name: {
                    figure: round(statistics.median(run[figure] for run in streams), 1)
                    for figure in streams[0]
                }
                for name, streams in runs.items()
            }
        return results
    finally:
        engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interval-ms", type=float, default=50)
    parser.add_argument("--tokens", default="16,64,256")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    args.tokens = [int(count) for count in args.tokens.split(",")]
    apply_offline_defaults(os.environ, "tiny")  # the figures in docs/ are the tiny model's
    results = asyncio.run(measure(WorkerConfig.from_env(), args))
    head = (
        f"{'tokens':>6} {'':7} {'TTFT ms':>8} {'text ends':>10} {'stream ends':>12} "
        f"{'items':>6} {'B/token':>8}"
    )
    print(f"\ninterval {args.interval_ms:g} ms, bucket {BUCKET} B, quantum {QUANTUM}\n\n{head}")
    for tokens, row in results.items():
        for name, cells in row.items():
            print(
                f"{tokens:6d} {name:7} {cells['ttft_ms']:8.1f} {cells['text_ms']:10.1f} "
                f"{cells['stream_ms']:12.1f} {cells['items']:6.0f} {cells['bytes_per_token']:8.1f}"
            )
    empty = len(protocol.StreamItem().to_json())
    per_s = (BUCKET - empty) / (args.interval_ms / 1000)
    print(
        f"\nlimit: {BUCKET - empty} bytes of text an item, {per_s / 1000:.1f} kB/s a stream "
        f"(about {per_s / 4:.0f} tokens/s of English at 4 bytes a token)"
    )
    print(
        json.dumps(
            {"interval_ms": args.interval_ms, "limit_text_bytes_per_s": per_s, "levels": results}
        )
    )


if __name__ == "__main__":
    main()
