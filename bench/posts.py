"""What one streamed item's post costs the worker's process: the runpod
SDK's `rp_job.handle_job` path against this worker's `job_loop.stream_job`,
side by side in one run, posting to the loopback endpoint over real HTTP.

    .venv/bin/python bench/posts.py [--items 2000] [--rounds 8]

Each round runs one job of --items items (a sealed item's size, 600 bytes
of base64) through each path in turn, each first in turn: (a) sdk, the
SDK's own `handle_job` with its `run_job_generator` and `stream_result`
(as runpod 1.10.0 runs any generator handler); (b) ours, `stream_job`.
Measured: the CPU time of the thread that runs the event loop (the posting
side alone: the loopback endpoint serves from another thread) per item,
median over rounds, and (b)/(a) paired by round with its 95% interval
(bench/throughput.py's `median_ci`). Both post every item, then the job's
aggregate, to the same endpoint; the last line is the result as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import aiohttp  # noqa: E402
import httpx  # noqa: E402
from runpod.serverless.modules import rp_http, rp_job  # noqa: E402
from throughput import median_ci  # noqa: E402

from encrypted_vllm.dev import local_endpoint  # noqa: E402
from encrypted_vllm.worker import job_loop  # noqa: E402

ITEM = {"ciphertext": "gAAAAA" + "x" * 594}  # a 256-byte bucket's item, sealed


async def one_job(serving, session, env, bearer, path: str, items: int) -> float:
    """CPU seconds of this thread to run one job of `items` items by `path`."""
    job_id = httpx.post(f"{serving.url}/run", json={"input": {}}, headers=bearer).json()["id"]
    httpx.get(env["RUNPOD_WEBHOOK_GET_JOB"].replace("$ID", "w"), headers=bearer)

    async def handler(job):
        for _ in range(items):
            yield ITEM

    config = {"handler": handler, "return_aggregate_stream": True}
    job = {"id": job_id, "input": {}}
    started = time.thread_time()
    if path == "sdk":
        await rp_job.handle_job(session, config, job)
    else:
        await job_loop.stream_job(session, config, job)
    spent = time.thread_time() - started
    done = serving.endpoint.jobs[job_id]
    assert done.status == "COMPLETED" and len(done.posts) == items, (done.status, len(done.posts))
    serving.endpoint.jobs.pop(job_id)  # keep memory flat
    return spent


async def measure(args) -> dict:
    with local_endpoint.Serving(local_endpoint.LocalEndpoint()) as serving:
        env, api_key = serving.worker_env("w"), serving.endpoint.api_key
        rp_http.JOB_STREAM_URL = env["RUNPOD_WEBHOOK_POST_STREAM"].replace("$RUNPOD_POD_ID", "w")
        rp_http.JOB_DONE_URL = env["RUNPOD_WEBHOOK_POST_OUTPUT"].replace("$RUNPOD_POD_ID", "w")
        bearer = {"Authorization": f"Bearer {api_key}"}
        per_item = {"sdk": [], "ours": []}
        async with aiohttp.ClientSession(headers={"Authorization": api_key}) as session:
            for path in per_item:  # warm-up
                await one_job(serving, session, env, bearer, path, 200)
            for round_ in range(args.rounds):
                order = ("sdk", "ours") if round_ % 2 == 0 else ("ours", "sdk")
                for path in order:
                    spent = await one_job(serving, session, env, bearer, path, args.items)
                    per_item[path].append(spent / args.items * 1e6)
    paired = [ours / sdk for sdk, ours in zip(per_item["sdk"], per_item["ours"], strict=True)]
    return {
        "items_per_job": args.items,
        "cpu_us_per_item": {path: round(statistics.median(v), 1) for path, v in per_item.items()},
        "ours_over_sdk": round(statistics.median(paired), 3),
        "ours_over_sdk_ci95": [round(bound, 3) for bound in median_ci(paired) if bound is not None],
        "rounds": args.rounds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=2000, help="items a job")
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    result = asyncio.run(measure(args))
    cpu = result["cpu_us_per_item"]
    print(
        f"CPU per item posted: sdk {cpu['sdk']} us, ours {cpu['ours']} us; "
        f"ours/sdk {result['ours_over_sdk']} {result['ours_over_sdk_ci95']} "
        f"({args.rounds} paired rounds of {args.items} items)"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
