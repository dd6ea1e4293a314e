"""The runpod SDK's job loop, without its waits, with a clean stop.

runpod 1.10.0's `JobScaler` looks for new jobs on timers: a job already
taken starts up to 100 ms late (`run_jobs` looks at its queue every 0.1 s),
and a worker whose every slot is busy sleeps a full second before it takes
the next job (`get_jobs`). Its SIGTERM handler only sets a flag, stays
installed for good (a second signal does nothing), and waits for the jobs
in hand without limit. `EventJobScaler` replaces only those loops: it wakes
on events (a job queued, a job ended, a stop) and reuses the SDK's own job
fetcher, job handler (streaming posts, job-done, aggregation) and stop
channel.

Rules:
- Pinned to runpod 1.10.0 (tests/worker/test_job_loop.py checks the version): it
  overrides `get_jobs`, `run_jobs`, `handle_job`, `monitor_stop_signals`,
  `current_occupancy`, `kill_worker` and `start`, uses the attributes
  those read, and rebinds `rp_job.job_progress`, which the SDK's job take
  reads.
- SIGTERM or SIGINT (or `stop()`) stops taking jobs at once, lets the jobs
  in hand run for `grace_s`, then asks them to end (`on_grace_expired`),
  and cancels whatever is left `cancel_after_s` later, posting its failure.
  A second signal ends the grace at once. No job that RunPod handed to this
  worker is left without a final state.
- A job stopped before its task first ran (so before the handler saw it)
  frees its slot all the same, and is logged as stopped before it started.
- `serverless.start` takes no scaler of ours, so `run_worker` does what the
  SDK's own `run_worker` does (fitness checks, heartbeat, the loop); it
  leaves out the SDK's local test modes, which `rp_handler.py` refuses.
- Each job runs through `stream_job`, not the SDK's `rp_job.handle_job`:
  the same posts (each item to the job-stream URL, then the aggregate to
  job-done, with the SDK's retries of a 5xx), without what the SDK spends
  on every item besides the post (see `stream_job`).
- The jobs in hand reach the SDK's heartbeat, which reports them to RunPod
  with every ping, through the SDK's own state file, written at most once
  per HEARTBEAT_WRITE_S rather than on every job taken and ended
  (`HeartbeatJobs`), and once more when the loop ends. In this process
  memory is the truth and the file only follows it: nothing here reads
  the file back (see `HeartbeatJobs.get_job_list`).
"""

from __future__ import annotations

import asyncio
import functools
import json
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import aiohttp
from runpod.http_client import AsyncClientSession, ClientSession, TooManyRequests
from runpod.serverless.modules import rp_http, rp_job, rp_scale
from runpod.serverless.modules.rp_http import send_result
from runpod.serverless.modules.rp_job import _job_stop_url, get_stop_signals
from runpod.serverless.modules.worker_state import Job, JobsProgress

SDK_VERSION = "1.10.0"
# How long a stopping worker waits for a job-take answer that may be on its
# way before it abandons the poll: far longer than a loopback or datacenter
# round trip, far shorter than a stop's budget.
TAKE_SETTLE_S = 0.2
log = rp_scale.log  # the SDK's own logger, at RUNPOD_LOG_LEVEL
# The SDK's item posts: its headers, and its retries (aiohttp_retry's
# FibonacciRetry(attempts=3): a 5xx answer is tried again after 2 s, then
# 3 s; an exception is not retried).
POST_HEADERS = {"charset": "utf-8", "Content-Type": "application/x-www-form-urlencoded"}
POST_RETRY_WAITS_S = (2.0, 3.0)
INTERNAL_ERROR = "ENGINE_ERROR: internal error in the worker"
# How stale the heartbeat's list of jobs in hand may be: a tenth of the
# SDK's default ping interval (RUNPOD_PING_INTERVAL, 10 s), at which the
# heartbeat process reads it.
HEARTBEAT_WRITE_S = 1.0


