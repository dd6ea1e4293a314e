"""What a JSON schema costs: the worker's tokens/s with and without one, on
the same engine, in one run.

    .venv/bin/python bench/structured_output.py [--concurrency 1,64] [--rounds 10]

Both variants are jobs through Worker.handler, greedy, on the worker's model
(MODELS, else the offline model --model names): plain prompts of --tokens tokens
(ignoring EOS), and the same prompts with `structured_output.json_schema`
set to an array of eight small objects, which the backend (xgrammar, the
worker's default) enforces token by token until the array closes. The
variants alternate round by round at each concurrency (C streams at a time,
C x 4 streams a round, at least 24), and the ratio is the median of the
paired rounds' ratios with its 95% confidence interval, as in
bench/throughput.py, for the same reason: this machine's speed swings from
round to round. Every schema output is checked to parse and validate. The
last line is the result as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys

import jsonschema
import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import throughput  # noqa: E402

from encrypted_vllm.dev.verify import apply_offline_defaults  # noqa: E402
from encrypted_vllm.wire import channel  # noqa: E402
from encrypted_vllm.worker.config import WorkerConfig  # noqa: E402

POINT = {
    "type": "object",
    "properties": {
        "x": {"type": "integer", "minimum": -1000, "maximum": 1000},
        # ASCII: the tiny model's byte pieces can make invalid UTF-8 inside
        # a free string, which the detokenizer shows as U+FFFD.
        "label": {"type": "string", "pattern": "^[a-z ]{0,12}$"},
        "ok": {"type": "boolean"},
    },
    "required": ["x", "label", "ok"],
    "additionalProperties": False,
}
SCHEMA = {"type": "array", "items": POINT, "minItems": 8, "maxItems": 8}


class SchemaRunner(throughput.HandlerRunner):
    """Jobs with the schema, their text kept to be checked."""

    def __init__(self, worker, sealer, max_tokens: int):
        super().__init__(worker, sealer, max_tokens, structured_output={"json_schema": SCHEMA})
        self.sampling = {"temperature": 0, "max_tokens": max_tokens}  # the grammar ends it

    def finish(self, streams) -> None:
        sealed = dict(self._sealed)
        self._sealed = {index: outputs[-1:] for index, outputs in sealed.items()}
        super().finish(streams)
        for outputs in sealed.values():
            text = "".join(self.channel.open_item(output).text for output in outputs)
            jsonschema.validate(json.loads(text), SCHEMA)

    async def run(self, index, prompt, keep_text):
        return await super().run(index, prompt, keep_text=True)


async def measure(config: WorkerConfig, args) -> dict:
    from vllm.utils.gc_utils import freeze_gc_heap

    from encrypted_vllm.worker import boot
    from encrypted_vllm.worker.handler import Worker

    engine = boot.start_engine(config)
    freeze_gc_heap()
    try:
        worker = Worker(engine, config.inbox(), max_items_per_s=config.max_items_per_s)
        sealer = channel.Channel(config.encryption_key)
        runners = {
            "plain": throughput.HandlerRunner(worker, sealer, args.tokens),
            "schema": SchemaRunner(worker, sealer, 3 * args.tokens),
        }
        here = psutil.Process()
        prompts = [f"Stream {n}: eight points, as JSON." for n in range(max(args.concurrency) * 4)]
        for runner in runners.values():  # warm-up
            await throughput.run_level(runner, prompts[:8], 8, throughput.Level(), here)
        results = {}
        for concurrency in args.concurrency:
            levels = {name: throughput.Level() for name in runners}
            count = max(concurrency * 4, throughput.MIN_STREAMS)
            for round_ in range(args.rounds):
                for name in sorted(runners, reverse=round_ % 2 == 1):
                    await throughput.run_level(
                        runners[name], prompts[:count], concurrency, levels[name], here
                    )
            plain, schema = levels["plain"], levels["schema"]
            ratios = [b / a for a, b in zip(plain.round_rates, schema.round_rates, strict=True)]
            low, high = throughput.median_ci(ratios)
            results[concurrency] = {
                "plain_tokens_per_s": round(statistics.median(plain.round_rates), 1),
                "schema_tokens_per_s": round(statistics.median(schema.round_rates), 1),
                "schema_over_plain": round(statistics.median(ratios), 3),
                "ci95": [throughput._rounded(low, 3), throughput._rounded(high, 3)],
                "schema_tokens_per_stream": round(
                    statistics.mean(stream.tokens for stream in schema.streams), 1
                ),
                "rounds": args.rounds,
            }
            print(f"  concurrency {concurrency} done", file=sys.stderr)
        return results
    finally:
        engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1,64")
    parser.add_argument("--tokens", type=int, default=128, help="plain streams' tokens")
    parser.add_argument("--rounds", type=int, default=10)
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
    results = asyncio.run(measure(WorkerConfig.from_env(), args))
    print(f"\n{'streams':>7} {'plain tok/s':>12} {'schema tok/s':>13} {'ratio [95%]':>20}")
    for concurrency, row in results.items():
        low, high = row["ci95"]
        interval = "[?]" if low is None else f"[{low:.2f}-{high:.2f}]"
        print(
            f"{concurrency:7d} {row['plain_tokens_per_s']:12.1f} {row['schema_tokens_per_s']:13.1f}"
            f" {row['schema_over_plain']:8.3f} {interval:>11}"
        )
    print(json.dumps({str(level): row for level, row in results.items()}))


if __name__ == "__main__":
    main()
