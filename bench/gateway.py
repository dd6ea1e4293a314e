"""What the gateway costs: the same streams through gateway.py, and through
the client library, on the same loopback endpoint and real worker, side by
side in one run.

    .venv/bin/python bench/gateway.py [--api chat|responses|messages]
                                      [--concurrency 1,64] [--tokens 128]

  (a) library: `client.AsyncClient` streaming in this process;
  (b) http:    `python3 gateway.py --base-url ...` in its own process, as a
               user runs it, streamed by plain HTTP (httpx reading the SSE
               lines, as curl or any minimal caller would) in this one;
  (c) sdk:     the same gateway, streamed by the API's own SDK
               (`openai.AsyncOpenAI`, or `anthropic.AsyncAnthropic`).

--api picks the gateway's route: OpenAI's chat completions (the default),
OpenAI's Responses API or Anthropic's Messages API. All send the same chat
(greedy, --tokens tokens, ignoring EOS on the chat route, the only one that
takes vLLM's `ignore_eos`) through the same client library code, (a) to
the endpoint, (b) and (c) to the gateway. (b) minus (a) is what the
gateway adds, the goals' measure; (c) minus (b) is what the API's SDK
itself costs its caller. It serves a
loopback endpoint and starts the real worker (`rp_handler.py`, MODELS unset:
the tiny offline model), warms all up, then at each concurrency C runs
rounds in which C callers stream back to back (C x --streams-per-client
streams, at least 16), the variants in turn, each first in turn, at least
--rounds times each and until the level has run for --seconds. TTFT runs
from the call to the first text the caller sees. Per variant: tokens/s of
the median round (all its tokens over its wall time) and TTFT p50/p95;
beside (b) and (c), the median over rounds of its tokens/s over (a)'s in
the same round, and of its TTFT p50 minus (a)'s, each with its 95%
confidence interval (bench/throughput.py says why paired rounds, and how
the goals are judged); and the CPU time per token of the caller (this
process, less the loopback endpoint's thread) and, in (b) and (c), of the
gateway's process (in (a) the caller does the polling and decryption that
the gateway does in the others).
The first 16 streams of each level must carry the same text in all. The
last line is the whole result as JSON (also written to --json).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import anthropic  # noqa: E402
import httpx  # noqa: E402
import openai  # noqa: E402
import psutil  # noqa: E402
from throughput import median_ci, percentile, verdict  # noqa: E402

from encrypted_vllm.client import library as client  # noqa: E402
from encrypted_vllm.dev.local_endpoint import LocalEndpoint, Serving, WorkerProcess  # noqa: E402
from encrypted_vllm.dev.verify import apply_offline_defaults  # noqa: E402

CHECKED_STREAMS = 16
MIN_STREAMS = 16
VARIANTS = ("library", "http", "sdk")  # (a), (b), (c)
# The issue's goals.
GOAL_TTFT_ADDED_MS = 5.0  # (b)'s TTFT p50 over (a)'s, at every level
GOAL_RATIO = 0.97  # (b)/(a) tokens/s, at GOAL_RATIO_LEVEL streams
GOAL_RATIO_LEVEL = 64


@dataclass
class Stream:
    ttft_s: float
    tokens: int
    text: str | None  # kept for the checked streams only


@dataclass
class Level:
    """One variant at one concurrency, over all its rounds."""

    streams: list[Stream] = field(default_factory=list)
    round_rates: list[float] = field(default_factory=list)
    round_ttfts: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        ttfts = [stream.ttft_s for stream in self.streams]
        return {
            "rounds": len(self.round_rates),
            "streams": len(self.streams),
            "tokens_per_s": round(statistics.median(self.round_rates), 1),
            "ttft_p50_ms": round(percentile(ttfts, 50) * 1000, 2),
            "ttft_p95_ms": round(percentile(ttfts, 95) * 1000, 2),
            "round_tokens_per_s": [round(rate, 1) for rate in self.round_rates],
            "round_ttft_p50_ms": [round(ttft * 1000, 2) for ttft in self.round_ttfts],
        }


def messages(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


class Library:
    """(a): the client library, straight to the endpoint."""

    def __init__(self, endpoint: client.AsyncClient, tokens: int, ignore_eos: bool):
        self.endpoint = endpoint
        self.sampling = {"temperature": 0, "max_tokens": tokens, "ignore_eos": ignore_eos}

    async def run(self, prompt: str, keep_text: bool) -> Stream:
        started = time.monotonic()
        first, pieces = None, []
        stream = await self.endpoint.stream(
            messages=messages(prompt), sampling_params=self.sampling
        )
        async with stream:
            async for text in stream:
                first = first or time.monotonic()
                pieces.append(text)
        tokens = stream.completion.usage.completion_tokens
        return Stream(first - started, tokens, "".join(pieces) if keep_text else None)


class Http:
    """(b): plain HTTP, through the gateway: each API's streaming request,
    its SSE events read line by line."""

    def __init__(self, http: httpx.AsyncClient, api: str, model: str, tokens: int):
        self.http, self.api = http, api
        self.path = {"chat": "chat/completions", "responses": "responses", "messages": "messages"}[
            api
        ]
        self.body = {"model": model, "temperature": 0, "stream": True}
        if api == "chat":
            self.body.update(
                max_tokens=tokens, stream_options={"include_usage": True}, ignore_eos=True
            )
        elif api == "responses":
            self.body["max_output_tokens"] = tokens
        else:
            self.body["max_tokens"] = tokens

    def _body(self, prompt: str) -> dict:
        key = "input" if self.api == "responses" else "messages"
        return {**self.body, key: messages(prompt)}

    def _read(self, event: dict) -> tuple[str | None, int | None]:
        """An event's text, and the completion's tokens if it says them."""
        if self.api == "chat":
            usage = event.get("usage")
            text = event["choices"][0]["delta"].get("content") if event["choices"] else None
            return text, usage["completion_tokens"] if usage else None
        kind = event["type"]
        if self.api == "responses":
            if kind == "response.output_text.delta":
                return event["delta"], None
            if kind in ("response.completed", "response.incomplete"):
                return None, event["response"]["usage"]["output_tokens"]
            return None, None
        if kind == "content_block_delta" and event["delta"]["type"] == "text_delta":
            return event["delta"]["text"], None
        if kind == "message_delta":
            return None, event["usage"]["output_tokens"]
        return None, None

    async def run(self, prompt: str, keep_text: bool) -> Stream:
        started = time.monotonic()
        first, pieces, tokens = None, [], 0
        async with self.http.stream("POST", self.path, json=self._body(prompt)) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue  # event names, blank separators, and [DONE]
                text, said = self._read(json.loads(line[len("data: ") :]))
                tokens = said if said is not None else tokens
                if text:
                    first = first or time.monotonic()
                    pieces.append(text)
        return Stream(first - started, tokens, "".join(pieces) if keep_text else None)


class Sdk:
    """(c): the API's own SDK, through the gateway."""

    def __init__(self, sdk, api: str, model: str, tokens: int):
        self.sdk, self.api, self.model, self.tokens = sdk, api, model, tokens

    async def run(self, prompt: str, keep_text: bool) -> Stream:
        started = time.monotonic()
        first, pieces, tokens = None, [], 0
        async for text, said in self._events(prompt):
            tokens = said if said is not None else tokens
            if text:
                first = first or time.monotonic()
                pieces.append(text)
        return Stream(first - started, tokens, "".join(pieces) if keep_text else None)

    async def _events(self, prompt: str):
        """(text, tokens) of each event, as the SDK gives them."""
        if self.api == "chat":
            stream = await self.sdk.chat.completions.create(
                model=self.model,
                messages=messages(prompt),
                max_tokens=self.tokens,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
            async for chunk in stream:
                text = chunk.choices[0].delta.content if chunk.choices else None
                yield text, chunk.usage.completion_tokens if chunk.usage else None
        elif self.api == "responses":
            stream = await self.sdk.responses.create(
                model=self.model,
                input=messages(prompt),
                max_output_tokens=self.tokens,
                temperature=0,
                stream=True,
            )
            async for event in stream:
                if event.type == "response.output_text.delta":
                    yield event.delta, None
                elif event.type in ("response.completed", "response.incomplete"):
                    yield None, event.response.usage.output_tokens
        else:
            stream = await self.sdk.messages.create(
                model=self.model,
                messages=messages(prompt),
                max_tokens=self.tokens,
                stream=True,
                extra_body={"temperature": 0},  # not an argument of the SDK's
            )
            async for event in stream:
                if event.type == "content_block_delta" and event.delta.type == "text_delta":
                    yield event.delta.text, None
                elif event.type == "message_delta":
                    yield None, event.usage.output_tokens


async def run_round(variant, prompts: list[str], concurrency: int, level: Level) -> None:
    """Every prompt once, `concurrency` streams at a time; adds to `level`."""
    queue = iter(enumerate(prompts))

    async def caller() -> list[tuple[int, Stream]]:
        done = []
        for index, prompt in queue:  # shared: each prompt goes to one caller
            done.append((index, await variant.run(prompt, index < CHECKED_STREAMS)))
        return done

    started = time.monotonic()
    results = await asyncio.gather(*(caller() for _ in range(concurrency)))
    wall_s = time.monotonic() - started
    streams = [stream for _, stream in sorted(itertools.chain(*results), key=lambda r: r[0])]
    level.streams += streams
    level.round_rates.append(sum(stream.tokens for stream in streams) / wall_s)
    level.round_ttfts.append(percentile([stream.ttft_s for stream in streams], 50))


def start_gateway(serving: Serving, key: str, log_path: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "RUNPOD_API_KEY": serving.endpoint.api_key, "ENCRYPTION_KEY": key}
    env.pop("GATEWAY_API_KEY", None)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "gateway.py"), "--base-url", serving.url, "--port", "0"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            process_group=0,  # this session, as local_endpoint.WorkerProcess explains
        )
    deadline = time.monotonic() + 60
    while not (found := re.search(r"OpenAI base URL: (\S+)", log_path.read_text())):
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the gateway did not start; see {log_path}")
        time.sleep(0.05)
    return process, found.group(1)


