"""The runpod SDK's own waits, and what job_loop.EventJobScaler leaves of
them: its stock JobScaler and ours, side by side in one run, through the
loopback endpoint.

    .venv/bin/python bench/job_loop.py [--jobs 100]

The worker is this file again (`--worker stock|event`): the SDK's loop
around a trivial async-generator handler whose first item says when it
started, so that only the loop's own time is measured, not an engine's.
Two figures per loop:

- take to start: from the loopback endpoint handing a job over (job-take)
  to the handler starting it, jobs sent one after the other (each once the
  previous one ended), at concurrency 1 and 4; p50 and p95. The stock loop
  looks at its queue every 0.1 s, and after taking a job at concurrency 1
  it sleeps a full second before it looks for the next.
- saturated: --jobs jobs of about 50 ms each (5 items 10 ms apart) sent at
  once to a worker of concurrency 4: jobs a second, against the 80 a second
  that 4 slots of 50 ms jobs allow. The stock loop sleeps a second whenever
  all its slots are busy.

The last line is the result as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import httpx  # noqa: E402

from encrypted_vllm.dev import local_endpoint  # noqa: E402


async def handler(job):
    started = time.monotonic()  # system-wide: the endpoint's clock too
    spec = job["input"]
    for index in range(spec["items"]):
        yield {"started": started} if index == 0 else {"i": index}
        await asyncio.sleep(spec["item_ms"] / 1000)


def serve(loop: str, concurrency: int) -> None:
    """Be the worker: the SDK's loop, stock or ours, around `handler`."""
    sys.argv = sys.argv[:1]  # the SDK parses argv too
    config = {
        "handler": handler,
        "concurrency_modifier": lambda _current: concurrency,
        "return_aggregate_stream": True,
    }
    if loop == "stock":
        import runpod

        runpod.serverless.start(config)
    else:
        from encrypted_vllm.worker import job_loop

        job_loop.run_worker(config, job_loop.EventJobScaler(config, grace_s=5))


def percentile(values: list[float], p: int) -> float:
    return (
        statistics.quantiles(values, n=100, method="inclusive")[p - 1]
        if len(values) > 1
        else values[0]
    )


class Bench:
    """A loopback endpoint and one worker process on it."""

    def __init__(self, loop: str, concurrency: int):
        self.serving = local_endpoint.Serving(local_endpoint.LocalEndpoint(hold_s=2))
        self.workdir = tempfile.mkdtemp(prefix="bench-job-loop-")
        env = {
            **os.environ,
            **self.serving.worker_env(),
            "RUNPOD_LOG_LEVEL": "WARN",
        }
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--worker", loop, "--concurrency", str(concurrency)],
            env=env,
            cwd=self.workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            process_group=0,
        )
        self.http = httpx.Client(
            base_url=self.serving.url,
            headers={"Authorization": f"Bearer {self.serving.endpoint.api_key}"},
            timeout=30,
        )
        deadline = time.monotonic() + 60
        while "local-worker" not in self.serving.endpoint.workers_seen:
            assert self.process.poll() is None and time.monotonic() < deadline, "no worker"
            time.sleep(0.05)

    def submit(self, items: int, item_ms: float) -> local_endpoint.Job:
        response = self.http.post("/run", json={"input": {"items": items, "item_ms": item_ms}})
        response.raise_for_status()
        return self.serving.endpoint.jobs[response.json()["id"]]

    def wait(self, jobs: list[local_endpoint.Job], timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while any(job.status not in local_endpoint.FINAL for job in jobs):
            assert time.monotonic() < deadline, "jobs did not finish"
            time.sleep(0.002)
        assert all(job.status == "COMPLETED" for job in jobs)

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.serving.close()


def take_to_start(loop: str, concurrency: int, jobs: int) -> dict:
    bench = Bench(loop, concurrency)
    try:
        delays = []
        for _ in range(jobs):
            job = bench.submit(items=3, item_ms=5)
            bench.wait([job])
            delays.append(job.output[0]["started"] - job.taken)
        return {
            "p50_ms": round(percentile(delays, 50) * 1000, 1),
            "p95_ms": round(percentile(delays, 95) * 1000, 1),
        }
    finally:
        bench.close()


def saturated(loop: str, jobs: int) -> dict:
    bench = Bench(loop, 4)
    try:
        started = time.monotonic()
        submitted = [bench.submit(items=5, item_ms=10) for _ in range(jobs)]
        bench.wait(submitted)
        return {"jobs_per_s": round(jobs / (time.monotonic() - started), 1)}
    finally:
        bench.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--worker", choices=["stock", "event"], help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        serve(args.worker, args.concurrency)
        return
    os.environ.update(RUNPOD_SKIP_AUTO_SYSTEM_CHECKS="true", RUNPOD_SKIP_GPU_CHECK="true")
    result = {}
    for loop in ("stock", "event"):  # the same machine, one after the other
        result[loop] = {
            "take_to_start_c1": take_to_start(loop, 1, args.jobs),
            "take_to_start_c4": take_to_start(loop, 4, args.jobs),
            "saturated_c4": saturated(loop, args.jobs),
        }
    print(f"\n{'':28} {'SDK 1.10.0 loop':>16} {'EventJobScaler':>16}")
    for figure in ("take_to_start_c1", "take_to_start_c4"):
        for key in ("p50_ms", "p95_ms"):
            stock, event = result["stock"][figure][key], result["event"][figure][key]
            print(f"{figure + ' ' + key:28} {stock:16.1f} {event:16.1f}")
    print(
        f"{'saturated_c4 jobs/s (of 80)':28} {result['stock']['saturated_c4']['jobs_per_s']:16.1f}"
        f" {result['event']['saturated_c4']['jobs_per_s']:16.1f}"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
