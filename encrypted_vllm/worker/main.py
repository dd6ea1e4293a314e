"""The worker's start: one vLLM engine, encrypted streaming jobs.

`python3 rp_handler.py` (the container's command) runs `main`.

Rules:
- Configuration is read once (`config.WorkerConfig`), before anything heavy
  is imported: a bad variable is reported in under a second. Then the
  engine variables, the model and the engine are checked before the first
  job is taken, and the process exits non-zero with a clear message if any
  of them fails (2: a variable, 1: no model could start).
- Jobs are served by `worker.Worker.handler`, an async generator on one
  event loop and one engine.
- SIGTERM (RunPod stopping the worker) is a normal stop: no new jobs, the
  jobs in hand get STOP_GRACE_S to finish, the engine shuts down, one
  `worker stopped` line, exit 0. While it boots there are no jobs in hand:
  the engine's processes are killed at once, then the same line and exit 0
  (`BootStop`). A dead engine makes the worker exit 1, so that RunPod
  replaces it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable

import psutil  # vLLM's own dependency; light, unlike vLLM

from encrypted_vllm.worker.config import ConfigError, WorkerConfig

log = logging.getLogger("worker")


def _sdk_local_mode(argv: list[str]) -> bool:
    """True where the runpod SDK would run its local test modes, which
    cannot run a streaming handler (they report success without running it)."""
    local_flags = ("--test_input", "--rp_serve_api")
    return not os.environ.get("RUNPOD_WEBHOOK_GET_JOB") or any(
        arg.startswith(local_flags) for arg in argv
    )


def _process_started() -> float:
    """When this process started, on time.monotonic()'s clock."""
    try:
        with open(f"/proc/{os.getpid()}/stat") as stat:
            ticks = int(stat.read().rpartition(")")[2].split()[19])
        return ticks / os.sysconf("SC_CLK_TCK")  # seconds since boot, as CLOCK_MONOTONIC
    except (OSError, ValueError, IndexError):
        return time.monotonic()


class BootStop:
    """The handler of SIGTERM and SIGINT from the end of the configuration
    check until the job loop installs its own. It kills the engine's
    processes, logs `worker stopped` and exits 0 at once: unwinding the boot
    is no use, since vLLM's start-up waits in loops that swallow an exception
    raised from a handler, and its engine core only notes a signal until it
    has finished building (minutes, with compilation); a worker that simply
    died of the signal would leave that engine running on its own."""

    def __init__(self) -> None:
        # Set once the boot's output goes through BootReport's pipe.
        self.release_console: Callable[[], None] = lambda: None
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self)

    def __call__(self, signum: int, _frame) -> None:
        # multiprocessing's resource tracker is spared: once this process is
        # gone, it frees the shared memory the engine's processes leave.
        from multiprocessing import resource_tracker

        spared = getattr(resource_tracker._resource_tracker, "_pid", None)
        # Each process is stopped first, and the tree listed again, until no
        # new one appears: a process killed while it starts a child would
        # leave that child running, out of this tree.
        stopped: dict[int, psutil.Process] = {}
        while found := [
            process
            for process in psutil.Process().children(recursive=True)
            if process.pid not in stopped and process.pid != spared
        ]:
            for process in found:
                stopped[process.pid] = process
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.suspend()
        for process in stopped.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(list(stopped.values()), timeout=5)
        reason = signal.Signals(signum).name
        log.info("worker stopped %s", json.dumps({"reason": reason, "booting": True}))
        self.release_console()
        os._exit(0)  # from wherever the boot was: raising would be swallowed


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    started = _process_started()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = WorkerConfig.from_env()
    except ConfigError as error:
        log.error("%s", error)
        return 2
    if _sdk_local_mode(argv):
        log.error(
            "not running as a RunPod worker (RUNPOD_WEBHOOK_GET_JOB is unset, or a "
            "local SDK flag was given). The runpod SDK's local modes cannot run this "
            "streaming handler; test locally with: python3 test_local.py"
        )
        return 2

    booting = BootStop()
    log.info(
        "boot: configuration checked, %.1f s after the process started", time.monotonic() - started
    )

    # The heavy imports (torch, vLLM: seconds), once the configuration holds.
    imported = time.monotonic()
    from vllm.utils.gc_utils import freeze_gc_heap

    from encrypted_vllm.wire.protocol import ErrorCode, ProtocolError
    from encrypted_vllm.worker import boot, shaping
    from encrypted_vllm.worker.generation import Planner
    from encrypted_vllm.worker.handler import STOPPED_REASON, Worker

    report = boot.BootReport(started)
    report.fields["config_s"] = round(imported - started, 2)
    report.phase("imports", imported)
    report.watch_vllm()
    booting.release_console = report.release_console
    report.fields["compile_cache_dir"] = boot.place_compile_cache()
    try:
        adapters = boot.resolve_adapters(config, report)
        engine = boot.start_engine(config, report)
    except ConfigError as error:
        log.error("%s", error)
        return 2
    except boot.NoModelStarted as error:
        log.error("%s", error)
        return 1
    try:
        planner = Planner(
            engine,
            tool_call_parser=config.tool_call_parser,
            reasoning_parser=config.reasoning_parser,
            adapters=adapters,
            allow_image_urls=config.allow_image_urls,
        )
    except TypeError as error:  # vLLM's: a parser this model's tokenizer cannot serve
        log.error("invalid worker configuration:\n  %s", error)
        engine.shutdown()
        return 2

    died = False

    def on_engine_death() -> None:
        # A dead engine cannot come back: the jobs in flight have failed;
        # stop, and exit non-zero so that RunPod replaces this worker.
        nonlocal died
        died = True
        scaler.stop("the engine died")

    worker = Worker(
        engine,
        config.inbox(),
        planner=planner,
        max_items_per_s=config.max_items_per_s,
        shaper=(
            shaping.Shaping(
                config.stream_interval_ms / 1000,
                config.padding_bucket,
                config.stream_items_quantum,
            )
            if config.stream_interval_ms
            else None
        ),
        on_engine_death=on_engine_death,
    )
    # Start-up leaves millions of long-lived objects (torch, vLLM, the
    # tokenizer); each full garbage collection walked them all, stalling
    # every stream for about half a second (measured). vLLM's own server
    # freezes them out of the collector the same way.
    freeze_gc_heap()
    # The SDK reads its log level at import; set it there and, in case the
    # SDK was imported earlier, on its logger too.
    os.environ["RUNPOD_LOG_LEVEL"] = config.runpod_log_level
    from runpod.serverless.modules.rp_logger import RunPodLogger

    from encrypted_vllm.worker import job_loop

    RunPodLogger().set_level(config.runpod_log_level)
    sdk_config = {
        "handler": worker.handler,
        "concurrency_modifier": lambda _current: config.max_concurrency,
        # /run and /runsync then return every item, for clients that do not stream.
        "return_aggregate_stream": True,
    }
    scaler = job_loop.EventJobScaler(
        sdk_config,
        grace_s=config.stop_grace_s,
        on_grace_expired=worker.stop_jobs,
        cut_off_error=str(ProtocolError(ErrorCode.WORKER_STOPPED, STOPPED_REASON)),
    )
    log.info("%s", report.ready_line())
    job_loop.run_worker(sdk_config, scaler)
    # The engine is done with: its processes never exit by themselves on
    # every build, and vLLM's own shutdown at exit would wait 5 s for them.
    engine.shutdown(timeout=1.0)
    if died:
        log.error("the engine died; exiting so that RunPod replaces this worker")
        return 1
    log.info("worker stopped %s", json.dumps({"reason": scaler.stop_reason}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