def compare(library: Level, gateway: Level, concurrency: int, judged: bool) -> dict:
    """`gateway` against `library`, round by round; against the goals if
    `judged`."""
    paired = [b / a for a, b in zip(library.round_rates, gateway.round_rates, strict=True)]
    added_ms = [
        (b - a) * 1000 for a, b in zip(library.round_ttfts, gateway.round_ttfts, strict=True)
    ]
    ratio_ci, added_ci = median_ci(paired), median_ci(added_ms)
    goals = {}
    if judged:
        goals[f"TTFT added <= {GOAL_TTFT_ADDED_MS} ms"] = verdict(
            *added_ci, lambda ms: ms <= GOAL_TTFT_ADDED_MS
        )
    if judged and concurrency == GOAL_RATIO_LEVEL:
        goals[f"(b)/(a) >= {GOAL_RATIO}"] = verdict(*ratio_ci, lambda r: r >= GOAL_RATIO)
    return {
        "pairs": len(paired),
        "over_library": round(statistics.median(paired), 3),
        "over_library_ci95": [_rounded(bound, 3) for bound in ratio_ci],
        "ttft_p50_added_ms": round(statistics.median(added_ms), 2),
        "ttft_p50_added_ms_ci95": [_rounded(bound, 2) for bound in added_ci],
        "goals": goals,
    }


