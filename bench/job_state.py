"""The jobs-in-progress file that the runpod SDK's heartbeat reads: CPU per
job taken and ended with the SDK's `JobsProgress` (the file read back at
each job take, rewritten at each job added and ended) against
`job_loop.HeartbeatJobs` (memory, written at most once a second), in one
process, side by side.

    .venv/bin/python bench/job_state.py [--jobs 2000] [--in-hand 64] [--rounds 3]

Each round takes, adds and removes --jobs jobs one after the other while
--in-hand others stay in the set, as at that many streams: a take asks for
the jobs in hand (`get_job_list`, as `rp_job.get_job` does for its URL's
`job_in_progress`), then the job is added and removed. Each job's input is
a sealed request's size (INPUT_CHARS of ciphertext), as the SDK keeps it
in the set and its file. The state file goes to a temporary folder.
Reported per round: CPU microseconds per job, each way.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runpod.serverless.modules.worker_state import JobsProgress  # noqa: E402

from encrypted_vllm.worker.job_loop import HeartbeatJobs  # noqa: E402

INPUT_CHARS = 1464  # "Sanity check." as a chat request, sealed (its padding bucket)


def per_job(state, jobs: list[dict], in_hand: int) -> float:
    """CPU seconds per job taken, added and removed, with `in_hand` jobs held."""
    for job in jobs[:in_hand]:
        state.add(job)
    started = time.process_time()
    for job in jobs[in_hand:]:
        state.get_job_list()  # the job take's `job_in_progress`
        state.add(job)
        state.remove(job)
    return (time.process_time() - started) / (len(jobs) - in_hand)


async def per_job_batched(jobs: list[dict], in_hand: int) -> float:
    state = HeartbeatJobs()
    spent = per_job(state, jobs, in_hand)
    state.write()
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--in-hand", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    JobsProgress._STATE_FILE = os.path.join(tempfile.mkdtemp(), "jobs.pkl")
    jobs = [
        {"id": f"job-{number:06d}", "input": {"ciphertext": "x" * INPUT_CHARS}}
        for number in range(args.jobs + args.in_hand)
    ]
    for round_ in range(1, args.rounds + 1):
        JobsProgress().clear()
        sdk = per_job(JobsProgress(), jobs, args.in_hand)
        JobsProgress().clear()
        ours = asyncio.run(per_job_batched(jobs, args.in_hand))
        print(
            f"round {round_}: CPU per job taken and ended: JobsProgress {sdk * 1e6:.0f} µs, "
            f"HeartbeatJobs {ours * 1e6:.1f} µs"
        )


if __name__ == "__main__":
    main()
