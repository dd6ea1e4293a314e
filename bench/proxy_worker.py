"""A RunPod worker built the way the official RunPod vLLM worker is built,
for bench/production.py to run beside this project's worker. Written here,
in our own words: no line of theirs is copied.

    VLLM_BASE_URL=http://127.0.0.1:PORT [PROXY_YIELD=reads|batched] [MAX_CONCURRENCY=30] \\
        <RunPod's worker variables> python bench/proxy_worker.py

The design it mirrors (github.com/runpod-workers/worker-vllm, read at
7a92503, 2026-08-20):

- src/main.py starts `vllm serve` on loopback, waits for its /health, then
  calls the runpod SDK's stock `runpod.serverless.start` with the handler,
  `concurrency_modifier` returning MAX_CONCURRENCY (default 30) and
  `return_aggregate_stream: True`. Here bench/production.py starts `vllm
  serve` (bench/throughput.py's `vllm_serve`) and this process, told the
  server's address by VLLM_BASE_URL, is the handler and the SDK's loop.
- src/handler.py takes RunPod's OpenAI passthrough input,
  `{"openai_route": ..., "openai_input": {...}}` (what RunPod's
  /openai/v1 route sends), opens a new `aiohttp.ClientSession` for each job
  (timeout 3600 s), POSTs the body to vLLM, and for a body with
  `"stream": true` yields every read of the response
  (`resp.content.iter_any()`) as a string, decoded as UTF-8 with
  replacement: raw SSE text, as many events as one read returned, one
  RunPod stream post each. An HTTP status of 400 or more, or a failed
  request, is yielded as `{"error": {...}}`. That is PROXY_YIELD=reads, the
  default.
- Before 2026-07-31 (commit 1e396e1) the official worker ran vLLM's
  OpenAI serving classes in its own process instead (src/engine.py,
  `OpenAIvLLMEngine._handle_chat_or_completion_request`): it yielded the
  raw SSE event strings (RAW_OPENAI_OUTPUT=1, the default), joined into one
  string per yield, in batches that grow from MIN_BATCH_SIZE=1 by
  BATCH_SIZE_GROWTH_FACTOR=3 up to DEFAULT_BATCH_SIZE=50 events
  (src/constants.py, `utils.BatchSize`): 1, 3, 9, 27, 50, 50, ... events a
  post, the `[DONE]` event counted as one. PROXY_YIELD=batched applies that
  batching to the events read from `vllm serve`.

Unlike the official worker, bench/production.py runs this one with
RUNPOD_LOG_LEVEL=INFO (ours's level): the official worker leaves the SDK at
its default, DEBUG in runpod 1.10.0, which logs every posted item, and
outputs must not be logged here. That spares the proxy a cost per item.

Left out, as no job of the benchmark needs them: the generic `route`/`body`
and legacy `prompt` input shapes, the look-up of a default model name (the
benchmark's requests name the model), and the check that the server
process is alive (bench/production.py watches it).
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator

import aiohttp

VLLM_BASE_URL = os.environ.get("VLLM_BASE_URL", "http://127.0.0.1:8000")
PROXY_YIELD = os.environ.get("PROXY_YIELD", "reads")
MAX_CONCURRENCY = int(os.environ.get("MAX_CONCURRENCY", "30"))  # the official default
REQUEST_TIMEOUT_S = 3600.0
# The earlier design's batching of SSE events per yield (PROXY_YIELD=batched).
MAX_EVENTS_A_YIELD, MIN_EVENTS_A_YIELD, EVENTS_GROWTH = 50, 1, 3


def failure(message: str) -> dict:
    return {"error": {"message": message, "type": "worker_error", "code": None}}


async def sse_events(content: aiohttp.StreamReader) -> AsyncIterator[str]:
    """The response's SSE events, each with its blank line, as strings."""
    lines: list[bytes] = []
    async for line in content:
        lines.append(line)
        if line in (b"\n", b"\r\n"):
            yield b"".join(lines).decode("utf-8", errors="replace")
            lines = []
    if lines:
        yield b"".join(lines).decode("utf-8", errors="replace")


async def batched(content: aiohttp.StreamReader) -> AsyncIterator[str]:
    """Events joined in batches of 1, 3, 9, 27, then 50 (see the docstring)."""
    size, batch = MIN_EVENTS_A_YIELD, []
    async for event in sse_events(content):
        if "data" not in event:
            continue
        batch.append(event)
        if len(batch) >= size:
            yield "".join(batch)
            batch = []
            size = min(size * EVENTS_GROWTH, MAX_EVENTS_A_YIELD)
    if batch:
        yield "".join(batch)


async def handler(job: dict) -> AsyncIterator:
    job_input = job.get("input") or {}
    body = job_input.get("openai_input")
    if not isinstance(body, dict):
        yield failure("job input must hold openai_route and openai_input")
        return
    route = job_input.get("openai_route") or "/v1/chat/completions"
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    headers = {"Content-Type": "application/json"}
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout, headers=headers) as session,
            session.post(f"{VLLM_BASE_URL}{route}", json=body) as response,
        ):
            if response.status >= 400:
                await response.read()
                yield failure(f"vLLM returned HTTP {response.status}")
                return
            if body.get("stream") is not True:
                yield await response.json(content_type=None)
            elif PROXY_YIELD == "batched":
                async for chunk in batched(response.content):
                    yield chunk
            else:
                async for chunk in response.content.iter_any():
                    yield chunk.decode("utf-8", errors="replace")
    except aiohttp.ClientError as error:
        yield failure(f"request to vLLM failed: {type(error).__name__}")


def main() -> None:
    if PROXY_YIELD not in ("reads", "batched"):
        raise SystemExit("PROXY_YIELD must be reads or batched")
    sys.argv = sys.argv[:1]  # the SDK reads its own flags from argv
    import runpod

    runpod.serverless.start(
        {
            "handler": handler,
            "concurrency_modifier": lambda _current: MAX_CONCURRENCY,
            "return_aggregate_stream": True,
        }
    )


if __name__ == "__main__":
    main()
