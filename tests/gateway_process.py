"""A gateway process of the tests: the checkout's `python3 gateway.py`, or
an installed `encrypted-vllm-gateway`, on a free loopback port."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class GatewayProcess:
    """`COMMAND ARGS --port 0` (by default the checkout's `python3
    gateway.py`), run in `cwd`, its output in a log file."""

    def __init__(
        self,
        args: list[str],
        env: dict[str, str],
        log_path: Path,
        command: tuple[str, ...] = (sys.executable, "gateway.py"),
        cwd: Path = ROOT,
    ):
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                [*command, *args, "--port", "0"],
                cwd=cwd,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                process_group=0,  # see local_endpoint.WorkerProcess
            )
        deadline = time.monotonic() + 60
        while not (found := re.search(r"OpenAI base URL: (\S+)", self.log())):
            assert self.process.poll() is None, self.log()
            assert time.monotonic() < deadline, "the gateway did not start"
            time.sleep(0.05)
        self.url = found.group(1)
        self.origin = self.url.removesuffix("/v1")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def request_lines(self) -> list[dict]:
        return [json.loads(line) for line in re.findall(r"gateway: request (\{.*\})", self.log())]

    def stop(self) -> None:
        """SIGTERM, as a service manager stops it: a graceful stop (uvicorn then
        re-raises the signal, so the exit is the signal's); SIGKILL after 30 s."""
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        assert self.process.returncode == -signal.SIGTERM, self.log()
        assert "Finished server process" in self.log()


def in_front_of(live, log_dir: Path, **env: str) -> GatewayProcess:
    """`python3 gateway.py` for the loopback endpoint of `live` (a
    `tests.conftest.Live`), with its keys, and `env` besides."""
    keys = {"RUNPOD_API_KEY": live.endpoint.api_key, "ENCRYPTION_KEY": live.key}
    return GatewayProcess(
        ["--base-url", live.serving.url], {**os.environ, **keys, **env}, log_dir / "gateway.log"
    )
