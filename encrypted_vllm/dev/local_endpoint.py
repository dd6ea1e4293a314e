"""A loopback RunPod endpoint: both sides of RunPod's queue on 127.0.0.1.

    python3 -m encrypted_vllm.dev.local_endpoint [--port 8000] [--endpoint-id local] [--api-key KEY]

It prints the command that starts `python3 rp_handler.py` as its worker,
unmodified, exactly as on RunPod (the variables RunPod would set, and the
tiny offline model when MODELS is unset); clients (the client library, the runpod SDK)
call it at http://127.0.0.1:PORT/v2/ENDPOINT_ID.

Rules:
- It speaks RunPod's HTTP protocols, not a shortcut: the public endpoint API
  (/run, /runsync, /stream, /status, /cancel, /health, /purge-queue; Bearer
  or bare-key auth; RunPod's JSON shapes and statuses) and the job API that
  the runpod SDK's worker loop polls (job-take, job-take-batch, job-stream,
  job-done, job-stop, ping). README's "Loopback endpoint" section lists
  where it differs from RunPod.
- `/stream` drains: each poll returns the chunks the worker posted since the
  previous poll, as soon as they are posted, not when the job ends.
- A cancelled job is stopped on its worker through the job-stop channel.
- A worker not seen for `lost_after_s` (no job-take, job-stop or ping) is
  lost: its jobs in progress end FAILED with the error `worker lost: ...`,
  an error string of RunPod's kind, not one of the worker's codes. RunPod
  does not document what becomes of the jobs of a worker that dies; this
  is the loopback's choice, so that no job waits out its execution timeout.
- Everything lives in memory and only on loopback; finished jobs are
  forgotten after RunPod's retention times.

The runpod SDK's own `--rp_serve_api` cannot stand in for this: it runs a
streaming job to its end before `/stream` answers, and has no worker side.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

FINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"})
MAX_PAYLOAD_BYTES = 10 * 1024 * 1024  # RunPod's limit for /run
RUN_RETENTION_S = 30 * 60  # RunPod keeps /run results 30 minutes,
RUNSYNC_RETENTION_S = 60  # and /runsync results 1 minute.
# The container's command, from the checkout (or image folder) this package is in.
WORKER_SCRIPT = Path(__file__).resolve().parents[2] / "rp_handler.py"


@dataclass(eq=False)
class Job:
    id: str
    input: Any
    submitted: float
    execution_timeout_s: float | None
    status: str = "IN_QUEUE"
    worker_id: str | None = None
    taken: float | None = None
    finished: float | None = None
    chunks: list[Any] = field(default_factory=list)  # posted, not yet polled
    output: Any = None
    error: Any = None
    # What RunPod itself observes of the job, for tests of what it learns:
    # each stream post (when, and its body's size) and each /stream poll.
    posts: list[tuple[float, int]] = field(default_factory=list)
    polls: list[float] = field(default_factory=list)

    def envelope(self) -> dict[str, Any]:
        """The job as /status (and /runsync) show it."""
        body: dict[str, Any] = {"id": self.id, "status": self.status}
        now = time.monotonic()
        body["delayTime"] = round(((self.taken or now) - self.submitted) * 1000)
        if self.taken is not None:
            body["executionTime"] = round(((self.finished or now) - self.taken) * 1000)
            body["workerId"] = self.worker_id
        if self.output is not None:
            body["output"] = self.output
        if self.error is not None:
            body["error"] = self.error
        return body


class RateLimit:
    """At most `requests` per `per_s` seconds, as RunPod limits /run."""

    def __init__(self, requests: int, per_s: float):
        self.requests, self.per_s = requests, per_s
        self._taken: collections.deque[float] = collections.deque()

    def take(self) -> float | None:
        """None if a request may pass now, else the seconds until one may."""
        now = time.monotonic()
        while self._taken and self._taken[0] <= now - self.per_s:
            self._taken.popleft()
        if len(self._taken) < self.requests:
            self._taken.append(now)
            return None
        return max(self._taken[0] + self.per_s - now, 0.01)


class LocalEndpoint:
    """One endpoint's queue, jobs and workers, served as an aiohttp app."""

    def __init__(
        self,
        endpoint_id: str = "local",
        api_key: str | None = None,
        *,
        hold_s: float = 2.0,
        execution_timeout_s: float | None = 600.0,
        run_rate_limit: RateLimit | None = None,
        lost_after_s: float | None = 30.0,
    ):
        self.endpoint_id = endpoint_id
        self.api_key = api_key or secrets.token_urlsafe(24)
        # How long job-take and job-stop long-polls wait (RunPod's own hold is
        # not published; the SDK gives up at 90 s). Short, so a stopping
        # worker is not kept waiting.
        self.hold_s = hold_s
        self.execution_timeout_s = execution_timeout_s  # RunPod's default: 10 minutes
        self.run_rate_limit = run_rate_limit  # on /run and /runsync
        # Three times the runpod SDK's default ping interval (10 s), so that a
        # live worker is never taken for lost; None: workers are never lost.
        self.lost_after_s = lost_after_s
        self.jobs: dict[str, Job] = {}
        self.queue: collections.deque[str] = collections.deque()
        self.stops: dict[str, set[str]] = collections.defaultdict(set)
        self.workers_seen: dict[str, float] = {}
        self.counts = collections.Counter()  # completed, failed, rate_limited, ...
        self._changed: asyncio.Condition | None = None
        self.app = self._build_app()

    # --- plumbing -------------------------------------------------------

    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth], client_max_size=MAX_PAYLOAD_BYTES)
        root = "/v2/{endpoint}"
        either = ("GET", "POST")  # RunPod's clients disagree; it takes both
        routes = [
            ("POST", "/run", self.run),
            ("POST", "/runsync", self.runsync),
            *((m, "/status/{job_id}", self.status) for m in either),
            *((m, "/stream/{job_id}", self.stream) for m in either),
            ("POST", "/cancel/{job_id}", self.cancel),
            ("GET", "/health", self.health),
            ("POST", "/purge-queue", self.purge_queue),
            ("GET", "/job-take/{worker_id}", self.job_take),
            ("GET", "/job-take-batch/{worker_id}", self.job_take),
            ("GET", "/job-stop/{worker_id}", self.job_stop),
            ("POST", "/job-stream/{worker_id}/{job_id}", self.job_stream),
            ("POST", "/job-done/{worker_id}/{job_id}", self.job_done),
            ("GET", "/ping/{worker_id}", self.ping),
        ]
        for method, path, handler in routes:
            app.router.add_route(method, root + path, handler)
        app.cleanup_ctx.append(self._watching_workers)
        return app

    async def _watching_workers(self, _app: web.Application):
        """While the app serves: fail the jobs of lost workers."""
        watch = asyncio.ensure_future(self._fail_jobs_of_lost_workers())
        yield
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        if request.match_info.get("endpoint") not in (None, self.endpoint_id):
            return web.json_response({"error": "endpoint not found"}, status=404)
        credential = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not secrets.compare_digest(credential, self.api_key):
            return web.json_response({"error": "unauthorized"}, status=401)
        return await handler(request)

    @property
    def changed(self) -> asyncio.Condition:
        if self._changed is None:  # created on the serving loop
            self._changed = asyncio.Condition()
        return self._changed

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def _wait_until(self, predicate, timeout_s: float) -> bool:
        async with self.changed:
            try:
                await asyncio.wait_for(self.changed.wait_for(predicate), timeout_s)
            except TimeoutError:
                return predicate()
        return True

    def _job(self, request: web.Request) -> Job:
        job = self.jobs.get(request.match_info["job_id"])
        if job is None:
            raise web.HTTPNotFound(
                text=json.dumps({"error": "job not found"}), content_type="application/json"
            )
        return job

    def _finish(self, job: Job, status: str, *, output: Any = None, error: Any = None) -> None:
        job.status, job.output, job.error = status, output, error
        job.finished = time.monotonic()
        self.counts[status.lower()] += 1
        if job.worker_id and status in ("CANCELLED", "TIMED_OUT"):
            self.stops[job.worker_id].add(job.id)
        retention = RUNSYNC_RETENTION_S if job.id.startswith("sync-") else RUN_RETENTION_S
        asyncio.get_running_loop().call_later(retention, self.jobs.pop, job.id, None)

    def _rate_limited(self) -> web.Response | None:
        if self.run_rate_limit is None:
            return None
        retry_after_s = self.run_rate_limit.take()
        if retry_after_s is None:
            return None
        self.counts["rate_limited"] += 1
        return web.json_response(
            {"error": "rate limited"}, status=429, headers={"Retry-After": f"{retry_after_s:.2f}"}
        )

    # --- public endpoint API --------------------------------------------

    async def _submit(self, request: web.Request, prefix: str = "") -> Job | web.Response:
        try:
            body = await request.json()
        except (ValueError, web.HTTPRequestEntityTooLarge):
            return web.json_response({"error": "body must be JSON under 10 MB"}, status=400)
        if not isinstance(body, dict) or "input" not in body:
            return web.json_response({"error": "body must have an 'input'"}, status=400)
        if limited := self._rate_limited():
            return limited
        policy = body.get("policy") or {}
        timeout_ms = policy.get("executionTimeout")
        job = Job(
            id=f"{prefix}{uuid.uuid4()}",
            input=body["input"],
            submitted=time.monotonic(),
            execution_timeout_s=timeout_ms / 1000 if timeout_ms else self.execution_timeout_s,
        )
        self.jobs[job.id] = job
        self.queue.append(job.id)
        await self._notify()
        return job

    async def run(self, request: web.Request) -> web.Response:
        job = await self._submit(request)
        if isinstance(job, web.Response):
            return job
        return web.json_response({"id": job.id, "status": job.status})

    async def runsync(self, request: web.Request) -> web.Response:
        job = await self._submit(request, prefix="sync-")
        if isinstance(job, web.Response):
            return job
        wait_s = min(max(int(request.query.get("wait", 90_000)), 1000), 300_000) / 1000
        await self._wait_until(lambda: job.status in FINAL, wait_s)
        return web.json_response(job.envelope())

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(self._job(request).envelope())

    async def stream(self, request: web.Request) -> web.Response:
        job = self._job(request)
        # `?wait=ms` holds the poll open until there is something to say, as
        # RunPod's Go SDK asks of /stream; without it the poll answers at once.
        wait_s = min(int(request.query.get("wait", 0)), 300_000) / 1000
        if wait_s > 0:
            await self._wait_until(lambda: bool(job.chunks) or job.status in FINAL, wait_s)
        chunks, job.chunks = job.chunks, []
        job.polls.append(time.monotonic())
        return web.json_response({"id": job.id, "status": job.status, "stream": chunks})

    async def cancel(self, request: web.Request) -> web.Response:
        job = self._job(request)
        if job.status not in FINAL:
            if job.id in self.queue:
                self.queue.remove(job.id)
            self._finish(job, "CANCELLED")
            await self._notify()
        return web.json_response({"id": job.id, "status": job.status})

    async def health(self, request: web.Request) -> web.Response:
        running = {job.worker_id for job in self.jobs.values() if job.status == "IN_PROGRESS"}
        recent = {w for w, seen in self.workers_seen.items() if seen > time.monotonic() - 60}
        in_progress = sum(job.status == "IN_PROGRESS" for job in self.jobs.values())
        return web.json_response(
            {
                "jobs": {
                    "completed": self.counts["completed"],
                    "failed": self.counts["failed"],
                    "inProgress": in_progress,
                    "inQueue": len(self.queue),
                    "retried": 0,
                },
                "workers": {
                    "idle": len(recent - running),
                    "initializing": 0,
                    "ready": len(recent - running),
                    "running": len(running & recent),
                    "throttled": 0,
                },
            }
        )

    async def purge_queue(self, request: web.Request) -> web.Response:
        removed = 0
        while self.queue:
            self._finish(self.jobs[self.queue.popleft()], "CANCELLED")
            removed += 1
        await self._notify()
        return web.json_response({"removed": removed, "status": "completed"})

    # --- the worker's job API --------------------------------------------

    async def job_take(self, request: web.Request) -> web.Response:
        worker_id = request.match_info["worker_id"]
        self.workers_seen[worker_id] = time.monotonic()
        batch = "batch_size" in request.query
        wanted = max(int(request.query.get("batch_size", 1)), 1)

        def gone() -> bool:  # a stopping worker abandons its poll: hand it nothing
            return request.transport is None or request.transport.is_closing()

        await self._wait_until(lambda: bool(self.queue) or gone(), self.hold_s)
        if gone() or not self.queue:
            return web.Response(status=204)
        taken = []
        while self.queue and len(taken) < wanted:
            job = self.jobs[self.queue.popleft()]
            job.status, job.worker_id, job.taken = "IN_PROGRESS", worker_id, time.monotonic()
            if job.execution_timeout_s:
                asyncio.get_running_loop().call_later(job.execution_timeout_s, self._time_out, job)
            taken.append({"id": job.id, "input": job.input})
        if not taken:  # another worker's poll took them first
            return web.Response(status=204)
        return web.json_response(taken if batch else taken[0])

    async def _fail_jobs_of_lost_workers(self) -> None:
        if self.lost_after_s is None:
            return
        while True:
            await asyncio.sleep(min(self.lost_after_s / 4, 1.0))
            silent_since = time.monotonic() - self.lost_after_s
            lost = [
                job
                for job in self.jobs.values()
                if job.status == "IN_PROGRESS" and self.workers_seen[job.worker_id] < silent_since
            ]
            for job in lost:
                error = f"worker lost: not seen for {self.lost_after_s:g} s"
                self._finish(job, "FAILED", error=error)
                # Should the worker come back after all, it drops the job.
                self.stops[job.worker_id].add(job.id)
            if lost:
                await self._notify()

    def _time_out(self, job: Job) -> None:
        if job.status not in FINAL:
            self._finish(job, "TIMED_OUT")
            asyncio.ensure_future(self._notify())

    async def job_stop(self, request: web.Request) -> web.Response:
        worker_id = request.match_info["worker_id"]
        self.workers_seen[worker_id] = time.monotonic()
        if not await self._wait_until(lambda: bool(self.stops.get(worker_id)), self.hold_s):
            return web.Response(status=204)
        stopping = sorted(self.stops.pop(worker_id))
        return web.json_response({"jobsToStop": stopping})

    async def _posted(self, request: web.Request) -> tuple[Job | None, dict, int]:
        """The job posted to (None if it ended meanwhile: the post is
        dropped), the body, and its size in bytes."""
        raw = await request.read()
        body = json.loads(raw)  # labelled as form data by the SDK; JSON all the same
        job = self.jobs.get(request.match_info["job_id"])
        if job is not None and job.status in FINAL:
            job = None  # cancelled or timed out meanwhile
        return job, body, len(raw)

    async def job_stream(self, request: web.Request) -> web.Response:
        job, body, size = await self._posted(request)
        if job is not None:
            job.posts.append((time.monotonic(), size))
            job.chunks.append(body)
            await self._notify()
        return web.json_response({"ok": True})

    async def job_done(self, request: web.Request) -> web.Response:
        job, body, _ = await self._posted(request)
        if job is not None:
            if body.get("status") == "IN_PROGRESS":  # a progress update
                job.output = body.get("output")
            elif body.get("error"):
                self._finish(job, "FAILED", output=body.get("output"), error=body["error"])
            else:
                self._finish(job, "COMPLETED", output=body.get("output"))
            await self._notify()
        return web.json_response({"ok": True})

    async def ping(self, request: web.Request) -> web.Response:
        self.workers_seen[request.match_info["worker_id"]] = time.monotonic()
        return web.json_response({"status": "pong"})

    # --- wiring -----------------------------------------------------------

    def worker_env(self, base_url: str, worker_id: str = "local-worker") -> dict[str, str]:
        """The variables RunPod gives a worker, pointed at this endpoint."""
        root = f"{base_url}/v2/{self.endpoint_id}"
        query = "?gpu=LOCAL"  # the SDK appends "&..." to each of these
        return {
            "RUNPOD_WEBHOOK_GET_JOB": f"{root}/job-take/$ID{query}",
            "RUNPOD_WEBHOOK_POST_OUTPUT": f"{root}/job-done/$RUNPOD_POD_ID/$ID{query}",
            "RUNPOD_WEBHOOK_POST_STREAM": f"{root}/job-stream/$RUNPOD_POD_ID/$ID{query}",
            "RUNPOD_WEBHOOK_PING": f"{root}/ping/$RUNPOD_POD_ID{query}",
            "RUNPOD_POD_ID": worker_id,
            "RUNPOD_AI_API_KEY": self.api_key,
            "RUNPOD_ENDPOINT_ID": self.endpoint_id,
            # The SDK's start-up checks would probe a GPU and a public DNS
            # server; nothing here may leave loopback.
            "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",
            "RUNPOD_SKIP_GPU_CHECK": "true",
        }


