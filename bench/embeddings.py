"""Embeddings through this worker against the engine's own limit, on the
offline embedding model (all-MiniLM-L6-v2), side by side in one run.

    .venv/bin/python bench/embeddings.py [--concurrency 1,64] [--inputs-per-request 1]

  (a) engine:  the raw AsyncLLMEngine in this process: each input rendered
               by vLLM's renderer and pooled by `engine.encode`;
  (b) handler: this project's Worker.handler on that same engine: a sealed
               `embed` request per --inputs-per-request inputs (decryption,
               validation, rendering, one engine request per input, the
               vectors' base64, padding and encryption of every item, the
               per-job log line); the client's encryption and decryption run
               off the clock, as a client does them on its own machine.

At each concurrency C, C callers send requests back to back (C x
--requests-per-client of them, at least 64); (a) and (b) alternate, each
first in turn, at least --rounds times each and until the level has run
for --seconds. Reported per variant: inputs/s of the median round (all its
inputs over its wall time) and CPU seconds per 1000 inputs of this process
tree (engine processes included); beside (b), the median over rounds of
(b)/(a) inputs/s, paired round by round, with its 95% confidence interval
(bench/throughput.py says why), and the goal's verdict: (b)/(a) >= 0.9 at
64 concurrent requests. The first 16 vectors of every level must be the
same in both (cosine >= 0.9999). The last line is the whole result as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import psutil  # noqa: E402
from throughput import cpu_seconds, median_ci, verdict  # noqa: E402

from encrypted_vllm.dev import real_model  # noqa: E402
from encrypted_vllm.wire import channel, protocol  # noqa: E402
from encrypted_vllm.worker.config import WorkerConfig  # noqa: E402

CHECKED = 16
MIN_REQUESTS = 64
GOAL_RATIO, GOAL_LEVEL = 0.9, 64
_ids = itertools.count()


class EngineRunner:
    """(a): vLLM's renderer and `encode`, one input at a time."""

    def __init__(self, engine):
        from vllm import PoolingParams
        from vllm.renderers.inputs.preprocess import parse_model_prompt

        self.engine, self.params = engine, PoolingParams(task="embed")
        self.parse = lambda text: parse_model_prompt(engine.model_config, text)

    def prepare(self, requests: list[list[str]]) -> None:
        pass

    async def run(self, index: int, inputs: list[str]) -> list[list[float]]:
        vectors = []
        for text in inputs:
            (engine_input,) = self.engine.renderer.render_cmpl([self.parse(text)])
            encoding = self.engine.encode(engine_input, self.params, f"a-{next(_ids)}")
            outputs = [output async for output in encoding]
            vectors.append(outputs[-1].outputs.data.tolist())
        return vectors

    def finish(self, results: dict[int, list]) -> None:
        pass


class HandlerRunner:
    """(b): sealed `embed` jobs through Worker.handler; items opened after the round."""

    def __init__(self, worker, sealer: channel.Channel):
        self.worker, self.sealer = worker, sealer
        self._inputs: dict[int, dict] = {}

    def prepare(self, requests: list[list[str]]) -> None:
        self._inputs = {
            index: self.sealer.seal_request(protocol.validate_request(embed={"input": inputs}))
            for index, inputs in enumerate(requests)
        }

    async def run(self, index: int, inputs: list[str]) -> list[dict]:
        job = {"id": f"b-{next(_ids)}", "input": self._inputs.pop(index)}
        return [output async for output in self.worker.handler(job)]

    def finish(self, results: dict[int, list]) -> None:
        for index, sealed in results.items():
            items = [self.sealer.open_item(output) for output in sealed]
            embeddings = sorted(
                (each for item in items for each in item.embeddings), key=lambda each: each.index
            )
            results[index] = [each.vector for each in embeddings]


async def run_round(
    runner, requests: list[list[str]], concurrency: int
) -> tuple[float, float, dict]:
    """Every request once, `concurrency` at a time: inputs/s, CPU s per 1000 inputs, vectors."""
    runner.prepare(requests)
    queue = iter(enumerate(requests))
    results: dict[int, list] = {}

    async def caller() -> None:
        for index, inputs in queue:  # shared: each request goes to one caller
            results[index] = await runner.run(index, inputs)

    here = psutil.Process()
    started, cpu_before = time.monotonic(), cpu_seconds(here)
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    wall_s, cpu_s = time.monotonic() - started, cpu_seconds(here) - cpu_before
    runner.finish(results)
    inputs = sum(map(len, requests))
    return inputs / wall_s, cpu_s / inputs * 1000, results


