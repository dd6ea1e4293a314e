"""The production path side by side: this worker as deployed against a
worker of the official RunPod vLLM worker's design (or against this worker
at an earlier commit), each under the runpod SDK's job loop polling a
loopback RunPod endpoint over real HTTP, on the same model and engine
arguments, in alternating paired rounds.

    .venv/bin/python bench/production.py [--model tiny|real] [--concurrency 1,16,64]
        [--tokens 256] [--rounds 8] [--seconds 0] [--jobs-per-stream 3]
        [--proxy-yield reads|batched] [--max-concurrency N] [--proxy-max-concurrency N]
        [--baseline COMMIT] [--json PATH]

The two sides, each with its own `local_endpoint.LocalEndpoint` served
from a thread of this process (RunPod's job API: job-take, job-stream,
job-done, over loopback HTTP):

  ours:     `python3 rp_handler.py` (`local_endpoint.WorkerProcess`), this
            checkout's worker as the container runs it: its own
            `EventJobScaler` on the runpod SDK. Jobs are requests sealed by
            the client library's channel (`Channel(key).seal_request(...)`).
  proxy:    bench/proxy_worker.py, a handler of our own built the way the
            official worker (github.com/runpod-workers/worker-vllm) is built:
            the SDK's stock `runpod.serverless.start`, each job's plaintext
            OpenAI completions request (RunPod's `openai_route` /
            `openai_input` passthrough) POSTed to a `vllm serve` process
            (bench/throughput.py's `vllm_serve`: the worker's engine
            arguments, access log off) with a new aiohttp session per job,
            the response's raw SSE text yielded a read at a time
            (--proxy-yield reads, the official worker since 2026-07-31), or in
            batches of 1, 3, 9, 27, then 50 events (--proxy-yield batched, its
            earlier in-process design). The SDK logs at INFO, as ours does
            (the official worker leaves it at the SDK's default, DEBUG, which
            logs every item: outputs). See proxy_worker.py's docstring.
  baseline: with --baseline COMMIT, instead of the proxy: this worker at
            that commit (a `git worktree` in a temporary folder, removed at
            the end), its `rp_handler.py` run with the worktree as working
            directory and on PYTHONPATH, its jobs sealed and its items read
            by that commit's own wire code (in a subprocess), so that a
            regression shows as a ratio in one run.

Both sides are booted once and stay up; their rounds alternate. At each
concurrency C, C clients each submit a job (/run) and, once it has ended,
the next: C x --jobs-per-stream jobs a round (at least 8), greedy, --tokens
tokens each with ignore_eos, each job its own prompt. A round runs on one
side at a time, the sides taking turns to go first, at least --rounds pairs
and until the level has run for --seconds; each level starts with a
warm-up round on each side, not counted. From what the loopback endpoint
records of each job (`Job.taken`, `Job.posts`), per side and round:

- tokens/s: the round's output tokens over the time from its first job
  take to its last stream post;
- TTFT: from a job's take to its first stream post (p50 of the round;
  p50 and p95 over all rounds in the table);
- stream tokens/s: a job's tokens after its first post over the time from
  that post to its last (the round's median job): the pace of a stream
  once it runs, which is the engine's own wherever the side keeps up with
  it, so that what a side gains or loses at a job's start shows apart;
- posts/job: RunPod stream posts (job-stream) a job, job-done not counted;
- CPU s per 1000 tokens: user and system CPU of all of the side's
  processes during the round (psutil): the worker's process tree; for the
  proxy, its handler process and the `vllm serve` process tree. Also
  split by process, each root alone and its children: ours's worker
  process (the SDK's loop, the handler, vLLM's front end) and its engine
  processes; the proxy's handler, `vllm serve`'s API server and its engine
  processes. The endpoint (RunPod's side) and the clients run in this
  process and are not counted, but share the machine.

Off the clock, as a client does it on its own machine: sealing a round's
requests (before it) and reading its items back (after it, from each job's
aggregated output, `return_aggregate_stream`). Every job must complete
with exactly --tokens tokens, and the first 4 jobs of each level's first
round must carry the same text on both sides (greedy), so that a fast
wrong answer cannot pass; a level that differs is reported as such, its
goals `invalid`, and the run exits 1.

Ratios ours/other are paired round by round (the pair's rounds run back to
back, so that a swing in the machine's load falls on both) and given as
the median with its 95% confidence interval (bench/throughput.py's
`median_ci`: distribution-free, from the order statistics; under six pairs
it has no interval). Goals of issue 27, judged on the interval
(`verdict`: met, missed, or not resolved): against the proxy, tokens/s at
64 streams at least 2.0 times (tiny model) or 1.3 times (real model), at
one stream at least 1.3 times, and CPU per token at most 0.5 times the
proxy's at 64 streams; against a baseline, tokens/s at least 1.0 times at
every level. The last line is the whole result as JSON (also written to
--json).

Both sides get MAX_CONCURRENCY = --max-concurrency (default: 64, ours's
deployed default, or the top level if larger, so that each side holds every
stream; the proxy's can be set apart, e.g. to the official default of 30).
Where a level fills every slot, the SDK's stock loop (the proxy's, and an
old baseline's) sleeps a second before it takes the next job. The model is the worker's: MODELS and
the engine variables from the environment, else the offline model
--model names (bench/throughput.py's rule). Every process started here is
in its own process group and is stopped at the end, on Ctrl-C, SIGTERM
or failure too; the logs stay in the temporary folder printed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

import httpx  # noqa: E402
import psutil  # noqa: E402
from throughput import cpu_seconds, median_ci, verdict, vllm_serve  # noqa: E402

from encrypted_vllm.dev import local_endpoint  # noqa: E402
from encrypted_vllm.dev.verify import apply_offline_defaults  # noqa: E402
from encrypted_vllm.wire import channel, protocol  # noqa: E402
from encrypted_vllm.worker.config import WorkerConfig  # noqa: E402

CHECKED_STREAMS = 4  # jobs of each level's first round whose texts are compared
MIN_JOBS = 8  # a round's least jobs, so that a round at one stream lasts
BOOT_TIMEOUT_S = 1800.0
ROUND_TIMEOUT_S = 3600.0
WORKER_ID = "local-worker"
# Issue 27's goals.
GOAL_RATE_AT_TOP = {"tiny": 2.0, "real": 1.3}  # ours/proxy tokens/s at TOP_LEVEL streams
GOAL_RATE_AT_ONE = 1.3  # ours/proxy tokens/s at one stream
GOAL_CPU_AT_TOP = 0.5  # ours/proxy CPU per token at TOP_LEVEL streams
GOAL_OVER_BASELINE = 1.0  # ours/baseline tokens/s at every level
TOP_LEVEL = 64

# Seals requests and opens items with the wire code of the folder it runs
# in (a worktree of an earlier commit): the package layout, or the earlier
# modules at the root. JSON in on stdin, JSON out on stdout.
WORKTREE_CODEC = r"""
import json, sys
from pathlib import Path
if Path("encrypted_vllm/wire/channel.py").exists():
    from encrypted_vllm.wire import channel, protocol
