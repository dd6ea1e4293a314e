"""The worker's life under the SDK loop, on the real worker process: a
SIGTERM is a normal stop (jobs in hand finish within the grace, later jobs
stay queued, exit 0), a job the grace cuts off fails WORKER_STOPPED, and a
worker stopped while it boots takes its engine's processes with it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time

import psutil
import pytest
import runpod
from runpod.serverless.modules.worker_state import JobsProgress

from encrypted_vllm.client import library as client
from encrypted_vllm.dev import local_endpoint
from encrypted_vllm.wire.protocol import ErrorCode
from encrypted_vllm.worker import job_loop
from tests.jobs import greedy_text


async def test_the_heartbeat_file_follows_the_jobs_in_hand_a_write_an_interval(
    tmp_path, monkeypatch
):
    """The SDK's heartbeat process reads the jobs it reports to RunPod from
    JobsProgress's file at each ping: it lags the jobs in hand by at most one
    interval, and the jobs of one interval cost one write, not one each."""
    state = tmp_path / "jobs.pkl"
    monkeypatch.setattr(JobsProgress, "_STATE_FILE", str(state))
    JobsProgress().clear()  # the file now says: none
    jobs = job_loop.HeartbeatJobs(write_s=0.3)
    writes = []
    monkeypatch.setattr(jobs.jobs, "_save_state", lambda: writes.append(set(jobs.jobs)))

    def reported() -> set[str]:
        return {job.id for job in writes[-1]} if writes else set()

    for number in range(20):
        jobs.add({"id": f"job-{number}", "input": {}})
    jobs.remove({"id": "job-0"})
    assert (reported(), jobs.get_job_count()) == (set(), 19)  # not yet written
    await asyncio.sleep(0.5)
    assert len(writes) == 1 and reported() == {f"job-{number}" for number in range(1, 20)}
    for number in range(1, 20):
        jobs.remove({"id": f"job-{number}"})
    await asyncio.sleep(0.5)
    assert len(writes) == 2 and reported() == set()
    jobs.add({"id": "last", "input": {}})
    jobs.write()  # as the loop does when it ends: at once, no write left pending
    await asyncio.sleep(0.5)
    assert len(writes) == 3 and reported() == {"last"}


async def test_a_job_take_brings_back_no_ended_job(tmp_path, monkeypatch):
    """The SDK's job take tells RunPod whether jobs are in hand
    (`job_in_progress`) from rp_job's JobsProgress, whose own list reloads
    the heartbeat's file first; that file lags memory by up to a second, and
    every job ended since its last write came back, for good (seen in
    bench/production.py at 64 streams: 300 ended jobs in hand, growing)."""
    import aiohttp
    import httpx
    from runpod.serverless.modules import rp_job

    monkeypatch.setattr(JobsProgress, "_STATE_FILE", str(tmp_path / "jobs.pkl"))
    JobsProgress().clear()  # the SDK's one set, as a new process has it
    monkeypatch.setattr(rp_job, "job_progress", rp_job.job_progress)  # the scaler rebinds it
    scaler = job_loop.EventJobScaler({"handler": lambda job: None}, grace_s=1)
    jobs = scaler.job_progress
    jobs.add({"id": "ended", "input": {}})
    jobs.write()  # the heartbeat's file: "ended" in hand
    jobs.remove({"id": "ended", "input": {}})  # ended; not yet written
    with local_endpoint.Serving(local_endpoint.LocalEndpoint()) as serving:
        endpoint, env = serving.endpoint, serving.worker_env("w")
        take_url = env["RUNPOD_WEBHOOK_GET_JOB"].replace("$ID", "w")
        monkeypatch.setattr(rp_job, "JOB_GET_URL", take_url)
        bearer = {"Authorization": f"Bearer {endpoint.api_key}"}
        job_id = httpx.post(f"{serving.url}/run", json={"input": {}}, headers=bearer).json()["id"]
        assert rp_job._job_get_url().endswith("&job_in_progress=0")
        async with aiohttp.ClientSession(headers={"Authorization": endpoint.api_key}) as session:
            taken = await scaler.jobs_fetcher(session, 1)  # the SDK's own take
        assert [job["id"] for job in taken] == [job_id]
        jobs.add(taken[0])
        assert {job.id for job in jobs.jobs} == {job_id}
        assert rp_job._job_get_url().endswith("&job_in_progress=1")
        jobs.remove(taken[0])
        assert jobs.get_job_count() == 0
        assert rp_job._job_get_url().endswith("&job_in_progress=0")
    jobs.write()  # as the loop ends: no write left pending on the tests' shared event loop


async def test_a_job_stopped_before_its_task_first_runs_frees_its_slot(tmp_path, monkeypatch):
    # Seen in bench/soak.py: a cancel that reached the worker in the same
    # turn of its loop as the job's start left the job holding a slot.
    monkeypatch.setattr(JobsProgress, "_STATE_FILE", str(tmp_path / "jobs.pkl"))
    scaler = job_loop.EventJobScaler({"handler": lambda job: None}, grace_s=1)
    job = {"id": "stopped-at-once", "input": {}}
    scaler.job_progress.add(job)

    task = scaler._start_job(session=None, job=job)
    assert await scaler.stop_job(job["id"])  # no await between: the task never ran
    await asyncio.gather(task, return_exceptions=True)

    assert task.cancelled()
    assert scaler.current_occupancy() == 0
    assert scaler.job_progress.get(job["id"]) is None
    scaler.job_progress.write()  # no write left pending


async def _take_and_run(serving, handler) -> local_endpoint.Job:
    """One job submitted to the loopback endpoint, taken over RunPod's job
    API and run by `stream_job` with an aiohttp session, as the worker loop
    runs it."""
    import aiohttp
    import httpx
    from runpod.serverless.modules import rp_http

    endpoint, env = serving.endpoint, serving.worker_env("w")
    bearer = {"Authorization": f"Bearer {endpoint.api_key}"}
    job_id = httpx.post(f"{serving.url}/run", json={"input": {}}, headers=bearer).json()["id"]
    taken = httpx.get(env["RUNPOD_WEBHOOK_GET_JOB"].replace("$ID", "w"), headers=bearer)
    assert taken.json()["id"] == job_id
    with pytest.MonkeyPatch.context() as patch:
        for name, variable in (
            ("JOB_STREAM_URL", "RUNPOD_WEBHOOK_POST_STREAM"),
            ("JOB_DONE_URL", "RUNPOD_WEBHOOK_POST_OUTPUT"),
        ):
            patch.setattr(rp_http, name, env[variable].replace("$RUNPOD_POD_ID", "w"))
        async with aiohttp.ClientSession(headers={"Authorization": endpoint.api_key}) as session:
            config = {"handler": handler, "return_aggregate_stream": True}
            await job_loop.stream_job(session, config, {"id": job_id, "input": {}})
    return endpoint.jobs[job_id]


async def test_each_item_is_posted_once_then_the_aggregate():
    async def three_items(job):
        for n in range(3):
            yield {"ciphertext": f"item-{n}"}

    with local_endpoint.Serving(local_endpoint.LocalEndpoint()) as serving:
        job = await _take_and_run(serving, three_items)
    items = [{"ciphertext": f"item-{n}"} for n in range(3)]
    assert (job.status, job.output, job.error) == ("COMPLETED", items, None)
    assert len(job.posts) == 3


async def test_an_error_item_ends_the_job_and_a_raising_handler_leaks_nothing(capfd):
    async def refused(job):
        yield {"ciphertext": "item-0"}
        yield {"error": "INVALID_INPUT: a fixed reason"}
        yield {"ciphertext": "never posted"}

    async def raising(job):
        yield {"ciphertext": "item-0"}
        raise RuntimeError("CANARY-3f1 from a request")

    with local_endpoint.Serving(local_endpoint.LocalEndpoint()) as serving:
        failed = await _take_and_run(serving, refused)
        broken = await _take_and_run(serving, raising)
    assert (failed.status, failed.error, len(failed.posts)) == (
        "FAILED",
        "INVALID_INPUT: a fixed reason",
        1,
    )
    assert (broken.status, broken.error) == ("FAILED", job_loop.INTERNAL_ERROR)
    printed = "".join(capfd.readouterr())
    assert "Handler failed: RuntimeError" in printed
    assert "CANARY" not in printed + str(broken.output)


def test_the_job_loop_is_written_for_this_sdk_version():
    # It overrides JobScaler's loops and reads their attributes: a new SDK
    # version must be read before it is allowed in.
    assert runpod.version.__version__ == job_loop.SDK_VERSION


@pytest.fixture
def stoppable(worker_env, tmp_path):
    """A worker of its own, for the test to stop."""

    def start(**env):
        serving = local_endpoint.Serving(local_endpoint.LocalEndpoint())
        worker = local_endpoint.WorkerProcess(
            serving, {**os.environ, **worker_env, **env}, tmp_path / f"worker-{len(started)}.log"
        )
        started.append((serving, worker))
        worker.wait_ready(timeout_s=600)
        return serving, worker

    started = []
    yield start
    for serving, worker in started:
        worker.stop()
        serving.close()


def engine_processes(worker: local_endpoint.WorkerProcess) -> list[psutil.Process]:
    return psutil.Process(worker.process.pid).children(recursive=True)


def process_names(worker: local_endpoint.WorkerProcess) -> set[str]:
    names = set()
    for process in engine_processes(worker):
        with contextlib.suppress(psutil.NoSuchProcess):  # a helper that has just ended
            names.add(process.name())
    return names


def group_members(pgid: int) -> list[psutil.Process]:
    members = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
            if os.getpgid(process.pid) == pgid and _running(process):
                members.append(process)
    return members


def job_done_lines(log: str) -> dict[str, dict]:
    lines = [
        json.loads(line.split("job done ", 1)[1])
        for line in log.splitlines()
        if "job done {" in line
    ]
    return {line["job"]: line for line in lines}


def _running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def stop_by_sigterm(
    worker: local_endpoint.WorkerProcess, stopped: str = '{"reason": "SIGTERM"}'
) -> str:
    """SIGTERM a worker that holds no job, as docker stop does; its log once
    it exited 0, logging `worker stopped` and `stopped`, with no engine
    process left."""
    children = engine_processes(worker)
    assert children, "the engine runs in processes of its own"
    worker.process.send_signal(15)
    assert worker.process.wait(timeout=30) == 0
    # Helpers of the worker's (multiprocessing's resource tracker, the SDK's
    # heartbeat) may end a moment after it: every one must be gone soon.
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not [child for child in alive if _running(child)]
    log = worker.log_path.read_text()
    assert f"worker stopped {stopped}" in log
    assert "the engine died" not in log
    return log


def test_an_idle_worker_stops_at_once_and_cleanly_even_after_a_corrupt_cache(stoppable, tmp_path):
    cache = tmp_path / "compile-cache"
    _, worker = stoppable(VLLM_CACHE_ROOT=str(cache))
    stop_by_sigterm(worker)
    files = [path for path in cache.rglob("*") if path.is_file()]
    assert any(path.suffix == ".so" for path in files), "the worker left no compiled kernels"
    assert (cache / "modelinfos").is_dir()
    for path in files:  # every file of it cut short
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    _, worker = stoppable(VLLM_CACHE_ROOT=str(cache))  # it boots all the same
    log = stop_by_sigterm(worker)
    assert "worker ready {" in log


def test_a_worker_stopped_while_its_engine_builds_exits_0_and_leaves_no_process(
    worker_env, tmp_path
):
    serving = local_endpoint.Serving(local_endpoint.LocalEndpoint())
    worker = local_endpoint.WorkerProcess(
        serving, {**os.environ, **worker_env}, tmp_path / "worker.log"
    )
    try:
        deadline = time.monotonic() + 300
        while "VLLM::EngineCore" not in process_names(worker):
            assert worker.process.poll() is None, worker.log_tail()
            assert time.monotonic() < deadline, "the engine's process never started"
            time.sleep(0.1)
        log = stop_by_sigterm(worker, '{"reason": "SIGTERM", "booting": true}')
        # Nor one the engine started as the signal came (its process group).
        assert not group_members(worker.process.pid)
        assert "worker ready {" not in log
        assert not serving.endpoint.workers_seen  # it never asked for a job
    finally:
        worker.stop()
        serving.close()


async def test_a_busy_worker_finishes_its_jobs_within_the_grace_then_exits_0(
    stoppable, key, engine, hf_tokenizer
):
    serving, worker = stoppable(STOP_GRACE_S="1")
    endpoint = client.Client(
        base_url=serving.url,
        api_key=serving.endpoint.api_key,
        encryption_key=key,
        poll_interval=0.02,
    )
    short_prompt, greedy = "A short job.", {"temperature": 0, "ignore_eos": True}
    short = endpoint.submit(short_prompt, sampling_params={**greedy, "max_tokens": 32})
    long = endpoint.submit("A long job.", sampling_params={**greedy, "max_tokens": 2000})
    jobs = serving.endpoint.jobs
    deadline = time.monotonic() + 60
    while not all(jobs[job.id].chunks for job in (short, long)):  # both streaming
        assert time.monotonic() < deadline, "the jobs never started"
        time.sleep(0.01)

    worker.process.send_signal(15)
    time.sleep(0.5)  # the worker has stopped taking jobs: this one must wait for another
    late = endpoint.submit("Too late.", sampling_params={**greedy, "max_tokens": 8})

    assert short.result().text == await greedy_text(
        engine, hf_tokenizer(short_prompt).input_ids, 32
    )
    with pytest.raises(client.JobFailed) as caught:
        long.result()
    assert (caught.value.status, caught.value.code) == ("FAILED", ErrorCode.WORKER_STOPPED)
    assert worker.process.wait(timeout=30) == 0
    assert late.status() == "IN_QUEUE"
    endpoint.close()

    log = worker.log_path.read_text()
    lines = job_done_lines(log)
    assert lines[short.id]["outcome"] == "completed"
    assert (lines[long.id]["outcome"], lines[long.id]["error"]) == ("stopped", "WORKER_STOPPED")
    assert late.id not in lines
    assert 'worker stopped {"reason": "SIGTERM"}' in log