def cosine(left: list[float], right: list[float]) -> float:
    dot = sum(a * b for a, b in zip(left, right, strict=True))
    return dot / math.sqrt(sum(a * a for a in left) * sum(b * b for b in right))


async def measure(config: WorkerConfig, args) -> dict:
    from encrypted_vllm.worker import boot
    from encrypted_vllm.worker.handler import Worker

    engine = boot.start_engine(config)
    try:
        runners = {
            "engine": EngineRunner(engine),
            "handler": HandlerRunner(
                Worker(engine, config.inbox(), max_items_per_s=config.max_items_per_s),
                channel.Channel(config.encryption_key),
            ),
        }
        for runner in runners.values():  # warm-up
            await run_round(runner, [[f"warm-up {n}"] for n in range(16)], 8)
        levels = {}
        for concurrency in args.concurrency:
            count = max(concurrency * args.requests_per_client, MIN_REQUESTS)
            requests = [
                [
                    f"Document {n}.{k}: encrypted prompts cross the queue as Fernet tokens."
                    for k in range(args.inputs_per_request)
                ]
                for n in range(count)
            ]
            rates = {name: [] for name in runners}
            cpu = {name: [] for name in runners}
            started, round_ = time.monotonic(), 0
            while round_ < args.rounds or time.monotonic() - started < args.seconds:
                vectors = {}
                for name in sorted(runners, reverse=round_ % 2 == 1):
                    rate, cpu_per, vectors[name] = await run_round(
                        runners[name], requests, concurrency
                    )
                    rates[name].append(rate)
                    cpu[name].append(cpu_per)
                firsts = {
                    name: [v for i in range(CHECKED) for v in got[i]]
                    for name, got in vectors.items()
                }
                if any(cosine(a, b) < 0.9999 for a, b in zip(*firsts.values(), strict=True)):
                    raise SystemExit(
                        f"the handler's vectors differ from the engine's at {concurrency}"
                    )
                round_ += 1
            paired = [b / a for a, b in zip(rates["engine"], rates["handler"], strict=True)]
            low, high = median_ci(paired)
            level = {
                name: {
                    "inputs_per_s": round(statistics.median(rates[name]), 1),
                    "cpu_s_per_1000_inputs": round(statistics.median(cpu[name]), 3),
                }
                for name in runners
            }
            level["handler_over_engine"] = round(statistics.median(paired), 3)
            level["handler_over_engine_ci95"] = [low, high]
            level["rounds"] = round_
            if concurrency == GOAL_LEVEL:
                level["goal"] = verdict(low, high, lambda ratio: ratio >= GOAL_RATIO)
            levels[concurrency] = level
            print(f"  concurrency {concurrency}: done", file=sys.stderr)
        return levels
    finally:
        engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1,64", help="comma-separated levels")
    parser.add_argument("--inputs-per-request", type=int, default=1)
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=10, help="least rounds of each a level")
    parser.add_argument("--seconds", type=float, default=60, help="least time a level runs")
    args = parser.parse_args()
    args.concurrency = [int(level) for level in args.concurrency.split(",")]

    environ = dict(os.environ)
    environ.setdefault("MODELS", str(real_model.prepare(model=real_model.MINILM)))
    environ.setdefault("MAX_MODEL_LEN", "256")
    environ.setdefault("ENCRYPTION_KEY", channel.generate_key())
    levels = asyncio.run(measure(WorkerConfig.from_env(environ), args))

    print(f"\n{args.inputs_per_request} input(s) a request\n")
    print(
        f"{'C':>4} {'engine in/s':>12} {'handler in/s':>13} {'(b)/(a)':>8}  95% interval   "
        "CPU s/1000 inputs (a), (b)"
    )
    for concurrency, level in levels.items():
        low, high = level["handler_over_engine_ci95"]
        interval = "[?]" if None in (low, high) else f"[{low:.3f} to {high:.3f}]"
        print(
            f"{concurrency:4d} {level['engine']['inputs_per_s']:12.1f} "
            f"{level['handler']['inputs_per_s']:13.1f} {level['handler_over_engine']:8.3f}  "
            f"{interval:14} {level['engine']['cpu_s_per_1000_inputs']:.3f}, "
            f"{level['handler']['cpu_s_per_1000_inputs']:.3f}"
            + (f"   goal (b)/(a) >= {GOAL_RATIO}: {level['goal']}" if "goal" in level else "")
        )
    print(json.dumps({"inputs_per_request": args.inputs_per_request, "levels": levels}))


if __name__ == "__main__":
    main()