else:
    import protocol
    channel = __import__("channel") if Path("channel.py").exists() else protocol
task = json.load(sys.stdin)
keys = channel.Channel(task["key"])
if task["op"] == "seal":
    out = [
        keys.seal_request(protocol.validate_request(prompt=p, sampling_params=task["sampling"]))
        for p in task["prompts"]
    ]
else:
    out = []
    for items, keep in zip(task["outputs"], task["keep"]):
        opened = [keys.open_item(item) for item in (items if keep else items[-1:])]
        text = "".join(item.text or "" for item in opened) if keep else None
        out.append([opened[-1].usage.completion_tokens, text])
json.dump(out, sys.stdout)
"""


# --- the loopback endpoint and the workers ---------------------------------


class WatchedEndpoint(local_endpoint.LocalEndpoint):
    """A LocalEndpoint that tells a waiting client when its job ends."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.waiters: dict[str, Callable[[], None]] = {}

    def _finish(self, job, status, *, output=None, error=None) -> None:
        super()._finish(job, status, output=output, error=error)
        if (wake := self.waiters.pop(job.id, None)) is not None:
            wake()


class WorktreeWorker(local_endpoint.WorkerProcess):
    """`python3 rp_handler.py` of another checkout, run from that folder."""

    def __init__(self, serving, env, log_path: Path, root: Path):
        self.serving, self.worker_id, self.log_path = serving, WORKER_ID, Path(log_path)
        path = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-u", str(root / "rp_handler.py")],
                env={**env, **serving.worker_env(WORKER_ID), "PYTHONPATH": path},
                cwd=root,
                stdout=log,
                stderr=subprocess.STDOUT,
                process_group=0,  # see local_endpoint.WorkerProcess
                preexec_fn=local_endpoint._end_with_parent,
            )


