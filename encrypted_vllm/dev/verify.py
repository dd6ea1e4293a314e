"""The verification protocol: run the worker exactly as a deployed endpoint
runs it, send it an encrypted job through the client, print the decrypted
text as it streams, then the time to first token (TTFT) and tokens/s.

    python3 test_local.py --prompt "Sanity check."                  # here
    python3 test_local.py --endpoint-id ID --prompt "Sanity check."  # on RunPod

Here, it serves a loopback RunPod endpoint (`local_endpoint`), starts
`python3 rp_handler.py` as that endpoint's worker with the container's
variables (MODELS, ENCRYPTION_KEY, ...), and calls it with the client
library, all over RunPod's real HTTP protocols. With --endpoint-id it calls
a deployed endpoint instead (RUNPOD_API_KEY and ENCRYPTION_KEY from the
environment).

The job is test_input.json's plaintext request, with --prompt as its user
message. It runs twice: a warm-up, then the measured run, which must give
the same text when sampling is greedy. With MODELS unset, the worker runs
the offline default, SmolLM2-135M-Instruct (`real_model`: prepared once,
about 35 s and 260 MB). Set MODELS to check another model.

Exits non-zero on any error, on a completion of 2 or more tokens that did not
arrive in at least 2 separate pieces, on a warm TTFT of 5 s or more, and on
a text that does not read as English (`english`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from encrypted_vllm.client import library as client
from encrypted_vllm.dev.english import looks_like_english
from encrypted_vllm.wire import channel, protocol
from encrypted_vllm.worker.config import ConfigError, WorkerConfig

TTFT_LIMIT_S = 5.0
BOOT_TIMEOUT_S = 3600.0  # a cold start may download a large model first
# Poll /stream often, so that the check can see a fast model stream.
POLL_INTERVAL_S = 0.02
# The checkout (or image folder) this package is in, where test_input.json is.
REPO = Path(__file__).resolve().parents[2]


def apply_offline_defaults(environ: dict, offline_model: str = "real") -> list[str]:
    """Fill in what a bare machine lacks; returns notes for the user. With
    MODELS unset, `offline_model` "real" is SmolLM2, "tiny" the tiny random
    model (for benchmarks of the worker's own overhead)."""
    notes = []
    if not environ.get("MODELS", "").strip() and offline_model == "tiny":
        from encrypted_vllm.dev import tiny_model

        environ["MODELS"] = str(tiny_model.build(tiny_model.default_directory()))
        environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        environ.setdefault("MAX_MODEL_LEN", "512")
        notes.append("MODELS is unset: using the tiny random model (its text is noise)")
    elif not environ.get("MODELS", "").strip():
        from encrypted_vllm.dev import real_model

        environ["MODELS"] = str(real_model.prepare(progress=lambda line: print(line, flush=True)))
        # The CPU backend reserves this much memory (GiB) for its KV cache:
        # 46,592 tokens of this model.
        environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        environ.setdefault("MAX_MODEL_LEN", "2048")
        notes.append(
            "MODELS is unset: using the offline default, SmolLM2-135M-Instruct "
            "(a tiny real model: English, often wrong)"
        )
    if not environ.get("ENCRYPTION_KEY", "").strip():
        environ["ENCRYPTION_KEY"] = channel.generate_key()
        notes.append("ENCRYPTION_KEY is unset: using a one-off key for this run")
    return notes


def load_request(prompt: str | None) -> dict:
    """test_input.json's request (`prompt` as its user message), checked
    against the schema."""
    request = json.loads((REPO / "test_input.json").read_text())["input"]
    if prompt is not None:
        request = {**request, "messages": [{"role": "user", "content": prompt}]}
    protocol.Request.model_validate(request)
    return request


def verdict(warm_up: client.Completion, measured: client.Completion, greedy: bool) -> list[str]:
    problems = []
    tokens = measured.usage.completion_tokens if measured.usage else 0
    if tokens >= 2 and measured.arrivals < 2:
        problems.append(
            f"output did not stream: {tokens} tokens arrived in {measured.arrivals} piece(s)"
        )
    if measured.ttft_s is None or measured.ttft_s >= TTFT_LIMIT_S:
        ttft = "none" if measured.ttft_s is None else f"{measured.ttft_s:.2f} s"
        problems.append(f"warm TTFT {ttft} is not under {TTFT_LIMIT_S:.0f} s")
    if greedy and measured.text != warm_up.text:
        problems.append("two greedy runs of the same request gave different text")
    if not measured.text:
        problems.append("the completion is empty")
    elif not looks_like_english(measured.text):
        problems.append("the text does not read as English (the contract's third criterion)")
    return problems


@contextmanager
def loopback_endpoint() -> Iterator[client.Client]:
    """A loopback endpoint with `python3 rp_handler.py` as its worker."""
    from encrypted_vllm.dev.local_endpoint import LocalEndpoint, Serving, WorkerProcess

    config = WorkerConfig.from_env()  # fail here, at once, on a bad variable
    endpoint = LocalEndpoint()
    log_path = Path(tempfile.mkdtemp(prefix="test-local-")) / "worker.log"
    with Serving(endpoint) as serving:
        worker = WorkerProcess(serving, os.environ, log_path)
        models = ", ".join(map(str, config.models))
        print(f"booting the worker on {models} (log: {log_path}) ...", flush=True)
        try:
            worker.wait_ready(
                BOOT_TIMEOUT_S, on_boot_line=lambda line: print(f"  {line}", flush=True)
            )
            yield client.Client(
                base_url=serving.url,
                api_key=endpoint.api_key,
                encryption_key=config.encryption_key,
                poll_interval=POLL_INTERVAL_S,
            )
        except BaseException:
            print(f"--- the end of the worker's log ---\n{worker.log_tail()}", file=sys.stderr)
            raise
        finally:
            worker.stop()


@contextmanager
def deployed_endpoint(endpoint_id: str) -> Iterator[client.Client]:
    print(f"calling the deployed endpoint {endpoint_id} ...", flush=True)
    yield client.Client(endpoint_id, timeout=BOOT_TIMEOUT_S, poll_interval=POLL_INTERVAL_S)


def verify(endpoint: client.Client, request: dict) -> int:
    with endpoint:
        warm_up = endpoint.run_sync(**request)
        with endpoint.stream(**request) as deltas:
            for delta in deltas:
                print(delta, end="", flush=True)
        measured = deltas.completion
    print()
    tokens = measured.usage.completion_tokens if measured.usage else 0
    rate = f"{measured.tokens_per_s:.1f} tokens/s" if measured.tokens_per_s else "n/a tokens/s"
    ttft = f"{measured.ttft_s * 1000:.0f} ms" if measured.ttft_s is not None else "none"
    print(f"TTFT {ttft} | {tokens} tokens in {measured.arrivals} pieces | {rate}")
    greedy = request.get("sampling_params", {}).get("temperature") == 0
    problems = verdict(warm_up, measured, greedy)
    for problem in problems:
        print(f"FAIL: {problem}", file=sys.stderr)
    if not problems:
        print("SUCCESS")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", help="replaces the prompt of test_input.json")
    parser.add_argument("--endpoint-id", help="check this deployed endpoint instead")
    args = parser.parse_args(argv)
    try:
        request = load_request(args.prompt)
        if args.endpoint_id:
            endpoint = deployed_endpoint(args.endpoint_id)
        else:
            for note in apply_offline_defaults(os.environ):
                print(f"note: {note}")
            endpoint = loopback_endpoint()
        with endpoint as endpoint_client:
            return verify(endpoint_client, request)
    except ConfigError as error:
        print(f"FAIL: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # any failure is a failed verification, said plainly
        print(f"FAIL: {type(error).__name__}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
