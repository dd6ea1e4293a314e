"""The verification protocol: boot the worker from the container's variables,
send it an encrypted job, print the decrypted text as it streams, then the
time to first token (TTFT) and tokens per second.

    python3 test_local.py --prompt "Sanity check."

The job is test_input.json's plaintext request (with --prompt, if given),
encrypted under ENCRYPTION_KEY. It runs twice: a warm-up, then the measured
run, which must give the same greedy text. With MODELS unset, the worker runs
the offline default: a tiny random-weight model built on the spot, whose
text is gibberish by design. Set MODELS (and, on a GPU, nothing else) to
check a real model.

Exits non-zero on any error, on a completion of 2 or more tokens that did not
arrive in at least 2 pieces, and on a warm TTFT of 5 s or more.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import protocol

TTFT_LIMIT_S = 5.0
HERE = Path(__file__).resolve().parent


@dataclass
class Run:
    text: str
    arrivals: int
    ttft_s: float
    total_s: float
    completion_tokens: int


def apply_offline_defaults(environ: dict) -> list[str]:
    """Fill in what a bare machine lacks; returns notes for the user."""
    notes = []
    if not environ.get("MODELS", "").strip():
        import tiny_model

        environ["MODELS"] = str(tiny_model.build(tiny_model.default_directory()))
        # The CPU backend reserves this much memory (GiB) for its KV cache.
        environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        environ.setdefault("MAX_MODEL_LEN", "512")
        notes.append(
            "MODELS is unset: using the tiny offline model (its text is gibberish by design)"
        )
    if not environ.get("ENCRYPTION_KEY", "").strip():
        environ["ENCRYPTION_KEY"] = protocol.generate_key()
        notes.append("ENCRYPTION_KEY is unset: using a one-off key for this run")
    return notes


def load_request(prompt: str | None) -> protocol.Request:
    template = json.loads((HERE / "test_input.json").read_text())["input"]
    if prompt is not None:
        template = {**template, "prompt": prompt}
    return protocol.Request.model_validate(template)


async def run_job(worker, channel: protocol.Channel, request, job_id: str, echo: bool) -> Run:
    started = time.perf_counter()
    first = None
    pieces: list[str] = []
    last = None
    async for output in worker.handler({"id": job_id, "input": channel.seal_request(request)}):
        if "error" in output:
            raise RuntimeError(output["error"])
        item = channel.open_item(output)
        last = item
        if item.text:
            first = first or time.perf_counter()
            pieces.append(item.text)
            if echo:
                print(item.text, end="", flush=True)
    finished = time.perf_counter()
    if echo:
        print()
    if last is None or last.usage is None:
        raise RuntimeError("the stream ended without its final item")
    return Run(
        text="".join(pieces),
        arrivals=len(pieces),
        ttft_s=(first or finished) - started,
        total_s=finished - started,
        completion_tokens=last.usage.completion_tokens,
    )


def verdict(warm_up: Run, measured: Run, greedy: bool) -> list[str]:
    problems = []
    if measured.completion_tokens >= 2 and measured.arrivals < 2:
        problems.append(
            f"output did not stream: {measured.completion_tokens} tokens arrived in "
            f"{measured.arrivals} piece(s)"
        )
    if measured.ttft_s >= TTFT_LIMIT_S:
        problems.append(f"warm TTFT {measured.ttft_s:.2f} s is not under {TTFT_LIMIT_S:.0f} s")
    if greedy and measured.text != warm_up.text:
        problems.append("two greedy runs of the same request gave different text")
    if not measured.text:
        problems.append("the completion is empty")
    return problems


async def verify(request: protocol.Request) -> int:
    import rp_handler
    from config import WorkerConfig

    config = WorkerConfig.from_env()
    print(f"booting the worker on {config.models[0]} ...", flush=True)
    engine = rp_handler.start_engine(config)
    worker = rp_handler.Worker(engine, config.inbox())
    channel = protocol.Channel(config.encryption_key)  # the client's side
    try:
        warm_up = await run_job(worker, channel, request, "warm-up", echo=False)
        measured = await run_job(worker, channel, request, "measured", echo=True)
    finally:
        engine.shutdown()

    tokens_per_s = measured.completion_tokens / measured.total_s if measured.total_s else 0.0
    print(
        f"TTFT {measured.ttft_s * 1000:.0f} ms | {measured.completion_tokens} tokens in "
        f"{measured.arrivals} pieces | {tokens_per_s:.1f} tokens/s"
    )
    problems = verdict(warm_up, measured, greedy=request.sampling_params.temperature == 0)
    for problem in problems:
        print(f"FAIL: {problem}", file=sys.stderr)
    if not problems:
        print("SUCCESS")
    return 1 if problems else 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", help="replaces the prompt of test_input.json")
    args = parser.parse_args(argv)
    for note in apply_offline_defaults(os.environ):
        print(f"note: {note}")
    try:
        return asyncio.run(verify(load_request(args.prompt)))
    except Exception as error:  # any failure is a failed verification, said plainly
        print(f"FAIL: {type(error).__name__}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
