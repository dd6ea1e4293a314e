"""What a LoRA adapter costs a request, side by side in one run, on one
engine as the worker starts it with LORA_MODULES (MAX_LORA_RANK 8,
MAX_LORAS 1):

    .venv/bin/python bench/adapters.py [--model real|tiny] [--concurrency 1,16]

  (a) base:    requests for the base model;
  (b) adapter: every request through a random rank-8 adapter on every
               projection of every layer (tiny_model.build_adapter).

At each concurrency C, C callers run greedy streams of --tokens tokens back
to back (at least 8 streams a round); (a) and (b) take turns, each first in
turn, at least --rounds times each and until the level has run for
--seconds. Reported: tokens/s of each variant's median round, and (b)/(a)
paired round by round, a median with its 95% confidence interval
(bench/throughput.py says why). The handler's own work does not depend on
the adapter, so the engine alone is measured. Also the engine's start,
with LoRA enabled. (What enabling LoRA costs requests for the base model is
not measured here: on the CPU build vLLM then runs the model uncompiled, a
cost of the CPU build, and two engines in one process on two cores spin
against each other.) The last line is the whole result as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from throughput import median_ci  # noqa: E402

from encrypted_vllm.dev import real_model, tiny_model  # noqa: E402
from encrypted_vllm.wire import channel  # noqa: E402
from encrypted_vllm.worker.config import WorkerConfig  # noqa: E402

MIN_STREAMS = 8
PROMPT = "Write a short story about a lighthouse keeper."
_ids = itertools.count()


async def one_round(engine, concurrency: int, tokens: int, lora) -> tuple[int, float]:
    """Tokens and seconds of one round: `concurrency` callers, streams back to back."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(
        temperature=0, max_tokens=tokens, ignore_eos=True, output_kind=RequestOutputKind.DELTA
    )
    per_caller = max(1, -(-MIN_STREAMS // concurrency))

    async def caller() -> int:
        produced = 0
        for _ in range(per_caller):
            request_id = f"bench-{next(_ids)}"
            async for output in engine.generate(PROMPT, params, request_id, lora_request=lora):
                produced += len(output.outputs[0].token_ids)
        return produced

    started = time.perf_counter()
    counts = await asyncio.gather(*(caller() for _ in range(concurrency)))
    return sum(counts), time.perf_counter() - started


def start(config: WorkerConfig):
    from encrypted_vllm.worker import boot

    started = time.perf_counter()
    adapters = boot.resolve_adapters(config)
    engine = boot.start_engine(config)
    return engine, adapters, time.perf_counter() - started


async def measure(args) -> dict:
    model_dir = (
        real_model.prepare()
        if args.model == "real"
        else tiny_model.build(tiny_model.default_directory())
    )
    adapter_dir = tiny_model.build_adapter(
        model_dir, Path(tempfile.mkdtemp(prefix="bench-adapter-")) / "adapter"
    )
    common = {
        "MODELS": str(model_dir),
        "ENCRYPTION_KEY": channel.generate_key(),
        "MAX_MODEL_LEN": "2048",
    }
    lora_env = {**common, "LORA_MODULES": f"bench={adapter_dir}", "MAX_LORA_RANK": "8"}
    engine, adapters, started_s = start(WorkerConfig.from_env(lora_env))
    variants = {"base": None, "adapter": adapters.requests["bench"]}
    result = {"model": args.model, "tokens": args.tokens, "levels": {}}
    result["engine_start_s"] = round(started_s, 1)
    print(f"engine start, LoRA enabled: {started_s:.1f} s")
    for concurrency in args.concurrency:
        for lora in variants.values():  # warm-up: load the adapter
            await one_round(engine, concurrency, 8, lora)
        rounds: dict[str, list[float]] = {name: [] for name in variants}
        names = list(variants)
        level_started = time.monotonic()
        for number in itertools.count():
            if number >= args.rounds and time.monotonic() - level_started >= args.seconds:
                break
            for name in names if number % 2 == 0 else names[::-1]:
                produced, seconds = await one_round(
                    engine, concurrency, args.tokens, variants[name]
                )
                rounds[name].append(produced / seconds)
        level = {
            "rounds": {name: [round(rate) for rate in rates] for name, rates in rounds.items()}
        }
        for name in names:
            level[f"{name}_tokens_per_s"] = round(statistics.median(rounds[name]))
        paired = [mine / base for mine, base in zip(rounds["adapter"], rounds["base"], strict=True)]
        low, high = median_ci(paired)
        level["adapter_over_base"] = {
            "median": round(statistics.median(paired), 3),
            "ci95": [
                None if low is None else round(low, 3),
                None if high is None else round(high, 3),
            ],
        }
        result["levels"][concurrency] = level
        print(
            f"{concurrency:>3} streams: tokens/s base {level['base_tokens_per_s']}, "
            f"adapter {level['adapter_tokens_per_s']}; adapter/base "
            f"{level['adapter_over_base']['median']} {level['adapter_over_base']['ci95']} "
            f"({len(rounds['base'])} pairs)",
            flush=True,
        )
    engine.shutdown()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("real", "tiny"), default="real")
    parser.add_argument(
        "--concurrency", type=lambda v: [int(c) for c in v.split(",")], default=[1, 16]
    )
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=0.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = asyncio.run(measure(args))
    text = json.dumps(result)
    if args.json:
        args.json.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