class ThreadServer:
    """An aiohttp app served on loopback from a background thread, so that
    blocking clients can call it from the main thread."""

    def __init__(self, app: web.Application, port: int = 0):
        self._loop = asyncio.new_event_loop()
        self._runner = web.AppRunner(app, access_log=None)
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        port = self._call(self._start(port))
        self.base_url = f"http://127.0.0.1:{port}"

    async def _start(self, port: int) -> int:
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        return site._server.sockets[0].getsockname()[1]

    def _call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def close(self) -> None:
        self._call(self._runner.cleanup())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class Serving(ThreadServer):
    """A LocalEndpoint served from a background thread."""

    def __init__(self, endpoint: LocalEndpoint, port: int = 0):
        super().__init__(endpoint.app, port)
        self.endpoint = endpoint
        self.url = f"{self.base_url}/v2/{endpoint.endpoint_id}"

    def worker_env(self, worker_id: str = "local-worker") -> dict[str, str]:
        return self.endpoint.worker_env(self.base_url, worker_id)


def _end_with_parent() -> None:
    """In the worker's process, before it runs: end it when the process that
    started it ends, so that no orphaned engine keeps polling."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class WorkerProcess:
    """`python3 rp_handler.py`, started as the container starts it, as the
    worker of a served endpoint; its output (the engine's included) goes to
    a log file."""

    def __init__(
        self,
        serving: Serving,
        env: Mapping[str, str],
        log_path: Path,
        worker_id: str = "local-worker",
    ):
        self.serving, self.worker_id, self.log_path = serving, worker_id, Path(log_path)
        # The runpod SDK keeps its in-progress jobs in the working directory.
        workdir = tempfile.mkdtemp(prefix="worker-")
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-u", str(WORKER_SCRIPT)],
                env={**env, **serving.worker_env(worker_id)},
                cwd=workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own process group, to stop the engine's processes with it;
                # the same session as the caller: a worker in a session of its
                # own starved every other process on a 2-core machine for
                # seconds while generating (vLLM's engine loop spin-yields,
                # and Linux schedules sessions as groups).
                process_group=0,
                preexec_fn=_end_with_parent,
            )

    def wait_ready(self, timeout_s: float, on_boot_line=None) -> None:
        """Wait until the worker polls for jobs, i.e. its engine is up;
        `on_boot_line` gets each `boot:` and `worker ready` line of its log
        as it is written, to show the boot's progress."""
        deadline = time.monotonic() + timeout_s
        read = 0
        while self.worker_id not in self.serving.endpoint.workers_seen:
            if on_boot_line is not None:
                read = self._boot_lines(read, on_boot_line)
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the worker exited with status {self.process.returncode} before taking "
                    f"jobs; the end of its log:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"the worker was not up after {timeout_s:.0f} s")
            time.sleep(0.2)
        if on_boot_line is not None:
            self._boot_lines(read, on_boot_line)

    def _boot_lines(self, offset: int, on_boot_line) -> int:
        with open(self.log_path, "rb") as log:
            log.seek(offset)
            chunk = log.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        for line in complete.decode(errors="replace").splitlines():
            if "worker: boot: " in line or "worker: worker ready " in line:
                on_boot_line(line.split("worker: ", 1)[1])
        return offset + len(complete)

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM to the worker alone, as `docker stop` signals a
        container's first process; SIGKILL after `timeout_s`. Any process of
        the group still alive (an engine process) is killed, and so is any
        process the worker started that left the group (seen once: an
        embedding engine's model process, orphaned, spinning)."""
        descendants = _descendants(self.process.pid)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for process in descendants:
            with contextlib.suppress(Exception):  # gone already, or not ours to kill
                process.kill()
        return self.process.wait()


def _descendants(pid: int) -> list:
    """The processes `pid` started, and theirs (psutil's; none without it)."""
    try:
        import psutil

        return psutil.Process(pid).children(recursive=True)
    except Exception:  # no psutil where only the client side is installed, or pid gone
        return []


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--endpoint-id", default="local")
    parser.add_argument("--api-key", help="default: a random key, printed below")
    args = parser.parse_args(argv)
    endpoint = LocalEndpoint(args.endpoint_id, args.api_key)
    base_url = f"http://127.0.0.1:{args.port}"
    from encrypted_vllm.dev.verify import apply_offline_defaults

    if not os.environ.get("ENCRYPTION_KEY", "").strip():
        print("first, in every terminal: export ENCRYPTION_KEY=$(python3 client.py --generate-key)")
    environ = dict(os.environ)
    apply_offline_defaults(environ)  # MODELS unset: the tiny offline model
    variables = endpoint.worker_env(base_url)
    variables.update(
        (name, environ[name])
        for name in ("MODELS", "VLLM_CPU_KVCACHE_SPACE", "MAX_MODEL_LEN")
        if name in environ
    )
    print(f"endpoint: {base_url}/v2/{endpoint.endpoint_id}  (RUNPOD_API_KEY={endpoint.api_key})")
    print("start its worker in another terminal:")
    lines = [f"{name}={shlex.quote(value)}" for name, value in variables.items()]
    print("  " + " \\\n  ".join([*lines, "python3 rp_handler.py"]))
    print("then call it:")
    print(
        f"  RUNPOD_API_KEY={endpoint.api_key} python3 client.py "
        f"--base-url {base_url}/v2/{endpoint.endpoint_id} --prompt Hello",
        flush=True,
    )
    web.run_app(endpoint.app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