@dataclass
class CpuClock:
    """CPU seconds a process has used, less those of one of its threads."""

    process: psutil.Process
    but_thread: int | None = None

    def seconds(self) -> float:
        times = self.process.cpu_times()
        spent = times.user + times.system
        for thread in self.process.threads() if self.but_thread else ():
            if thread.id == self.but_thread:
                spent -= thread.user_time + thread.system_time
        return spent


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _interval(bounds: list[float | None], form: str) -> str:
    return "[?]" if None in bounds else f"[{bounds[0]:{form}} to {bounds[1]:{form}}]"


async def measure(serving: Serving, key: str, gateway_url: str, gateway_pid: int, args) -> dict:
    count = max(max(args.concurrency) * args.streams_per_client, MIN_STREAMS)
    prompts = [f"Stream {n}: the quick brown fox jumps over the lazy dog." for n in range(count)]
    endpoint = client.AsyncClient(
        base_url=serving.url, api_key=serving.endpoint.api_key, encryption_key=key
    )
    openai_sdk = openai.AsyncOpenAI(
        base_url=gateway_url, api_key="unused", max_retries=0, timeout=600
    )
    sdk = openai_sdk
    if args.api == "messages":
        sdk = anthropic.AsyncAnthropic(
            base_url=gateway_url.removesuffix("/v1"), api_key="unused", max_retries=0, timeout=600
        )
    # Idle connections expire before uvicorn's keep-alive (5 s) ends them, so
    # that a request never goes out on a connection the gateway is closing.
    limits = httpx.Limits(max_connections=None, keepalive_expiry=1.0)
    http = httpx.AsyncClient(base_url=gateway_url + "/", timeout=600, limits=limits)
    model = (await openai_sdk.models.list()).data[0].id
    variants = {
        # Only the chat route takes vLLM's ignore_eos; the others' streams may
        # end early, the same way in every variant.
        "library": Library(endpoint, args.tokens, ignore_eos=args.api == "chat"),
        "http": Http(http, args.api, model, args.tokens),
        "sdk": Sdk(sdk, args.api, model, args.tokens),
    }
    # The loopback endpoint serves from a thread of this process: its CPU is
    # RunPod's, not the caller's.
    clocks = {
        "caller": CpuClock(psutil.Process(), serving._thread.native_id),
        "gateway": CpuClock(psutil.Process(gateway_pid)),
    }
    for variant in variants.values():  # warm-up
        await run_round(variant, prompts[:8], 8, Level())
    results = {}
    try:
        for concurrency in args.concurrency:
            levels = {name: Level() for name in variants}
            streams = max(concurrency * args.streams_per_client, MIN_STREAMS)
            # CPU seconds of each process during each variant's rounds.
            cpu_s = {(variant, process): 0.0 for variant in variants for process in clocks}
            started, round_ = time.monotonic(), 0
            while round_ < args.rounds or time.monotonic() - started < args.seconds:
                turn = round_ % len(VARIANTS)
                for name in VARIANTS[turn:] + VARIANTS[:turn]:
                    before = {key: clock.seconds() for key, clock in clocks.items()}
                    await run_round(variants[name], prompts[:streams], concurrency, levels[name])
                    for key, clock in clocks.items():
                        cpu_s[name, key] += clock.seconds() - before[key]
                round_ += 1
            checked = [
                [stream.text for stream in level.streams[:CHECKED_STREAMS]]
                for level in levels.values()
            ]
            if any(texts != checked[0] for texts in checked):
                raise SystemExit(f"the gateway's texts differ from the library's at {concurrency}")
            summaries = {name: level.summary() for name, level in levels.items()}
            for name, level in levels.items():
                tokens = sum(stream.tokens for stream in level.streams)
                for key in clocks:
                    summaries[name][f"{key}_cpu_us_per_token"] = round(
                        cpu_s[name, key] / tokens * 1e6, 1
                    )
            for name in ("http", "sdk"):
                summaries[name]["against_library"] = compare(
                    levels["library"], levels[name], concurrency, judged=name == "http"
                )
            results[concurrency] = summaries
            print(f"  concurrency {concurrency}: done", file=sys.stderr)
    finally:
        await endpoint.aclose()
        await openai_sdk.close()
        await sdk.close()
        await http.aclose()
    return results


