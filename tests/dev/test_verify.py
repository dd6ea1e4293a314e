"""The verification protocol itself: `python3 test_local.py` end to end on
the production path, and the verdicts it can reach."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from encrypted_vllm.client.library import Completion
from encrypted_vllm.dev.english import looks_like_english
from encrypted_vllm.dev.verify import verdict
from encrypted_vllm.wire.protocol import Usage

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


ENGLISH = "It is a sanity check, and the answer is here for you."


def completion(text=ENGLISH, arrivals=3, ttft_s=0.01, tokens=3) -> Completion:
    return Completion(
        text=text,
        finish_reason="length",
        usage=Usage(prompt_tokens=4, completion_tokens=tokens),
        job_id="job",
        ttft_s=ttft_s,
        total_s=1.0,
        arrivals=arrivals,
    )


def test_a_streamed_fast_repeatable_run_passes():
    assert verdict(completion(), completion(), greedy=True) == []


def test_a_completion_in_one_piece_did_not_stream():
    (problem,) = verdict(completion(), completion(arrivals=1), greedy=True)
    assert "did not stream" in problem


def test_a_single_token_completion_needs_no_second_piece():
    assert verdict(completion(tokens=1), completion(arrivals=1, tokens=1), greedy=True) == []


def test_a_slow_first_token_fails():
    (problem,) = verdict(completion(), completion(ttft_s=5.0), greedy=True)
    assert "TTFT" in problem


def test_greedy_runs_must_agree_and_sampled_ones_need_not():
    other = ENGLISH.replace("here", "there")
    assert verdict(completion(), completion(text=other), greedy=False) == []
    (problem,) = verdict(completion(), completion(text=other), greedy=True)
    assert "different text" in problem


def test_a_text_that_is_not_english_fails():
    noise = completion(text='99\ufffdd9 worldd9 worldd9\ufffd3"\ufffd"')
    (problem,) = verdict(noise, noise, greedy=True)
    assert "does not read as English" in problem


def test_readmes_first_command_streams_english_from_the_offline_default(real_model_dir):
    """`test_local.py --prompt "Sanity check."` with nothing set, as README runs it."""
    env = dict(os.environ)
    for name in ("MODELS", "ENCRYPTION_KEY", "MAX_MODEL_LEN"):
        env.pop(name, None)
    result = subprocess.run(
        [sys.executable, "test_local.py", "--prompt", "Sanity check."],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert "SUCCESS" in lines
    assert any("SmolLM2-135M-Instruct" in line for line in lines if line.startswith("note: "))
    (summary,) = [line for line in lines if line.startswith("TTFT ")]
    assert " tokens in " in summary and "tokens/s" in summary
    # The boot's progress, shown as it happens, then the worker's ready line.
    boot_lines = [line.strip() for line in lines if line.startswith("  boot: ")]
    assert boot_lines[0].startswith("boot: configuration checked, ")
    assert any(line.startswith("boot: engine took ") for line in boot_lines)
    (ready,) = [line.strip() for line in lines if line.startswith("  worker ready {")]
    # Then the answer, streamed, up to the summary line.
    answer = "\n".join(lines[lines.index("  " + ready) + 1 : lines.index(summary)])
    assert looks_like_english(answer), answer
    phases = json.loads(ready.removeprefix("worker ready "))
    assert phases["kv_cache_tokens"] > 0 and phases["weights_s"] >= 0
    assert 0 < phases["config_s"] < phases["engine_s"] < phases["total_s"]


def test_a_bad_variable_fails_at_once_naming_it(tiny_model_dir):
    env = {**os.environ, "MODELS": str(tiny_model_dir), "GPU_MEMORY_UTILIZATION": "2"}
    result = subprocess.run(
        [sys.executable, "test_local.py"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "GPU_MEMORY_UTILIZATION" in result.stderr
