"""A soak of the production path: thousands of valid and fuzzed jobs from
concurrent streaming clients, through the loopback RunPod endpoint, to real
workers (`python3 rp_handler.py`), one of them stopped with SIGTERM and
another killed midway, each replaced by a new worker; then every job is
audited.

    .venv/bin/python bench/soak.py [--jobs 10000] [--clients 128] [--deadline 3600]

Method. The loopback endpoint (local_endpoint.py) serves from a thread of
this process, with `lost_after_s` of --lost-after seconds. Workers run as
processes of their own, with the container's variables (MODELS unset: the
tiny offline model; STOP_GRACE_S from --stop-grace), one at a time but for
their overlap at a takeover. Worker 1 boots and answers each distinct valid
request of bench/soak_jobs.py twice, alone: its answers, which must agree
and not be empty, are the truth. Then --clients clients (an `AsyncClient`
each, polling every --poll-interval) share --jobs planned jobs: valid ones,
streamed to the end; long valid ones whose stream the client closes after
0 to 3 items (the client library then cancels the job); fuzzed inputs
(--fuzzed of the jobs), most of them sent past the client as raw job input. When --sigterm-at of
the jobs are done, worker 1 gets SIGTERM and worker 2 starts; when
--kill-at are done, worker 2's whole process group gets SIGKILL and worker
3 starts. After the last job, worker 3 is stopped as `docker stop` would,
and every job's final state is read from /status.

Checks; all must hold for exit status 0, else exit 1 with each failure
listed:
- complete: every planned job was submitted before --deadline;
- final: every job reached COMPLETED, FAILED, CANCELLED or TIMED_OUT; at the
  end /health shows none queued or in progress, and as many completed and
  failed as the jobs (so no job was finished twice);
- answers: a valid job that COMPLETED streamed exactly the truth's answer
  (text, tool calls, finish reason, token count), and RunPod stored the
  same; a valid job that ended otherwise (CANCELLED by its client,
  WORKER_STOPPED by the stopped worker, lost with the killed worker)
  streamed a prefix of it; a fuzzed job FAILED with its family's code,
  unless its worker stopped or was lost first, and never COMPLETED;
- workers: one worker got SIGTERM and one SIGKILL, midway; WORKER_STOPPED
  only from the worker that got SIGTERM, "lost with their worker" (FAILED
  with `worker lost: ...`, no code of ours) only from the killed one; the
  stopped workers exit 0 within STOP_GRACE_S + 30 s, logging `worker
  stopped {"reason": "SIGTERM"}`; no worker exits unasked;
- logs: no job has more than one `job done` line in all the workers' logs
  (no job ran twice, or on two workers); a COMPLETED or FAILED job has its
  line in the log of the worker RunPod says ran it, with the same outcome
  and code; a CANCELLED job that a worker took logs "cancelled" (or
  "completed", when it finished before the stop reached it, or "stopped",
  on the worker that got SIGTERM, when its grace ended first, or the job
  loop's "Job stopped before it started", when the stop came first);
- privacy: no worker log and no job's error holds the canary, a key or a
  Fernet token;
- processes: a worker that exits leaves no process of its tree running
  (VLLM::EngineCore, VLLM::Worker, the SDK's heartbeat), looked for before
  anything kills the rest of its process group; and none is left at the
  end.

Figures: jobs by kind, outcomes by status and code (and by kind), the jobs
lost with their worker, cancels, TTFT p50/p99 of the valid jobs that
completed (client-side, from submitting to the first content: all of them,
and those clear of a takeover, from its signal to the new worker's first
job-take; and worker-side, the `job done` lines' ttft_s),
jobs/s, the peak RSS of the workers' process trees (sampled), durations,
the load average; the last line is the whole result as JSON (also written
to --json). Nothing from a request or an answer is printed: jobs are named
by id, kind and table entry.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import httpx  # noqa: E402
import psutil  # noqa: E402
from soak_jobs import CANARY, Fuzzer, ValidRequest, valid_requests  # noqa: E402

from encrypted_vllm.client.library import AsyncClient, AsyncItemStream, ClientError, JobFailed  # noqa: E402
from encrypted_vllm.dev.local_endpoint import FINAL, LocalEndpoint, Serving, WorkerProcess  # noqa: E402
from encrypted_vllm.dev.verify import apply_offline_defaults  # noqa: E402
from encrypted_vllm.wire import channel  # noqa: E402
from encrypted_vllm.wire.protocol import ErrorCode, ProtocolError, StreamItem, join_tool_calls  # noqa: E402

BOOT_TIMEOUT_S = 600.0
# A job may wait out a worker's whole boot in the queue: seen here, on two
# cores shared with other engines, boots of 90 to 470 s.
CLIENT_TIMEOUT_S = BOOT_TIMEOUT_S + 300.0
EXIT_WAIT_S = 30.0  # past STOP_GRACE_S: the engine's shutdown and the exit
DRAIN_S = 60.0  # after --deadline, for the jobs in flight, before they are cancelled
FINAL_WAIT_S = 60.0  # for a job to reach its final state once its client is done
PING_INTERVAL_MS = 1000  # the SDK's heartbeat: the killed worker is missed sooner
RSS_EVERY_S = 0.5
LEFTOVER_WAIT_S = 15.0
FERNET_TOKEN_PREFIX = "gAAAAA"  # version byte and a present-day timestamp
LOST_PREFIX = "worker lost"
STOPPED_BEFORE_START = r'"requestId": "([^"]+)", "message": "Job stopped before it started\."'


# --- Answers -------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """What a job's items say, joined: tool calls without their ids, which
    are new on every run."""

    text: str
    tool_calls: tuple[tuple[str, str], ...]
    finish_reason: str | None
    completion_tokens: int | None  # None: the final item never came

    @property
    def whole(self) -> bool:
        return self.completion_tokens is not None

    def starts(self, truth: Answer) -> bool:
        """Whether this partial answer is the beginning of `truth`: its text,
        and its tool calls (the last one's arguments may be cut short)."""
        if len(self.tool_calls) > len(truth.tool_calls):
            return False
        return truth.text.startswith(self.text) and all(
            name == true_name and true_arguments.startswith(arguments)
            for (name, arguments), (true_name, true_arguments) in zip(
                self.tool_calls, truth.tool_calls, strict=False
            )
        )


def answer_of(items: list[StreamItem]) -> Answer:
    final = next((item for item in items if item.final), None)
    calls = join_tool_calls([delta for item in items for delta in item.tool_calls])
    return Answer(
        text="".join(item.text for item in items),
        tool_calls=tuple((call.name, call.arguments) for call in calls),
        finish_reason=final.finish_reason if final else None,
        completion_tokens=final.usage.completion_tokens if final else None,
    )


# --- The plan --------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedJob:
    index: int
    kind: str  # valid, cancelled, fuzzed
    name: str  # the valid request's name, or the fuzz family
    cancel_after: int | None = None  # items read before the stream is closed
    seed: int = 0  # of a fuzzed input


def make_plan(args, table: list[ValidRequest], fuzzer: Fuzzer) -> list[PlannedJob]:
    rng = random.Random(args.seed)
    long_requests = [request.name for request in table if request.family == "long"]
    plan = []
    for index in range(args.jobs):
        draw = rng.random()
        if draw < args.fuzzed:
            family = fuzzer.pick_family(rng)
            plan.append(PlannedJob(index, "fuzzed", family, seed=rng.randrange(2**32)))
        elif draw < args.fuzzed + args.cancelled:
            name = rng.choice(long_requests)
            plan.append(PlannedJob(index, "cancelled", name, cancel_after=rng.randrange(4)))
        else:
            plan.append(PlannedJob(index, "valid", rng.choice(table).name))
    return plan


@dataclass
class JobResult:
    planned: PlannedJob
    job_id: str | None = None
    submitted_at: float | None = None
    ttft_s: float | None = None
    streamed: Answer | None = None
    client_error: str | None = None  # the client's exception: its type and code only
    status: str | None = None
    error: str | None = None
    worker_id: str | None = None
    stored: Answer | None = None  # what RunPod kept as a COMPLETED job's output

    @property
    def code(self) -> ErrorCode | None:
        parsed = ProtocolError.parse(self.error) if self.error else None
        return parsed.code if parsed else None

    @property
    def lost_with_worker(self) -> bool:
        return self.status == "FAILED" and str(self.error).startswith(LOST_PREFIX)

    @property
    def outcome(self) -> str:
        if self.status != "FAILED":
            return str(self.status)
        if self.lost_with_worker:
            return "FAILED lost with worker"
        return f"FAILED {self.code.value if self.code else 'unknown error'}"


# --- The workers -------------------------------------------------------------------


@dataclass
class WorkerRun:
    id: str
    process: WorkerProcess
    started: float
    ready_s: float | None = None  # boot: from start to its first job-take
    ending: str | None = None  # how the soak ended it: SIGTERM, SIGKILL, stop
    signalled: float | None = None
    exit_code: int | None = None
    exit_s: float | None = None  # from the signal to the exit
    peak_rss: int = 0
    tree: set[psutil.Process] = field(default_factory=set)  # every process it ever held


class Fleet:
    """The soak's worker processes, the peak memory of their trees and every
    process those trees ever held, sampled from a thread."""

    def __init__(self, serving: Serving, env: dict[str, str], log_dir: Path, grace_s: float):
        self.serving, self.env, self.log_dir, self.grace_s = serving, env, log_dir, grace_s
        self.runs: list[WorkerRun] = []
        self.peak_rss = 0  # of all the workers' trees at once
        self.driver_peak_rss = 0
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def start(self) -> WorkerRun:
        worker_id = f"soak-worker-{len(self.runs) + 1}"
        log = self.log_dir / f"{worker_id}.log"
        run = WorkerRun(
            worker_id, WorkerProcess(self.serving, self.env, log, worker_id), time.monotonic()
        )
        self.runs.append(run)
        return run

    async def ready(self, run: WorkerRun, timeout_s: float) -> None:
        await asyncio.to_thread(run.process.wait_ready, timeout_s)
        run.ready_s = time.monotonic() - run.started

    def sigterm(self, run: WorkerRun, ending: str = "SIGTERM") -> None:
        run.ending, run.signalled = ending, time.monotonic()
        _add_tree(run)
        run.process.process.send_signal(signal.SIGTERM)

    def sigkill(self, run: WorkerRun) -> None:
        """A crash: the worker and its engine's processes at once."""
        run.ending, run.signalled = "SIGKILL", time.monotonic()
        _add_tree(run)
        os.killpg(run.process.process.pid, signal.SIGKILL)

    async def exited(self, run: WorkerRun, timeout_s: float) -> int | None:
        try:
            run.exit_code = await asyncio.to_thread(run.process.process.wait, timeout_s)
        except subprocess.TimeoutExpired:
            return None
        run.exit_s = time.monotonic() - run.signalled
        return run.exit_code

    async def stop(self, run: WorkerRun) -> None:
        """As `docker stop`, but for the kill: SIGTERM, and wait out its
        grace; the caller looks for what it left before `close` kills it."""
        self.sigterm(run, ending="stop")
        await self.exited(run, self.grace_s + EXIT_WAIT_S)

    def unasked_exits(self) -> list[WorkerRun]:
        return [r for r in self.runs if r.ending is None and r.process.process.poll() is not None]

    def close(self) -> None:
        """Ends every worker still running, whatever happened before: SIGKILL
        to its process group once its grace is over."""
        for run in self.runs:
            run.process.stop(timeout_s=self.grace_s + EXIT_WAIT_S)
        self._stop.set()
        self._sampler.join()

    def leftovers(self, runs: list[WorkerRun] | None = None) -> list[str]:
        """Processes of these workers' trees (all: None) still running, once
        those that ended had time to die (an engine frees gigabytes first)."""
        # list(): one step under the interpreter lock, though the sampler adds.
        tree = [p for run in self.runs if runs is None or run in runs for p in list(run.tree)]
        _, alive = psutil.wait_procs(tree, timeout=LEFTOVER_WAIT_S)
        left = []
        for process in alive:
            with contextlib.suppress(psutil.Error):
                if process.status() != psutil.STATUS_ZOMBIE:
                    left.append(f"{process.name()} (pid {process.pid})")
        return sorted(left)

    def _sample(self) -> None:
        driver = psutil.Process()
        while not self._stop.wait(RSS_EVERY_S):
            total = 0
            for run in list(self.runs):
                if run.process.process.poll() is not None:
                    continue
                rss = 0
                for process in _add_tree(run):
                    with contextlib.suppress(psutil.Error):
                        rss += process.memory_info().rss
                run.peak_rss = max(run.peak_rss, rss)
                total += rss
            self.peak_rss = max(self.peak_rss, total)
            with contextlib.suppress(psutil.Error):
                self.driver_peak_rss = max(self.driver_peak_rss, driver.memory_info().rss)


def _add_tree(run: WorkerRun) -> list[psutil.Process]:
    """The worker's process tree now, added to `run.tree`."""
    try:
        root = psutil.Process(run.process.process.pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.Error:  # it has just exited
        return []
    run.tree.update(tree)
    return tree


# --- The soak ------------------------------------------------------------------------


class Soak:
    """One run: the endpoint, the fleet, the clients, what they saw."""

    def __init__(self, args, serving: Serving, fleet: Fleet, key: str):
        self.args, self.serving, self.fleet, self.key = args, serving, fleet, key
        self.channel = channel.Channel(key)
        self.table = {request.name: request for request in valid_requests()}
        self.fuzzer = Fuzzer(key)
        self.plan = make_plan(args, list(self.table.values()), self.fuzzer)
        self.truth: dict[str, Answer] = {}
        self.truth_jobs: list[str] = []
        self.results: list[JobResult] = []
        self.done = 0
        self.failures: list[str] = []
        self.started = time.monotonic()
        self.deadline = self.started + args.deadline
        self.stopping = False  # no new jobs: the deadline passed, or the soak was aborted
        self.load_task: asyncio.Task | None = None
        self.load_span: tuple[float, float] | None = None
        # From a takeover's signal to the new worker's first job-take.
        self.takeovers: list[tuple[float, float]] = []
        self.http = httpx.AsyncClient(
            base_url=serving.url,
            headers={"Authorization": f"Bearer {serving.endpoint.api_key}"},
            timeout=60,
            limits=httpx.Limits(max_connections=None),
        )

    def fail(self, check: str, message: str) -> None:
        self.failures.append(f"{check}: {message}")

    def abort(self, check: str, message: str) -> None:
        self.fail(check, message)
        self.stopping = True
        if self.load_task is not None:
            self.load_task.cancel()

    def remaining_s(self) -> float:
        return max(self.deadline - time.monotonic(), 1.0)

    def client(self, poll_interval: float) -> AsyncClient:
        return AsyncClient(
            base_url=self.serving.url,
            api_key=self.serving.endpoint.api_key,
            encryption_key=self.key,
            poll_interval=poll_interval,
            timeout=CLIENT_TIMEOUT_S,
        )

    async def until(self, condition: Callable[[], bool]) -> bool:
        """Wait for `condition`; False if the soak stops first."""
        while not condition():
            load_ended = self.load_task is not None and self.load_task.done()
            if self.stopping or load_ended or time.monotonic() > self.deadline:
                return False
            await asyncio.sleep(0.1)
        return True

    # --- the scenario ----------------------------------------------------------

    async def run(self) -> None:
        args, fleet = self.args, self.fleet
        watch = asyncio.create_task(self._watch())
        try:
            current = fleet.start()
            if not await self._boot(current):
                return
            if not await self._establish_truth():
                return
            self.load_task = asyncio.create_task(self._load())
            if await self.until(lambda: self.done >= args.jobs * args.sigterm_at):
                stopped, current = current, fleet.start()
                fleet.sigterm(stopped)
                await self._takeover(stopped, current, self._check_stopped_exit)
            if not self.stopping and await self.until(
                lambda: self.done >= args.jobs * args.kill_at
            ):
                killed, current = current, fleet.start()
                fleet.sigkill(killed)
                await self._takeover(killed, current, self._check_killed_exit)
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self.load_task, self.remaining_s() + DRAIN_S)
            if current.process.process.poll() is None and current.ending is None:
                await fleet.stop(current)
                self._check_stopped_exit(current)
                await self._check_left_nothing(current)
        except TimeoutError:
            self.fail("complete", f"jobs still in flight {DRAIN_S:.0f} s after the deadline")
        finally:
            watch.cancel()

    async def _boot(self, run: WorkerRun) -> bool:
        try:
            await self.fleet.ready(run, min(BOOT_TIMEOUT_S, self.remaining_s()))
        except RuntimeError as error:
            self.abort("workers", f"{run.id} did not come up: {str(error).splitlines()[0]}")
            return False
        return True

    async def _takeover(self, old: WorkerRun, new: WorkerRun, check_exit) -> None:
        signalled = old.signalled
        booted, _ = await asyncio.gather(
            self._boot(new), self.fleet.exited(old, self.args.stop_grace + EXIT_WAIT_S)
        )
        check_exit(old)
        await self._check_left_nothing(old)
        if booted:
            self.takeovers.append((signalled, time.monotonic()))

    def _check_stopped_exit(self, run: WorkerRun) -> None:
        limit = self.args.stop_grace + EXIT_WAIT_S
        if run.exit_code is None:
            self.fail("workers", f"{run.id} had not exited {limit:.0f} s after SIGTERM")
        elif run.exit_code != 0:
            self.fail("workers", f"{run.id} exited {run.exit_code} after SIGTERM (0 expected)")
        if 'worker stopped {"reason": "SIGTERM"}' not in run.process.log_path.read_text(
            errors="replace"
        ):
            self.fail("workers", f"{run.id} did not log its stop for SIGTERM")

    async def _check_left_nothing(self, run: WorkerRun) -> None:
        if run.exit_code is None:
            return  # still running: nothing to look for yet
        for process in await asyncio.to_thread(self.fleet.leftovers, [run]):
            self.fail("processes", f"{run.id} exited and left {process} running")

    def _check_killed_exit(self, run: WorkerRun) -> None:
        if run.exit_code != -signal.SIGKILL:
            self.fail("workers", f"{run.id} exited {run.exit_code} after SIGKILL")

    async def _watch(self) -> None:
        """Aborts on a worker that exits unasked, and reports progress."""
        last_report = time.monotonic()
        while True:
            await asyncio.sleep(1)
            for run in self.fleet.unasked_exits():
                run.ending = "exited by itself"
                code = run.process.process.returncode
                self.abort("workers", f"{run.id} exited with status {code} unasked")
            if time.monotonic() - last_report >= 15:
                last_report = time.monotonic()
                elapsed = last_report - self.started
                in_flight = len(self.results) - self.done
                print(
                    f"[{elapsed:6.0f} s] {self.done}/{self.args.jobs} jobs done, "
                    f"{in_flight} in flight, {len(self.failures)} failures so far",
                    file=sys.stderr,
                    flush=True,
                )

    # --- the truth -------------------------------------------------------------

    async def _establish_truth(self) -> bool:
        """Each valid request twice on the quiet worker: its answers must agree."""
        async with self.client(poll_interval=0.02) as client:
            for request in self.table.values():
                answers = []
                for _ in range(2):
                    try:
                        async with await client.items(**request.fields) as stream:
                            items = [item async for item in stream]
                    except ClientError as error:
                        self.abort("truth", f"{request.name} failed: {_described(error)}")
                        return False
                    self.truth_jobs.append(stream.job.id)
                    answers.append(answer_of(items))
                if not answers[0].whole or answers[0] != answers[1]:
                    self.abort("truth", f"{request.name}: two quiet runs disagree")
                    return False
                if not (answers[0].text or answers[0].tool_calls):
                    self.abort("truth", f"{request.name}: the answer is empty")  # nothing to check
                    return False
                self.truth[request.name] = answers[0]
        return True

    # --- the load --------------------------------------------------------------

    async def _load(self) -> None:
        pending = iter(self.plan)
        started = time.monotonic()
        try:
            await asyncio.gather(*(self._client_loop(pending) for _ in range(self.args.clients)))
        finally:
            self.load_span = (started, time.monotonic())

    async def _client_loop(self, pending) -> None:
        async with self.client(self.args.poll_interval) as client:
            while not self.stopping:
                if time.monotonic() > self.deadline:
                    self.stopping = True
                    break
                planned = next(pending, None)
                if planned is None:
                    break
                result = JobResult(planned)
                self.results.append(result)
                await self._run_job(client, result)
                self.done += 1

    async def _submit(self, client: AsyncClient, planned: PlannedJob) -> AsyncItemStream:
        if planned.kind != "fuzzed":
            return await client.items(**self.table[planned.name].fields)
        case = self.fuzzer.make(planned.name, planned.seed)
        if case.request is not None:
            return await client.items(**case.request)
        response = await self.http.post("/run", json={"input": case.job_input})
        response.raise_for_status()
        return client.job(response.json()["id"]).items()

    async def _run_job(self, client: AsyncClient, result: JobResult) -> None:
        planned = result.planned
        try:
            stream = await self._submit(client, planned)
        except (ClientError, httpx.HTTPError) as error:
            result.client_error = f"submit: {type(error).__name__}"
            return
        result.job_id, result.submitted_at = stream.job.id, stream.job.submitted_at
        items: list[StreamItem] = []
        try:
            async with stream:
                if planned.cancel_after != 0:
                    async for item in stream:
                        items.append(item)
                        if len(items) == planned.cancel_after:
                            break  # closing the stream cancels the job
        except ClientError as error:
            result.client_error = _described(error)
        result.streamed = answer_of(items)
        if stream.completion is not None:
            result.ttft_s = stream.completion.ttft_s
        await self.read_final_state(result, FINAL_WAIT_S)

    async def read_final_state(self, result: JobResult, wait_s: float) -> None:
        """The job's state from /status, once final (or after `wait_s`)."""
        until = time.monotonic() + wait_s
        while True:
            response = await self.http.get(f"/status/{result.job_id}")
            envelope = response.json() if response.status_code == 200 else {"status": "NOT FOUND"}
            if envelope["status"] in FINAL or time.monotonic() > until:
                break
            await asyncio.sleep(0.25)
        result.status, result.error = envelope["status"], envelope.get("error")
        result.worker_id = envelope.get("workerId")
        if result.status == "COMPLETED":
            try:
                stored = [self.channel.open_item(output) for output in envelope["output"]]
            except (ProtocolError, KeyError, TypeError):
                stored = []
            result.stored = answer_of([item for item in stored if not item.empty])


def _described(error: ClientError) -> str:
    """An exception by its type, and a job's by its status and code: never
    its message, which a server could fill with anything."""
    if isinstance(error, JobFailed):
        code = error.code.value if error.code else "no code"
        return f"{type(error).__name__} {error.status} {code}"
    return type(error).__name__


# --- The audit -------------------------------------------------------------------------


def job_done_lines(log: str) -> list[dict]:
    lines = []
    for line in log.splitlines():
        if "job done {" in line:
            with contextlib.suppress(ValueError):  # a line cut short by SIGKILL
                lines.append(json.loads(line.split("job done ", 1)[1]))
    return lines


class Audit:
    """Every check of the module's docstring over a finished soak."""

    def __init__(self, soak: Soak):
        self.soak = soak
        self.fail = soak.fail
        runs = soak.fleet.runs
        self.stopped = {run.id for run in runs if run.ending == "SIGTERM"}
        self.killed = {run.id for run in runs if run.ending == "SIGKILL"}
        if (len(self.stopped), len(self.killed)) != (1, 1):
            self.fail(
                "workers",
                f"{len(self.stopped)} workers got SIGTERM and {len(self.killed)} SIGKILL "
                "midway (1 and 1 planned)",
            )
        for run in runs:
            if run.ending is None:  # it exited between two looks of the watch
                code = run.process.process.returncode
                self.fail("workers", f"{run.id} ended, but not by the soak (status {code})")
        self.logs = {run.id: run.process.log_path.read_text(errors="replace") for run in runs}
        self.lines: dict[str, list[tuple[str, dict]]] = collections.defaultdict(list)
        for worker_id, log in self.logs.items():
            for line in job_done_lines(log):
                self.lines[line["job"]].append((worker_id, line))
        # Jobs whose stop came before their handler began (job_loop.py).
        self.stopped_before_start = {
            worker_id: set(re.findall(STOPPED_BEFORE_START, log))
            for worker_id, log in self.logs.items()
        }

    async def run(self, health: dict) -> None:
        soak = self.soak
        submitted = [result for result in soak.results if result.job_id is not None]
        if len(submitted) < soak.args.jobs:
            self.fail("complete", f"{len(submitted)} of {soak.args.jobs} jobs were submitted")
        for result in soak.results:
            if result.job_id is None:
                self.fail(
                    "complete",
                    f"job {result.planned.index} ({_name(result)}) was not submitted: "
                    f"{result.client_error}",
                )
            elif result.status is None:  # its client was cancelled: read it now
                await soak.read_final_state(result, 0)
        for result in submitted:
            self.final(result)
            self.answer(result)
            self.worker(result)
            self.log_line(result)
            if CANARY in str(result.error) or FERNET_TOKEN_PREFIX in str(result.error):
                self.fail("privacy", f"job {result.job_id}'s error holds the canary or a token")
        self.health(health, submitted)
        self.job_lines_once()
        self.privacy()

    def final(self, result: JobResult) -> None:
        if result.status not in FINAL:
            self.fail("final", f"job {result.job_id} ({_name(result)}) is {result.status}")
        elif result.status == "TIMED_OUT":
            self.fail("final", f"job {result.job_id} ({_name(result)}) timed out")

    def answer(self, result: JobResult) -> None:
        kind, status, code = result.planned.kind, result.status, result.code
        where = f"job {result.job_id} ({_name(result)})"
        cut_short = code is ErrorCode.WORKER_STOPPED or result.lost_with_worker
        if kind == "fuzzed":
            expected = self.soak.fuzzer.families[result.planned.name].code
            if status == "COMPLETED":
                self.fail("answers", f"{where} COMPLETED")
            elif not (status == "FAILED" and (code is expected or cut_short)):
                self.fail("answers", f"{where} ended {result.outcome}, not FAILED {expected}")
            return
        truth = self.soak.truth[result.planned.name]
        if status == "COMPLETED":
            if result.streamed != truth and kind == "valid":
                self.fail("answers", f"{where} streamed another answer than the truth")
            if result.stored != truth:
                self.fail("answers", f"{where} is stored with another answer than the truth")
        elif status == "CANCELLED" and kind != "cancelled":
            self.fail("answers", f"{where} was cancelled ({result.client_error})")
        elif status != "CANCELLED" and not cut_short:
            self.fail("answers", f"{where} ended {result.outcome}")
        if result.streamed is not None and not result.streamed.starts(truth):
            self.fail("answers", f"{where} streamed text that is not the truth's")

    def worker(self, result: JobResult) -> None:
        where = f"job {result.job_id} ({_name(result)})"
        if result.code is ErrorCode.WORKER_STOPPED and result.worker_id not in self.stopped:
            self.fail("workers", f"{where} ended WORKER_STOPPED on {result.worker_id}")
        if result.lost_with_worker and result.worker_id not in self.killed:
            self.fail("workers", f"{where} was lost with {result.worker_id}, which lived")
        if result.status == "FAILED" and result.code is None and not result.lost_with_worker:
            self.fail("workers", f"{where} failed with an error that is none of ours")

    def log_line(self, result: JobResult) -> None:
        where = f"job {result.job_id} ({_name(result)})"
        lines = self.lines.get(result.job_id, [])
        if lines and result.worker_id is None:
            self.fail("logs", f"{where} was logged by a worker but never handed to one")
            return
        if not lines:
            stopped_at_once = result.job_id in self.stopped_before_start.get(result.worker_id, ())
            if result.status == "CANCELLED" and stopped_at_once:
                return
            if result.worker_id is not None and result.worker_id not in self.killed:
                self.fail("logs", f"{where} ran on {result.worker_id}, which never logged it")
            return
        worker_id, line = lines[0]
        if worker_id != result.worker_id:
            self.fail("logs", f"{where} ran on {result.worker_id} but {worker_id} logged it")
        if result.lost_with_worker:
            return
        outcome, code = line.get("outcome"), result.code
        expected = {
            "COMPLETED": {"completed"},
            "CANCELLED": {"cancelled", "completed"},  # completed: before the stop reached it
            "FAILED": {"stopped"} if code is ErrorCode.WORKER_STOPPED else {"failed"},
        }.get(result.status, set())
        if result.status == "CANCELLED" and result.worker_id in self.stopped:
            # The cancel and the stopping worker's grace raced; the grace won.
            expected.add("stopped")
        if outcome not in expected:
            self.fail("logs", f"{where} is {result.outcome} but logged as {outcome}")
        elif outcome == "failed" and line.get("error") != (code.value if code else None):
            self.fail("logs", f"{where} is {result.outcome} but logged {line.get('error')}")

    def health(self, health: dict, submitted: list[JobResult]) -> None:
        jobs = health["jobs"]
        if jobs["inQueue"] or jobs["inProgress"]:
            self.fail("final", f"/health: {jobs['inQueue']} queued, {jobs['inProgress']} running")
        statuses = collections.Counter(result.status for result in submitted)
        completed = statuses["COMPLETED"] + len(self.soak.truth_jobs)
        if (jobs["completed"], jobs["failed"]) != (completed, statuses["FAILED"]):
            self.fail(
                "final",
                f"/health counts {jobs['completed']} completed and {jobs['failed']} failed, "
                f"the jobs {completed} and {statuses['FAILED']}",
            )

    def job_lines_once(self) -> None:
        for job_id, lines in self.lines.items():
            if len(lines) > 1:
                workers = ", ".join(worker_id for worker_id, _ in lines)
                self.fail("logs", f"job {job_id} has {len(lines)} job done lines ({workers})")

    def privacy(self) -> None:
        for worker_id, log in self.logs.items():
            for what, secret in (
                ("the canary", CANARY),
                ("the key", self.soak.key),
                ("a Fernet token", FERNET_TOKEN_PREFIX),
            ):
                if secret in log:
                    self.fail("privacy", f"{worker_id}'s log holds {what}")


def _name(result: JobResult) -> str:
    return f"{result.planned.kind} {result.planned.name}"


# --- Figures ---------------------------------------------------------------------------


def percentile(values: list[float], p: int) -> float | None:
    if not values:
        return None
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def figures(soak: Soak, audit: Audit, load_average: dict) -> dict:
    submitted = [result for result in soak.results if result.job_id is not None]
    kinds: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    by_kind: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for result in soak.results:
        planned = result.planned
        family = soak.table[planned.name].family if planned.kind == "valid" else planned.name
        kinds[planned.kind][family] += 1
        by_kind[planned.kind][result.outcome] += 1
    outcomes = collections.Counter(result.outcome for result in submitted)
    cancels = [result for result in submitted if result.planned.kind == "cancelled"]
    lines = [line for pairs in audit.lines.values() for _, line in pairs]
    completed = [
        result
        for result in submitted
        if result.planned.kind == "valid" and result.status == "COMPLETED" and result.ttft_s
    ]

    def clear_of_takeovers(result: JobResult) -> bool:
        start, end = result.submitted_at, result.submitted_at + result.ttft_s
        return not any(start <= until and began <= end for began, until in soak.takeovers)

    ttfts = [result.ttft_s for result in completed]
    steady = [result.ttft_s for result in completed if clear_of_takeovers(result)]
    # The worker's own: from the handler's start to its first item.
    valid_ids = {result.job_id for result in completed}
    on_worker = [line["ttft_s"] for line in lines if line["job"] in valid_ids and "ttft_s" in line]
    load_s = soak.load_span[1] - soak.load_span[0] if soak.load_span else None
    lines_by_worker = collections.Counter(
        worker_id for pairs in audit.lines.values() for worker_id, _ in pairs
    )
    return {
        "jobs": len(submitted),
        "jobs_by_kind": {kind: dict(families) for kind, families in sorted(kinds.items())},
        "outcomes": dict(outcomes.most_common()),
        "outcomes_by_kind": {kind: dict(counts.most_common()) for kind, counts in by_kind.items()},
        "lost_with_worker": outcomes["FAILED lost with worker"],
        "cancels": {
            "cancelled": sum(result.status == "CANCELLED" for result in cancels),
            "finished_before_the_cancel": sum(result.status == "COMPLETED" for result in cancels),
            "logged_cancelled_by_workers": sum(line["outcome"] == "cancelled" for line in lines),
            "stopped_before_their_handler_began": sum(
                len(ids) for ids in audit.stopped_before_start.values()
            ),
        },
        "ttft_ms": {
            "valid_completed": {
                "n": len(ttfts),
                "p50": _ms(percentile(ttfts, 50)),
                "p99": _ms(percentile(ttfts, 99)),
            },
            "clear_of_takeovers": {
                "n": len(steady),
                "p50": _ms(percentile(steady, 50)),
                "p99": _ms(percentile(steady, 99)),
            },
            "worker_side": {
                "n": len(on_worker),
                "p50": _ms(percentile(on_worker, 50)),
                "p99": _ms(percentile(on_worker, 99)),
            },
        },
        "jobs_per_s": round(len(submitted) / load_s, 1) if load_s else None,
        "peak_rss_mb": {
            "workers_together": round(soak.fleet.peak_rss / 2**20),
            **{run.id: round(run.peak_rss / 2**20) for run in soak.fleet.runs},
            "soak_driver": round(soak.fleet.driver_peak_rss / 2**20),
        },
        "duration_s": {
            "total": round(time.monotonic() - soak.started, 1),
            "load": round(load_s, 1) if load_s else None,
        },
        "workers": [
            {
                "id": run.id,
                "boot_s": _rounded(run.ready_s),
                "ended_by": run.ending,
                "exit_code": run.exit_code,
                "exit_s": _rounded(run.exit_s),
                "job_done_lines": lines_by_worker[run.id],
            }
            for run in soak.fleet.runs
        ],
        "truth": {"requests": len(soak.truth), "jobs": len(soak.truth_jobs)},
        "load_average": load_average,
    }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def print_figures(result: dict) -> None:
    print(f"\njobs: {result['jobs']}")
    for kind, families in result["jobs_by_kind"].items():
        spread = ", ".join(f"{name} {count}" for name, count in sorted(families.items()))
        print(f"  {kind:10} {sum(families.values()):6d}  ({spread})")
    print("outcomes:")
    for outcome, count in result["outcomes"].items():
        print(f"  {outcome:32} {count:6d}")
    print("outcomes by kind:")
    for kind, counts in result["outcomes_by_kind"].items():
        print(f"  {kind:10} " + ", ".join(f"{name} {count}" for name, count in counts.items()))
    cancels = result["cancels"]
    print(
        f"cancels: {cancels['cancelled']} cancelled, {cancels['finished_before_the_cancel']} "
        f"finished first; workers logged {cancels['logged_cancelled_by_workers']} as cancelled, "
        f"{cancels['stopped_before_their_handler_began']} as stopped before they started"
    )
    for name, ttft in result["ttft_ms"].items():
        print(f"TTFT {name}: p50 {ttft['p50']} ms, p99 {ttft['p99']} ms, of {ttft['n']}")
    print(f"jobs/s: {result['jobs_per_s']} over {result['duration_s']['load']} s of load")
    rss = result["peak_rss_mb"]
    print("peak RSS MB: " + ", ".join(f"{name} {mb}" for name, mb in rss.items()))
    for run in result["workers"]:
        print(
            f"  {run['id']}: boot {run['boot_s']} s, ended by {run['ended_by']}, "
            f"exit {run['exit_code']} after {run['exit_s']} s, {run['job_done_lines']} job lines"
        )
    print(f"load average: {result['load_average']}")
    print(f"duration: {result['duration_s']['total']} s")
    failures = result["verdict"]["failures"]
    print(f"\nverdict: {'CLEAN' if result['verdict']['clean'] else 'FAILED'}")
    for failure in failures[:50]:
        print(f"  {failure}")
    if len(failures) > 50:
        print(f"  ... and {len(failures) - 50} more (all in the JSON)")


# --- Main ------------------------------------------------------------------------------


def worker_environment(key: str, stop_grace_s: float) -> dict[str, str]:
    env = {**os.environ, "ENCRYPTION_KEY": key}
    apply_offline_defaults(env, "tiny")  # MODELS unset: the tiny offline model
    env.setdefault("TOOL_CALL_PARSER", "hermes")  # the tool_choice "auto" jobs need one
    env["STOP_GRACE_S"] = f"{stop_grace_s:g}"
    env["RUNPOD_PING_INTERVAL"] = str(PING_INTERVAL_MS)
    return env


async def soak_and_audit(args, serving: Serving, fleet: Fleet, key: str) -> tuple[Soak, Audit]:
    soak = Soak(args, serving, fleet, key)
    try:
        await soak.run()
    finally:
        await asyncio.to_thread(fleet.close)  # every worker ended, whatever happened
    audit = Audit(soak)
    await audit.run((await soak.http.get("/health")).json())
    await soak.http.aclose()
    return soak, audit


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=128, help="concurrent streaming clients")
    parser.add_argument("--deadline", type=float, default=3600, help="seconds: no job starts later")
    parser.add_argument("--poll-interval", type=float, default=0.2, help="seconds between polls")
    parser.add_argument("--fuzzed", type=float, default=0.3, help="share of fuzzed jobs")
    parser.add_argument("--cancelled", type=float, default=0.1, help="share of cancelled jobs")
    parser.add_argument("--sigterm-at", type=float, default=0.35, help="share of jobs done")
    parser.add_argument("--kill-at", type=float, default=0.7, help="share of jobs done")
    parser.add_argument("--stop-grace", type=float, default=1.0, help="the workers' STOP_GRACE_S")
    parser.add_argument("--lost-after", type=float, default=5.0, help="the endpoint's lost_after_s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()

    log_dir = Path(tempfile.mkdtemp(prefix="soak-"))
    key = channel.generate_key()
    env = worker_environment(key, args.stop_grace)
    load_start = os.getloadavg()
    endpoint = LocalEndpoint(lost_after_s=args.lost_after)
    print(f"soak: {args.jobs} jobs, {args.clients} clients; worker logs in {log_dir}", flush=True)
    with Serving(endpoint) as serving:
        fleet = Fleet(serving, env, log_dir, args.stop_grace)
        soak, audit = asyncio.run(soak_and_audit(args, serving, fleet, key))
    for process in fleet.leftovers():
        soak.fail("processes", f"{process} is still running")
    load_average = {"start": load_start, "end": os.getloadavg()}
    result = {
        "command": " ".join(["bench/soak.py", *sys.argv[1:]]),
        **figures(soak, audit, load_average),
        "verdict": {"clean": not soak.failures, "failures": soak.failures},
        "logs": str(log_dir),
    }
    print_figures(result)
    print(f"logs: {log_dir}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return 0 if not soak.failures else 1


if __name__ == "__main__":
    sys.exit(main())
