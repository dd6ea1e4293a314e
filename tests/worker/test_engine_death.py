"""A dead engine cannot come back: every job in flight fails ENGINE_ERROR and
the worker exits non-zero, so that RunPod replaces it, instead of taking jobs
it cannot serve. Its own worker, whose engine core this test kills."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from encrypted_vllm.client import library as client
from encrypted_vllm.dev import local_endpoint
from encrypted_vllm.wire.protocol import ErrorCode
from tests.jobs import GREEDY


@pytest.fixture
def doomed(worker_env, key, tmp_path):
    with local_endpoint.Serving(local_endpoint.LocalEndpoint()) as serving:
        worker = local_endpoint.WorkerProcess(
            serving, {**os.environ, **worker_env}, tmp_path / "worker.log"
        )
        try:
            worker.wait_ready(timeout_s=600)
            yield serving, worker
        finally:
            worker.stop()


def engine_core(worker: local_endpoint.WorkerProcess) -> psutil.Process:
    (core,) = [
        child
        for child in psutil.Process(worker.process.pid).children(recursive=True)
        if child.name().startswith("VLLM::EngineCor")
    ]
    return core


def test_killing_the_engine_fails_every_job_in_flight_and_the_worker_exits(doomed, key):
    serving, worker = doomed
    endpoint = client.Client(
        base_url=serving.url, api_key=serving.endpoint.api_key, encryption_key=key
    )
    jobs = [
        endpoint.submit(f"Job {n} runs long.", sampling_params={**GREEDY, "max_tokens": 2000})
        for n in range(4)
    ]
    deadline = time.monotonic() + 60
    while any(serving.endpoint.jobs[job.id].status != "IN_PROGRESS" for job in jobs):
        assert time.monotonic() < deadline, "the jobs never started"
        time.sleep(0.05)

    engine_core(worker).send_signal(signal.SIGKILL)

    for job in jobs:
        with pytest.raises(client.JobFailed) as caught:
            job.result()
        assert (caught.value.status, caught.value.code) == ("FAILED", ErrorCode.ENGINE_ERROR)
    assert worker.process.wait(timeout=120) == 1
    log = worker.log_path.read_text()
    assert "the engine died; exiting so that RunPod replaces this worker" in log