def stop_group(process: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """SIGTERM to the process, then SIGKILL to its whole group."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def wait_polling(serving, processes: list[subprocess.Popen], name: str, log: Path) -> None:
    """Until the side's worker polls its endpoint for jobs."""
    deadline = time.monotonic() + BOOT_TIMEOUT_S
    while WORKER_ID not in serving.endpoint.workers_seen:
        for process in processes:
            if process.poll() is not None:
                raise RuntimeError(f"{name}: a process exited {process.returncode}; see {log}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} was not up after {BOOT_TIMEOUT_S:.0f} s; see {log}")
        time.sleep(0.2)


@contextlib.contextmanager
def worktree(commit: str):
    """The repository at `commit`, checked out in a temporary folder."""
    folder = Path(tempfile.mkdtemp(prefix="bench-baseline-"))
    path = folder / "tree"
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", "--quiet", str(path), commit],
        check=True,
    )
    try:
        yield path
    finally:
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)],
            check=False,
            capture_output=True,
        )
        shutil.rmtree(folder, ignore_errors=True)
        subprocess.run(["git", "-C", str(REPO), "worktree", "prune"], check=False)


# --- the sides -------------------------------------------------------------


class Side:
    """One worker under test: its endpoint, its processes, its jobs' form."""

    def __init__(self, name: str, serving: local_endpoint.Serving):
        self.name, self.serving = name, serving
        # The roots of the process trees whose CPU counts, by name.
        self.pids: dict[str, int] = {}
        self.http: httpx.AsyncClient | None = None

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of each root process alone and of its children."""
        parts = {}
        for name, pid in self.pids.items():
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(pid)
                alone = sum(root.cpu_times()[:2])
                parts[name] = alone
                parts[f"{name}'s children"] = cpu_seconds(root) - alone
        return parts

    def inputs(self, prompts: list[str], tokens: int) -> list[dict]:
        raise NotImplementedError

    def read(self, outputs: list[list], keep: list[bool]) -> list[tuple[int, str | None]]:
        """Each job's completion tokens, and its text where `keep`."""
        raise NotImplementedError

    async def run_job(self, job_input: dict) -> local_endpoint.Job:
        """Submit a job by /run; return it once the endpoint has it ended."""
        response = await self.http.post("/run", json={"input": job_input})
        response.raise_for_status()
        job_id = response.json()["id"]
        endpoint: WatchedEndpoint = self.serving.endpoint
        loop = asyncio.get_running_loop()
        ended = loop.create_future()

        def settle() -> None:
            if not ended.done():
                ended.set_result(None)

        def wake() -> None:  # on the endpoint's thread
            with contextlib.suppress(RuntimeError):  # this loop closed: the run was stopped
                loop.call_soon_threadsafe(settle)

        endpoint.waiters[job_id] = wake
        job = endpoint.jobs[job_id]
        if job.status not in local_endpoint.FINAL:  # else it ended before the waiter was set
            await ended
        endpoint.waiters.pop(job_id, None)
        return job

    def forget(self, jobs: list[local_endpoint.Job]) -> None:
        """Drop a round's jobs from the endpoint, on its own loop."""
        for job in jobs:
            self.serving._loop.call_soon_threadsafe(self.serving.endpoint.jobs.pop, job.id, None)


