"""How long a worker takes to boot, with an empty compile cache and with the
cache the previous boot left, side by side in one run.

    .venv/bin/python bench/cold_start.py [--pairs 3]

Each pair boots the real worker (`python3 rp_handler.py`) twice through the
loopback endpoint, on the worker's model (MODELS, else the tiny offline
model), exactly as a RunPod worker boots: first with an empty compile cache
(a new VLLM_CACHE_ROOT, and so a new Inductor cache beside it: a fresh
worker), then with the cache that first boot left (a later worker of the
same endpoint finding it on the network volume). Each boot is measured from
the process's start: to ready (its first job-take), and to the first token
of its first job (a greedy 16-token request, submitted as soon as it is
ready), and its `worker ready` line gives the phases. The warm boot's time
over the cold one's is taken per pair, first token included; the median of
the pairs is the figure (this machine's speed swings between boots, and a
pair's two boots run back to back). The last line is the result as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from encrypted_vllm.client import library as client  # noqa: E402
from encrypted_vllm.dev import local_endpoint  # noqa: E402
from encrypted_vllm.dev.verify import apply_offline_defaults  # noqa: E402
from encrypted_vllm.worker.config import WorkerConfig  # noqa: E402


def boot_once(cache: Path, key: str, logs: Path, name: str) -> dict:
    """One boot and its first job; the figures, from the process's start."""
    with local_endpoint.Serving(local_endpoint.LocalEndpoint()) as serving:
        env = {**os.environ, "VLLM_CACHE_ROOT": str(cache)}
        spawned = time.monotonic()
        worker = local_endpoint.WorkerProcess(serving, env, logs / f"{name}.log")
        try:
            worker.wait_ready(timeout_s=3600)
            ready = time.monotonic() - spawned
            with client.Client(
                base_url=serving.url,
                api_key=serving.endpoint.api_key,
                encryption_key=key,
                poll_interval=0.01,
            ) as endpoint:
                submitted = time.monotonic()
                completion = endpoint.run_sync(
                    "Sanity check.", sampling_params={"temperature": 0, "max_tokens": 16}
                )
            first_token = submitted - spawned + completion.ttft_s
        finally:
            worker.stop()
    log = (logs / f"{name}.log").read_text(errors="replace")
    (ready_line,) = [line for line in log.splitlines() if "worker: worker ready {" in line]
    phases = json.loads(ready_line.split("worker ready ", 1)[1])
    return {"ready_s": round(ready, 2), "first_token_s": round(first_token, 2), "phases": phases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=3)
    args = parser.parse_args()
    apply_offline_defaults(os.environ, "tiny")  # the figures in docs/ are the tiny model's
    key = WorkerConfig.from_env().encryption_key
    logs = Path(tempfile.mkdtemp(prefix="bench-cold-start-"))
    pairs = []
    for index in range(args.pairs):
        cache = logs / f"cache-{index}"
        cold = boot_once(cache, key, logs, f"cold-{index}")
        warm = boot_once(cache, key, logs, f"warm-{index}")
        pairs.append({"cold": cold, "warm": warm})
        print(
            f"  pair {index}: cold {cold['first_token_s']:.1f} s, warm "
            f"{warm['first_token_s']:.1f} s to the first token",
            file=sys.stderr,
        )

    def median(kind: str, figure: str) -> float:
        return round(statistics.median(pair[kind][figure] for pair in pairs), 2)

    ratios = [pair["warm"]["first_token_s"] / pair["cold"]["first_token_s"] for pair in pairs]
    phases = sorted({name for pair in pairs for run in pair.values() for name in run["phases"]})
    print(f"\n{len(pairs)} pairs of boots, medians (s)\n")
    print(f"{'':22} {'cold':>8} {'warm':>8}")
    for figure in ("ready_s", "first_token_s"):
        print(f"{figure:22} {median('cold', figure):8.2f} {median('warm', figure):8.2f}")
    for name in phases:
        values = {
            kind: [pair[kind]["phases"][name] for pair in pairs if name in pair[kind]["phases"]]
            for kind in ("cold", "warm")
        }
        if all(isinstance(v, int | float) for vs in values.values() for v in vs) and all(
            values.values()
        ):
            cells = [statistics.median(values[kind]) for kind in ("cold", "warm")]
            print(f"  {name:20} {cells[0]:8.2f} {cells[1]:8.2f}")
    print(
        f"\nwarm / cold, to the first token: median {statistics.median(ratios):.2f} "
        f"(pairs: {', '.join(f'{ratio:.2f}' for ratio in ratios)})"
    )
    print(f"logs: {logs}")
    print(json.dumps({"pairs": pairs, "warm_over_cold": [round(r, 3) for r in ratios]}))


if __name__ == "__main__":
    main()
