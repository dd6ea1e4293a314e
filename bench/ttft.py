"""Warm time to first token as a client sees it, through the loopback RunPod
endpoint: this project's client next to the runpod SDK's, on the same worker
and the same job, in one run.

    .venv/bin/python bench/ttft.py [--jobs 20]

It serves a loopback endpoint, starts the real worker (`rp_handler.py`)
with the container's variables (MODELS unset: the tiny offline model), warms
it up, then alternates the two clients job by job. TTFT runs from submitting
the job to the first decrypted text; the median and 90th percentile are
reported, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from encrypted_vllm.client import library as client  # noqa: E402
from encrypted_vllm.dev.local_endpoint import LocalEndpoint, Serving, WorkerProcess  # noqa: E402
from encrypted_vllm.dev.verify import apply_offline_defaults  # noqa: E402
from encrypted_vllm.wire import (
    channel,
    protocol,  # noqa: E402
)

REQUEST = {"prompt": "Sanity check.", "sampling_params": {"max_tokens": 16, "temperature": 0}}


def ours(endpoint: client.Client) -> float:
    with endpoint.stream(**REQUEST) as deltas:
        for _ in deltas:
            pass
    return deltas.completion.ttft_s


def runpod_sdk(endpoint, sealer: channel.Channel) -> float:
    request = protocol.Request.model_validate(REQUEST)
    started = time.monotonic()
    job = endpoint.run({"input": sealer.seal_request(request)})
    first = None
    for output in job.stream():
        if first is None and sealer.open_item(output).text:
            first = time.monotonic()
    return first - started


def summary(samples: list[float]) -> dict:
    ordered = sorted(samples)
    return {
        "p50_ms": round(statistics.median(ordered) * 1000, 1),
        "p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))] * 1000, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20, help="measured jobs per client")
    args = parser.parse_args()
    apply_offline_defaults(os.environ, "tiny")  # the figures in docs/ are the tiny model's
    key = os.environ["ENCRYPTION_KEY"]

    import runpod

    endpoint = LocalEndpoint()
    with Serving(endpoint) as serving:
        log = Path(tempfile.mkdtemp(prefix="bench-ttft-")) / "worker.log"
        worker = WorkerProcess(serving, os.environ, log)
        try:
            worker.wait_ready(3600)
            ours_client = client.Client(
                base_url=serving.url, api_key=endpoint.api_key, encryption_key=key
            )
            runpod.endpoint_url_base = f"{serving.base_url}/v2"
            sdk_client = runpod.Endpoint(endpoint.endpoint_id, api_key=endpoint.api_key)
            sealer = channel.Channel(key)
            for _ in range(3):  # warm-up
                ours(ours_client)
            samples: dict[str, list[float]] = {"this client": [], "runpod SDK client": []}
            for _ in range(args.jobs):
                samples["this client"].append(ours(ours_client))
                samples["runpod SDK client"].append(runpod_sdk(sdk_client, sealer))
        finally:
            worker.stop()

    results = {name: summary(values) for name, values in samples.items()}
    print(f"warm TTFT through the loopback endpoint, {args.jobs} jobs each ({REQUEST})\n")
    print(f"{'':20} {'p50 ms':>8} {'p90 ms':>8}")
    for name, result in results.items():
        print(f"{name:20} {result['p50_ms']:8.1f} {result['p90_ms']:8.1f}")
    ratio = results["runpod SDK client"]["p50_ms"] / results["this client"]["p50_ms"]
    print(f"\np50 ratio, runpod SDK client / this client: {ratio:.1f}x")
    print(json.dumps({"ttft": results, "p50_ratio_sdk_over_ours": round(ratio, 2)}))


if __name__ == "__main__":
    main()