class SealedSide(Side):
    """This worker (today's or an earlier commit's): sealed requests."""

    def __init__(self, name, serving, key: str, root: Path | None = None):
        super().__init__(name, serving)
        self.key, self.root = key, root
        self.channel = channel.Channel(key) if root is None else None

    @staticmethod
    def sampling(tokens: int) -> dict:
        return {"temperature": 0.0, "max_tokens": tokens, "ignore_eos": True}

    def _codec(self, task: dict) -> list:
        done = subprocess.run(
            [sys.executable, "-c", WORKTREE_CODEC],
            input=json.dumps({**task, "key": self.key}),
            capture_output=True,
            text=True,
            cwd=self.root,
            env={**os.environ, "PYTHONPATH": str(self.root)},
        )
        if done.returncode:
            raise RuntimeError(f"{self.name}'s wire code failed:\n{done.stderr[-2000:]}")
        return json.loads(done.stdout)

    def inputs(self, prompts, tokens):
        if self.channel is None:
            return self._codec(
                {"op": "seal", "prompts": prompts, "sampling": self.sampling(tokens)}
            )
        return [
            self.channel.seal_request(
                protocol.validate_request(prompt=prompt, sampling_params=self.sampling(tokens))
            )
            for prompt in prompts
        ]

    def read(self, outputs, keep):
        if self.channel is None:
            return [
                tuple(pair)
                for pair in self._codec({"op": "open", "outputs": outputs, "keep": keep})
            ]
        read = []
        for items, kept in zip(outputs, keep, strict=True):
            opened = [self.channel.open_item(item) for item in (items if kept else items[-1:])]
            text = "".join(item.text or "" for item in opened) if kept else None
            read.append((opened[-1].usage.completion_tokens, text))
        return read


class ProxySide(Side):
    """The official design: plaintext OpenAI completions requests, SSE back."""

    def __init__(self, name, serving, model: str):
        super().__init__(name, serving)
        self.model = model

    def inputs(self, prompts, tokens):
        return [
            {
                "openai_route": "/v1/completions",
                "openai_input": {
                    "model": self.model,
                    "prompt": prompt,
                    "max_tokens": tokens,
                    "temperature": 0,
                    "ignore_eos": True,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                },
            }
            for prompt in prompts
        ]

    def read(self, outputs, keep):
        read = []
        for chunks, kept in zip(outputs, keep, strict=True):
            pieces, tokens = [], 0
            for event in "".join(chunks).split("\n\n"):
                event = event.strip()
                if not event.startswith("data: ") or event == "data: [DONE]":
                    continue
                body = json.loads(event[6:])
                if body.get("choices"):
                    pieces.append(body["choices"][0].get("text") or "")
                if body.get("usage"):
                    tokens = body["usage"]["completion_tokens"]
            read.append((tokens, "".join(pieces) if kept else None))
        return read


# --- rounds ----------------------------------------------------------------


@dataclass
class Level:
    """One side at one concurrency, over its measured rounds."""

    rates: list[float] = field(default_factory=list)  # tokens/s of each round
    ttft_p50s: list[float] = field(default_factory=list)  # seconds, each round
    # A stream's own pace: tokens after the first post over the time to the
    # last, per job (median of the round): the engine's speed when the side
    # keeps up with it, whatever its jobs' starts cost.
    stream_rates: list[float] = field(default_factory=list)
    posts_per_job: list[float] = field(default_factory=list)  # each round
    cpu_per_kt: list[float] = field(default_factory=list)  # CPU s per 1000 tokens, each round
    # The same by process (see Side.cpu), each round.
    cpu_parts: list[dict[str, float]] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)  # every job's
    posts: list[int] = field(default_factory=list)  # every job's
    texts: dict[int, str] = field(default_factory=dict)  # the checked jobs' (never printed)

    def summary(self) -> dict:
        return {
            "rounds": len(self.rates),
            "jobs": len(self.ttfts),
            "tokens_per_s": round(statistics.median(self.rates), 1),
            "ttft_p50_ms": _ms(_percentile(self.ttfts, 50)),
            "ttft_p95_ms": _ms(_percentile(self.ttfts, 95)),
            "stream_tokens_per_s": round(statistics.median(self.stream_rates), 1),
            "posts_per_job": round(statistics.fmean(self.posts), 2),
            "cpu_s_per_1000_tokens": round(statistics.median(self.cpu_per_kt), 3),
            "round_tokens_per_s": [round(rate, 1) for rate in self.rates],
            "round_ttft_p50_ms": [_ms(ttft) for ttft in self.ttft_p50s],
            "round_stream_tokens_per_s": [round(rate, 1) for rate in self.stream_rates],
            "round_posts_per_job": [round(posts, 2) for posts in self.posts_per_job],
            "round_cpu_s_per_1000_tokens": [round(cpu, 3) for cpu in self.cpu_per_kt],
            "cpu_s_per_1000_tokens_by_process": {
                name: round(statistics.median(parts[name] for parts in self.cpu_parts), 3)
                for name in self.cpu_parts[0]
            },
        }


