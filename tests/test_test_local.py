"""The verification protocol itself: `python3 test_local.py` end to end, and
the verdicts it can reach."""

from __future__ import annotations

import os
import subprocess
import sys

from test_local import Run, verdict

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(text="abc", arrivals=3, ttft_s=0.01, tokens=3) -> Run:
    return Run(text=text, arrivals=arrivals, ttft_s=ttft_s, total_s=1.0, completion_tokens=tokens)


def test_a_streamed_fast_repeatable_run_passes():
    assert verdict(run(), run(), greedy=True) == []


def test_a_completion_in_one_piece_did_not_stream():
    (problem,) = verdict(run(), run(arrivals=1), greedy=True)
    assert "did not stream" in problem


def test_a_single_token_completion_needs_no_second_piece():
    assert verdict(run(tokens=1), run(arrivals=1, tokens=1), greedy=True) == []


def test_a_slow_first_token_fails():
    (problem,) = verdict(run(), run(ttft_s=5.0), greedy=True)
    assert "TTFT" in problem


def test_greedy_runs_must_agree_and_sampled_ones_need_not():
    assert verdict(run(text="abc"), run(text="abd"), greedy=False) == []
    (problem,) = verdict(run(text="abc"), run(text="abd"), greedy=True)
    assert "different text" in problem


def test_the_command_streams_and_succeeds_on_the_tiny_model(tiny_model_dir):
    env = {**os.environ, "MODELS": str(tiny_model_dir), "MAX_MODEL_LEN": "512"}
    env.pop("ENCRYPTION_KEY", None)
    result = subprocess.run(
        [sys.executable, "test_local.py", "--prompt", "Sanity check."],
        cwd=HERE,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert "SUCCESS" in lines
    (summary,) = [line for line in lines if line.startswith("TTFT ")]
    assert " tokens in " in summary and "tokens/s" in summary