def report(results: dict, args) -> None:
    head = (
        f"{'C':>4} {'variant':8} {'tok/s':>9} {'TTFT p50':>9} {'p95':>8} "
        f"{'CPU us/token':>20}   against (a): medians of paired rounds, 95% intervals"
    )
    title = f"{args.api}: {args.tokens} tokens a stream, greedy; times in ms"
    print(f"\n{title}\n\n{head}\n{'-' * len(head)}")
    for concurrency, level in results.items():
        for name in VARIANTS:
            s = level[name]
            beside = ""
            if against := s.get("against_library"):
                beside = (
                    f"   /(a) {against['over_library']:.3f} "
                    f"{_interval(against['over_library_ci95'], '.3f')} of {against['pairs']}"
                    f"  TTFT {against['ttft_p50_added_ms']:+.2f} "
                    f"{_interval(against['ttft_p50_added_ms_ci95'], '+.2f')} ms"
                )
            cpu = f"{s['caller_cpu_us_per_token']:.0f}"
            if name != "library":
                cpu += f" + {s['gateway_cpu_us_per_token']:.0f} gateway"
            print(
                f"{concurrency:4d} {name:8} {s['tokens_per_s']:9.1f} {s['ttft_p50_ms']:9.2f} "
                f"{s['ttft_p95_ms']:8.2f} {cpu:>20}{beside}"
            )
    print("\nGoals, (b) against (a) (met: all of the interval meets it; missed: none of it does):")
    for concurrency, level in results.items():
        goals = level["http"]["against_library"]["goals"]
        statuses = "; ".join(f"{goal}: {status}" for goal, status in goals.items())
        print(f"{concurrency:>4}  {statuses}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--api", choices=("chat", "responses", "messages"), default="chat")
    parser.add_argument("--concurrency", default="1,64", help="comma-separated levels")
    parser.add_argument("--tokens", type=int, default=128, help="output tokens per stream")
    parser.add_argument("--streams-per-client", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=10, help="least rounds of each a level")
    parser.add_argument("--seconds", type=float, default=120, help="least time a level runs")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    args.concurrency = [int(level) for level in args.concurrency.split(",")]

    apply_offline_defaults(os.environ, "tiny")  # the figures in docs/ are the tiny model's
    key = os.environ["ENCRYPTION_KEY"]
    logs = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    with Serving(LocalEndpoint()) as serving:
        worker = WorkerProcess(serving, os.environ, logs / "worker.log")
        gateway = None
        try:
            worker.wait_ready(3600)
            gateway, url = start_gateway(serving, key, logs / "gateway.log")
            results = asyncio.run(measure(serving, key, url, gateway.pid, args))
        finally:
            if gateway is not None:
                gateway.terminate()
                gateway.wait(30)
            worker.stop()

    report(results, args)
    result = {
        "api": args.api,
        "tokens_per_stream": args.tokens,
        "levels": {str(c): v for c, v in results.items()},
    }
    print(f"\nlogs: {logs}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