def _percentile(values: list[float], p: int) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


async def run_round(
    side: Side, prompts: list[str], concurrency: int, tokens: int, keep: int, level: Level | None
) -> None:
    """Every prompt once as a job, `concurrency` at a time; adds the round
    to `level` (None: a warm-up)."""
    inputs = side.inputs(prompts, tokens)  # the client's work: off the clock
    jobs: list[local_endpoint.Job | None] = [None] * len(inputs)
    queue = iter(range(len(inputs)))  # shared: each job goes to one client

    async def client() -> None:
        for index in queue:
            jobs[index] = await side.run_job(inputs[index])

    cpu_before = side.cpu()
    clients = asyncio.gather(*(client() for _ in range(concurrency)))
    # Its end read even when the run is stopped midway (else asyncio complains).
    clients.add_done_callback(lambda done: done.cancelled() or done.exception())
    await asyncio.wait_for(clients, ROUND_TIMEOUT_S)
    cpu_after = side.cpu()
    cpu_parts = {name: cpu_after[name] - cpu_before.get(name, 0.0) for name in cpu_after}
    failed = [job for job in jobs if job.status != "COMPLETED" or not job.posts]
    if failed:
        # The error's code only (the worker's errors hold no text; vLLM's might).
        errors = sorted({f"{job.status} {str(job.error).split(':', 1)[0][:60]}" for job in failed})
        raise RuntimeError(f"{side.name}: {len(failed)} job(s) did not complete: {errors}")
    keeps = [index < keep for index in range(len(jobs))]
    read = side.read([job.output for job in jobs], keeps)  # off the clock too
    side.forget(jobs)
    if short := [count for count, _ in read if count != tokens]:
        raise RuntimeError(f"{side.name}: a job gave {short[0]} tokens, not {tokens}")
    if level is None:
        return
    span_s = max(job.posts[-1][0] for job in jobs) - min(job.taken for job in jobs)
    ttfts = [job.posts[0][0] - job.taken for job in jobs]
    total = sum(count for count, _ in read)
    level.rates.append(total / span_s)
    level.ttft_p50s.append(statistics.median(ttfts))
    level.stream_rates.append(_stream_rate(jobs, tokens))
    level.posts_per_job.append(statistics.fmean(len(job.posts) for job in jobs))
    level.cpu_per_kt.append(sum(cpu_parts.values()) / total * 1000)
    level.cpu_parts.append({name: cpu / total * 1000 for name, cpu in cpu_parts.items()})
    level.ttfts += ttfts
    level.posts += [len(job.posts) for job in jobs]
    for index, (_, text) in enumerate(read):
        if text is not None:
            level.texts[index] = text


def _stream_rate(jobs: list[local_endpoint.Job], tokens: int) -> float:
    """The median job's tokens after its first post over the time from its
    first post to its last (jobs answered in one post left out)."""
    rates = [
        (tokens - 1) / (job.posts[-1][0] - job.posts[0][0])
        for job in jobs
        if job.posts[-1][0] > job.posts[0][0]
    ]
    return statistics.median(rates) if rates else float("nan")