class HeartbeatJobs:
    """The jobs in hand, as the SDK's heartbeat process reads them: the SDK's
    `JobsProgress` (a set, and the pickle file it shares with that process),
    written at most once per `write_s` after a change, where the SDK writes
    it on every job added and removed (a file lock, a pickle, a temporary
    file and a rename each time: 12% of the worker process's CPU samples at
    64 streams, profiled with py-spy; docs/benchmarks.md)."""

    def __init__(self, write_s: float = HEARTBEAT_WRITE_S):
        self.jobs = JobsProgress()
        self.write_s = write_s
        self._pending: asyncio.TimerHandle | None = None

    def add(self, job: dict) -> None:
        set.add(self.jobs, Job(**job))
        self._changed()

    def remove(self, job: dict) -> None:
        set.discard(self.jobs, Job(**job))
        self._changed()

    def get(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    def get_job_count(self) -> int:
        return len(self.jobs)

    def get_job_list(self) -> str | None:
        """The jobs in hand as the SDK's job take reports them to RunPod
        (`job_in_progress`), from memory. The SDK's own reloads its set from
        the file first, which here lags memory by up to `write_s`: a job
        ended since the last write came back, for good (seen at 64 streams:
        hundreds of ended jobs reported in hand, a heartbeat URL past 8 KB)."""
        return ",".join(job.id for job in self.jobs) or None

    def write(self) -> None:
        """Write the file now (and cancel a pending write)."""
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        self.jobs._save_state()

    def _changed(self) -> None:
        if self._pending is None:
            self._pending = asyncio.get_running_loop().call_later(self.write_s, self.write)


async def stream_job(session: ClientSession, config: dict[str, Any], job: dict) -> None:
    """`rp_job.handle_job` for this worker's handler, an async generator
    that never raises: each item posted to the job-stream URL as the SDK
    posts it (`{"output": item}`, `isStream=false`, the job's id in
    `X-Request-ID`), the items aggregated (`return_aggregate_stream`) or an
    `{"error": ...}` item ending the job, then the result sent with the
    SDK's own `send_result`.

    What the SDK spends on every item and this does not: two f-strings of
    the item for debug lines that RUNPOD_LOG_LEVEL never prints (formatted
    all the same: the ciphertext, twice), a new retry client and retry
    policy, and a write to the session's shared headers."""
    url = rp_http.JOB_STREAM_URL.replace("$ID", job["id"]) + "&isStream=false"
    headers = {**POST_HEADERS, "X-Request-ID": job["id"]}
    aggregate = config.get("return_aggregate_stream", False)
    result: dict[str, Any] = {"output": []}
    try:
        async for output in config["handler"](job):
            if isinstance(output, dict) and output.get("error"):
                result = {"error": str(output["error"])}
                break
            if aggregate:
                result["output"].append(output)
            body = json.dumps({"output": output}, ensure_ascii=False)
            await _post_item(session, url, body, headers, job["id"])
    except Exception as error:
        # Never the SDK's way (a traceback, possibly with request content,
        # as the job's error): the handler's own rule, kept here too.
        log.error(f"Handler failed: {type(error).__name__}", job["id"])
        result = {"error": INTERNAL_ERROR}
    await send_result(session, result, job, is_stream=True)


async def _post_item(
    session: ClientSession, url: str, body: str, headers: dict[str, str], job_id: str
) -> None:
    for wait_s in (*POST_RETRY_WAITS_S, None):
        try:
            async with session.post(url, data=body, headers=headers) as response:
                if response.status >= 500 and wait_s is not None:
                    await asyncio.sleep(wait_s)
                    continue
                response.raise_for_status()
                await response.read()
            return
        except aiohttp.ClientError as error:
            # As the SDK: logged, and the stream goes on; its aggregate,
            # sent at the end, still holds the item.
            log.error(f"Failed to return job results. | {type(error).__name__}", job_id)
            return


class EventJobScaler(rp_scale.JobScaler):
    """`rp_scale.JobScaler` that waits on events instead of timers, with a
    bounded graceful stop."""

    def __init__(
        self,
        config: dict[str, Any],
        *,
        grace_s: float,
        cancel_after_s: float = 1.0,
        on_grace_expired: Callable[[], None] = lambda: None,
        cut_off_error: str = "the worker stopped",
    ):
        super().__init__(config)
        self.jobs_handler = stream_job
        self.job_progress = HeartbeatJobs()
        # The SDK's job take (`rp_job.get_job`) asks this module-level
        # JobsProgress for the jobs in hand.
        rp_job.job_progress = self.job_progress
        self.grace_s, self.cancel_after_s = grace_s, cancel_after_s
        self.on_grace_expired = on_grace_expired
        # The error of a job still running when even the grace's end did
        # not end it: posted for it, so that RunPod never holds it
        # IN_PROGRESS until its execution timeout.
        self.cut_off_error = cut_off_error
        self._cut_off: set[asyncio.Task] = set()
        # Each waiter clears its event, looks at the state, then waits, with
        # no await between the look and the wait: on one event loop no
        # wake-up is lost.
        self._take_wakeup = asyncio.Event()
        self._run_wakeup = asyncio.Event()
        self._hurry = asyncio.Event()  # a second signal: end the grace now
        self._taking = True  # get_jobs may still bring jobs
        self._drained = False
        self.stop_reason: str | None = None

    def _wake(self) -> None:
        self._take_wakeup.set()
        self._run_wakeup.set()

    def current_occupancy(self) -> int:
        # The SDK's own counts a queued job twice, and counts jobs an earlier
        # process left in ./.runpod_jobs.pkl.
        return self.jobs_queue.qsize() + len(self.jobs_tasks)

    def kill_worker(self) -> None:
        super().kill_worker()
        self._wake()

    def stop(self, reason: str) -> None:
        """Stop taking jobs and let those in hand finish (see `_drain`); a
        second call ends the grace at once. Call it on the event loop."""
        if self.is_alive():
            self.stop_reason = reason
            log.info(f"Stopping ({reason}): no new jobs, {self.current_occupancy()} in hand.")
            self.kill_worker()
        else:
            self._hurry.set()

    # --- the loops -----------------------------------------------------------

    async def get_jobs(self, session: ClientSession):
        try:
            await self._take_jobs(session)
        finally:
            self._taking = False
            self._run_wakeup.set()

    async def _take_jobs(self, session: ClientSession):
        while self.is_alive():
            await self.set_scale()
            wanted = self.current_concurrency - self.current_occupancy()
            if wanted <= 0:
                self._take_wakeup.clear()
                await self._take_wakeup.wait()  # a job ended, or stop()
                continue
            asked = time.monotonic()
            try:
                jobs = await asyncio.wait_for(
                    self.jobs_fetcher(session, wanted), timeout=self.jobs_fetcher_timeout
                )
            except TooManyRequests:
                await self._pause(5)
                continue
            except TimeoutError:
                continue
            except Exception as error:  # as the SDK's loop, but never a tight loop
                log.error(f"Failed to get job. | {type(error).__name__}: {error}")
                await self._pause(1)
                continue
            if not jobs and time.monotonic() - asked < 0.1:
                # RunPod holds job-take open until a job comes; a server that
                # answers "none" at once must not make this a tight loop.
                await self._pause(0.5)
            for job in jobs or ():
                self.job_progress.add(job)  # the heartbeat reports these
                await self.jobs_queue.put(job)
                self._run_wakeup.set()

    async def run_jobs(self, session: ClientSession):
        tasks: set[asyncio.Task] = set()
        while True:
            self._run_wakeup.clear()
            tasks = {task for task in tasks if not task.done()}
            while len(tasks) < self.current_concurrency and not self.jobs_queue.empty():
                tasks.add(self._start_job(session, self.jobs_queue.get_nowait()))
            if not (self.is_alive() or self._taking or not self.jobs_queue.empty()):
                break
            await self._run_wakeup.wait()  # a job queued or ended, a stop, the last take
        await asyncio.gather(*tasks, return_exceptions=True)

    def _start_job(self, session: ClientSession, job: dict) -> asyncio.Task:
        task = asyncio.create_task(self.handle_job(session, job))
        self.jobs_tasks[job["id"]] = task
        task.add_done_callback(functools.partial(self._forget_if_never_run, job))
        return task

    def _forget_if_never_run(self, job: dict, task: asyncio.Task) -> None:
        """A task cancelled before its first step (a job-stop in the same
        turn of the loop as its start) never runs a line of `handle_job`,
        whose `finally` forgets the job: it would hold a slot of the
        concurrency for good, and the heartbeat would report it forever."""
        if self.jobs_tasks.get(job["id"]) is task:
            del self.jobs_tasks[job["id"]]
            self.job_progress.remove(job)
            log.info("Job stopped before it started.", job["id"])
            self._wake()

    async def handle_job(self, session: ClientSession, job: dict):
        try:
            await super().handle_job(session, job)
        except asyncio.CancelledError:
            if asyncio.current_task() in self._cut_off:
                await send_result(session, {"error": self.cut_off_error}, job)
            raise
        finally:
            self._wake()  # a slot is free

    async def monitor_stop_signals(self, session: ClientSession):
        if self.stop_signals_fetcher is get_stop_signals and _job_stop_url() is None:
            log.warn("No stop channel (the job-take URL has another form): cancels are off.")
            return
        # Until the jobs in hand are done, not only while taking jobs: a
        # cancel may come during the grace.
        while not self._drained:
            asked = time.monotonic()
            try:
                stopped = await asyncio.wait_for(
                    self.stop_signals_fetcher(session), timeout=self.stop_signals_fetcher_timeout
                )
                for job_id in stopped:
                    await self.stop_job(job_id)
                if not stopped and time.monotonic() - asked < 0.5:
                    await asyncio.sleep(1)  # answered at once: do not spin
            except TooManyRequests:
                await asyncio.sleep(5)
            except TimeoutError:
                pass
            except Exception as error:
                log.error(f"Stop channel: {type(error).__name__}")
                await asyncio.sleep(1)

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake at a stop."""
        stopping = asyncio.ensure_future(self._shutdown_event.wait())
        try:
            await asyncio.wait({stopping}, timeout=seconds)
        finally:
            stopping.cancel()

    # --- start and stop ------------------------------------------------------

    def start(self):
        sys.excepthook = rp_scale._handle_uncaught_exception
        asyncio.run(self.run())

    async def run(self):
        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT)
        for signum in signals:
            loop.add_signal_handler(signum, self.stop, signal.Signals(signum).name)
        try:
            async with AsyncClientSession() as session:
                take = asyncio.create_task(self.get_jobs(session))
                work = asyncio.create_task(self.run_jobs(session))
                stops = asyncio.create_task(self.monitor_stop_signals(session))
                stopping = asyncio.create_task(self._shutdown_event.wait())
                await asyncio.wait({stopping, take, work}, return_when=asyncio.FIRST_COMPLETED)
                self.kill_worker()  # also where a loop ended by itself
                # No new job: abandon the job-take long-poll rather than wait
                # out its hold; but an answer already on its way carries jobs
                # RunPod now counts as this worker's, which must run.
                await asyncio.wait({take}, timeout=TAKE_SETTLE_S)
                take.cancel()
                await self._drain(work)
                self._drained = True
                stops.cancel()
                await asyncio.gather(take, stops, stopping, return_exceptions=True)
        finally:
            self.job_progress.write()  # no pending write outlives the loop
            for signum in signals:
                loop.remove_signal_handler(signum)

    async def _drain(self, work: asyncio.Task) -> None:
        hurry = asyncio.create_task(self._hurry.wait())
        try:
            await asyncio.wait(
                {work, hurry}, timeout=self.grace_s, return_when=asyncio.FIRST_COMPLETED
            )
            if not work.done():
                log.warn(f"{len(self.jobs_tasks)} job(s) still running after the grace: ending.")
                self.on_grace_expired()
                await asyncio.wait({work}, timeout=self.cancel_after_s)
                for task in list(self.jobs_tasks.values()):
                    self._cut_off.add(task)
                    task.cancel()
            await asyncio.gather(work, return_exceptions=True)
        finally:
            hurry.cancel()


def run_worker(config: dict[str, Any], scaler: EventJobScaler) -> None:
    """What `runpod.serverless.start` ends in (its `worker.run_worker`), with
    our scaler."""
    from runpod.serverless import worker as sdk_worker
    from runpod.serverless.modules.rp_fitness import run_fitness_checks

    # A new process has no job in hand; the SDK would count those an earlier
    # one left in ./.runpod_jobs.pkl, and never take a job at concurrency 1.
    JobsProgress().clear()
    config.setdefault("rp_args", {})
    config.setdefault("reference_counter_start", time.perf_counter())
    asyncio.run(run_fitness_checks())  # exits 1 if one fails
    sdk_worker.heartbeat.start_ping()
    scaler.start()