async def measure(sides: list[Side], args, prompts: list[str]) -> dict[int, dict[str, Level]]:
    results = {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with contextlib.AsyncExitStack() as stack:
        for side in sides:
            side.http = await stack.enter_async_context(
                httpx.AsyncClient(
                    base_url=side.serving.url,
                    headers={"Authorization": f"Bearer {side.serving.endpoint.api_key}"},
                    timeout=60,
                    limits=limits,
                )
            )
        for concurrency in args.concurrency:
            count = max(concurrency * args.jobs_per_stream, MIN_JOBS)
            for side in sides:  # warm-up
                await run_round(side, prompts[:concurrency], concurrency, args.tokens, 0, None)
            levels = {side.name: Level() for side in sides}
            started, round_ = time.monotonic(), 0
            while round_ < args.rounds or time.monotonic() - started < args.seconds:
                # Each side first in turn, so that neither always inherits
                # the other's leftovers (a warm cache, a busy core).
                for side in sides if round_ % 2 == 0 else sides[::-1]:
                    keep = CHECKED_STREAMS if round_ == 0 else 0
                    await run_round(
                        side, prompts[:count], concurrency, args.tokens, keep, levels[side.name]
                    )
                round_ += 1
                rates = "  ".join(f"{name} {level.rates[-1]:.0f}" for name, level in levels.items())
                print(f"  C={concurrency} round {round_}: tokens/s {rates}", file=sys.stderr)
            results[concurrency] = levels
    return results


# --- the report ------------------------------------------------------------


def compare(ours: Level, other: Level) -> dict:
    """ours/other, paired round by round: each metric's median and 95% CI."""
    ratios: dict = {"pairs": len(ours.rates)}
    for key, attribute in (
        ("tokens_per_s", "rates"),
        ("ttft_p50", "ttft_p50s"),
        ("stream_tokens_per_s", "stream_rates"),
        ("posts_per_job", "posts_per_job"),
        ("cpu_per_token", "cpu_per_kt"),
    ):
        values = [
            a / b for a, b in zip(getattr(ours, attribute), getattr(other, attribute), strict=True)
        ]
        ratios[key] = round(statistics.median(values), 3)
        ratios[f"{key}_ci95"] = [_rounded(bound, 3) for bound in median_ci(values)]
        ratios[f"round_{key}"] = [round(value, 3) for value in values]
    return ratios


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _interval(bounds: list[float | None]) -> str:
    return "[?]" if None in bounds else f"[{bounds[0]:.2f} to {bounds[1]:.2f}]"


def goals(ratios: dict, concurrency: int, other: str, model_kind: str, same_text: bool) -> dict:
    wanted: dict[str, tuple[str, Callable[[float], bool]]] = {}
    if other == "baseline":
        wanted[f"tokens/s ours/baseline >= {GOAL_OVER_BASELINE}"] = (
            "tokens_per_s",
            lambda r: r >= GOAL_OVER_BASELINE,
        )
    elif concurrency == TOP_LEVEL:
        goal = GOAL_RATE_AT_TOP[model_kind]
        wanted[f"tokens/s ours/proxy >= {goal}"] = ("tokens_per_s", lambda r: r >= goal)
        wanted[f"CPU per token ours/proxy <= {GOAL_CPU_AT_TOP}"] = (
            "cpu_per_token",
            lambda r: r <= GOAL_CPU_AT_TOP,
        )
    elif concurrency == 1:
        wanted[f"tokens/s ours/proxy >= {GOAL_RATE_AT_ONE}"] = (
            "tokens_per_s",
            lambda r: r >= GOAL_RATE_AT_ONE,
        )
    return {
        name: verdict(*ratios[f"{key}_ci95"], meets) if same_text else "invalid (texts differ)"
        for name, (key, meets) in wanted.items()
    }


def report(rows: dict[int, dict[str, Level]], args, other: str, model_kind: str) -> dict:
    head = (
        f"{'C':>4} {'side':9} {'tok/s':>9} {'TTFT p50':>9} {'p95':>9} {'stream':>8} "
        f"{'posts/job':>9} {'CPU s/kt':>8}  (by process)"
    )
    print(
        f"\n{args.tokens} tokens a stream, greedy, ignore_eos; TTFT in ms from job take to "
        f"first post; stream: a job's tokens/s from its first post to its last"
        f"\n\n{head}\n{'-' * len(head)}"
    )
    table = {}
    for concurrency, levels in rows.items():
        ours, theirs = levels["ours"], levels[other]
        checked = sorted(ours.texts.keys() & theirs.texts.keys())
        same_text = bool(checked) and all(ours.texts[i] == theirs.texts[i] for i in checked)
        differing = [i for i in checked if ours.texts[i] != theirs.texts[i]]
        ratios = compare(ours, theirs)
        summary = {name: level.summary() for name, level in levels.items()}
        for name, s in summary.items():
            print(
                f"{concurrency:4d} {name:9} {s['tokens_per_s']:9.1f} {s['ttft_p50_ms']:9.2f} "
                f"{s['ttft_p95_ms']:9.2f} {s['stream_tokens_per_s']:8.1f} "
                f"{s['posts_per_job']:9.2f} "
                f"{s['cpu_s_per_1000_tokens']:8.3f}  ("
                + ", ".join(
                    f"{part} {cpu:.3f}"
                    for part, cpu in s["cpu_s_per_1000_tokens_by_process"].items()
                )
                + ")"
            )
        print(
            f"{'':4} ours/{other}: tok/s x{ratios['tokens_per_s']:.3f} "
            f"{_interval(ratios['tokens_per_s_ci95'])}  TTFT x{ratios['ttft_p50']:.3f} "
            f"{_interval(ratios['ttft_p50_ci95'])}  "
            f"stream x{ratios['stream_tokens_per_s']:.3f} "
            f"{_interval(ratios['stream_tokens_per_s_ci95'])}  "
            f"posts x{ratios['posts_per_job']:.3f} "
            f"{_interval(ratios['posts_per_job_ci95'])}  CPU/token x{ratios['cpu_per_token']:.3f} "
            f"{_interval(ratios['cpu_per_token_ci95'])}  ({ratios['pairs']} pairs; "
            f"greedy text of {len(checked)} jobs: {'same' if same_text else 'DIFFERENT'})"
        )
        table[str(concurrency)] = {
            **summary,
            "ratios": ratios,
            "checked_jobs": len(checked),
            "same_text": same_text,
            "differing_jobs": differing,
            "goals": goals(ratios, concurrency, other, model_kind, same_text),
        }
    print("\nGoals (met: all of the interval meets it; missed: none of it does):")
    for concurrency, level in table.items():
        statuses = "; ".join(f"{goal}: {status}" for goal, status in level["goals"].items())
        print(f"{concurrency:>4}  {statuses or '(none at this level)'}")
    return table


# --- main ------------------------------------------------------------------


def start_sides(stack: contextlib.ExitStack, args, config: WorkerConfig, logs: Path) -> list[Side]:
    """Both sides booted (at the same time) and polling their endpoints."""
    env = {**os.environ, "MAX_CONCURRENCY": str(args.max_concurrency)}
    ours_serving = stack.enter_context(local_endpoint.Serving(WatchedEndpoint()))
    ours_log = logs / "ours.log"
    worker = local_endpoint.WorkerProcess(ours_serving, env, ours_log, WORKER_ID)
    stack.callback(worker.stop)
    ours = SealedSide("ours", ours_serving, config.encryption_key)
    ours.pids = {"worker": worker.process.pid}
    other_serving = stack.enter_context(local_endpoint.Serving(WatchedEndpoint()))
    print(f"booting ours (log: {ours_log}) ...", file=sys.stderr, flush=True)
    if args.baseline:
        root = stack.enter_context(worktree(args.baseline))
        log = logs / "baseline.log"
        print(f"booting baseline {args.baseline} (log: {log}) ...", file=sys.stderr, flush=True)
        baseline = WorktreeWorker(other_serving, env, log, root)
        stack.callback(baseline.stop)
        other = SealedSide("baseline", other_serving, config.encryption_key, root)
        other.pids = {"worker": baseline.process.pid}
        baseline.wait_ready(BOOT_TIMEOUT_S)
    else:
        from encrypted_vllm.worker import boot
        from encrypted_vllm.worker import models as utils

        ref = config.models[0]
        arguments = boot.engine_arguments(config, str(utils.resolve(ref, config.sources)), ref.name)
        log = logs / "proxy.log"
        print(f"booting vllm serve and the proxy (log: {log}) ...", file=sys.stderr, flush=True)
        server, url = stack.enter_context(vllm_serve(arguments, logs / "serve.log"))
        proxy_env = {
            **os.environ,
            **other_serving.worker_env(WORKER_ID),
            "VLLM_BASE_URL": url,
            "MAX_CONCURRENCY": str(args.proxy_max_concurrency or args.max_concurrency),
            "PROXY_YIELD": args.proxy_yield,
            # The official worker leaves the SDK at its default level, DEBUG,
            # which logs every item it posts: outputs, never to be logged here.
            "RUNPOD_LOG_LEVEL": "INFO",
        }
        workdir = logs / "proxy-workdir"  # where the SDK keeps its state file
        workdir.mkdir()
        with open(log, "wb") as output:
            proxy = subprocess.Popen(
                [sys.executable, "-u", str(BENCH / "proxy_worker.py")],
                env=proxy_env,
                cwd=workdir,
                stdout=output,
                stderr=subprocess.STDOUT,
                process_group=0,
                preexec_fn=local_endpoint._end_with_parent,
            )
        stack.callback(stop_group, proxy)
        other = ProxySide("proxy", other_serving, arguments["served_model_name"])
        other.pids = {"handler": proxy.pid, "vllm serve": server.pid}
        wait_polling(other_serving, [proxy, server], "the proxy", log)
    worker.wait_ready(BOOT_TIMEOUT_S)
    print("both sides are up", file=sys.stderr, flush=True)
    return [ours, other]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1,16,64", help="comma-separated levels")
    parser.add_argument("--tokens", type=int, default=256, help="output tokens a stream")
    parser.add_argument("--rounds", type=int, default=8, help="least paired rounds a level")
    parser.add_argument("--seconds", type=float, default=0, help="least time a level runs")
    parser.add_argument(
        "--jobs-per-stream", type=int, default=3, help="jobs each client runs a round"
    )
    parser.add_argument(
        "--proxy-yield",
        choices=["reads", "batched"],
        default="reads",
        help="the proxy yields each read of vLLM's SSE (the official worker today) or "
        "batches of 1, 3, 9, 27, 50 events (its earlier design)",
    )
    parser.add_argument(
        "--max-concurrency",
        type=int,
        help="both sides' MAX_CONCURRENCY (default: 64, or the top level if larger)",
    )
    parser.add_argument(
        "--proxy-max-concurrency", type=int, help="the proxy's alone (the official default: 30)"
    )
    parser.add_argument(
        "--baseline", metavar="COMMIT", help="run this worker at COMMIT instead of the proxy"
    )
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument(
        "--model",
        choices=["real", "tiny"],
        default="real",
        help="with MODELS unset: the offline real model (SmolLM2-135M-Instruct) or the tiny "
        "random one, whose microsecond steps magnify every per-token and per-item cost",
    )
    args = parser.parse_args()
    args.concurrency = [int(level) for level in args.concurrency.split(",")]
    args.max_concurrency = args.max_concurrency or max(64, *args.concurrency)
    other = "baseline" if args.baseline else "proxy"
    if args.baseline:
        args.baseline = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", f"{args.baseline}^{{commit}}"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()

    # SIGTERM unwinds like Ctrl-C, so that every process is stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    model_kind = "tiny" if args.model == "tiny" and not os.environ.get("MODELS") else "real"
    apply_offline_defaults(os.environ, args.model)
    config = WorkerConfig.from_env()
    logs = Path(tempfile.mkdtemp(prefix="bench-production-"))
    count = max(max(args.concurrency) * args.jobs_per_stream, MIN_JOBS)
    prompts = [f"Stream {n}: the quick brown fox jumps over the lazy dog." for n in range(count)]
    try:
        with contextlib.ExitStack() as stack:
            sides = start_sides(stack, args, config, logs)
            rows = asyncio.run(measure(sides, args, prompts))
            print("stopping ...", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print("interrupted: every process stopped", file=sys.stderr)
        return 130
    finally:
        print(f"logs: {logs}", file=sys.stderr, flush=True)
    result = {
        "model": config.models[0].name,
        "model_kind": model_kind,
        "against": other,
        "baseline_commit": args.baseline,
        "proxy_yield": None if args.baseline else args.proxy_yield,
        "max_concurrency": args.max_concurrency,
        "proxy_max_concurrency": (
            None if args.baseline else args.proxy_max_concurrency or args.max_concurrency
        ),
        "tokens_per_stream": args.tokens,
        "jobs_per_stream": args.jobs_per_stream,
        "levels": report(rows, args, other, model_kind),
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return 0 if all(level["same_text"] for level in result["levels"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
