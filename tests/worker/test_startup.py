"""`python3 rp_handler.py` refuses to start, with a clear message and a
non-zero status, before it takes any job: bad key, bad configuration, an
engine that cannot start, or no RunPod around it."""

from __future__ import annotations

import os
import subprocess
import sys

from encrypted_vllm.wire import channel

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENGINE_STARTING = "Initializing a V1 LLM engine"


def start_worker(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("ENCRYPTION_KEY", "MODELS")}
    base.update(RUNPOD_WEBHOOK_GET_JOB="http://127.0.0.1:9/job-take/$ID?gpu=x")
    return subprocess.run(
        [sys.executable, "rp_handler.py", *args],
        cwd=ROOT,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_missing_key_stops_the_worker_before_the_engine_loads(tiny_model_dir):
    result = start_worker({"MODELS": str(tiny_model_dir)})
    output = result.stdout + result.stderr
    assert result.returncode == 2
    assert "ENCRYPTION_KEY is not set" in output and "--generate-key" in output
    assert ENGINE_STARTING not in output


def test_a_malformed_key_is_explained_and_never_printed(tiny_model_dir):
    secret = "my-secret-passphrase-not-a-key"
    result = start_worker({"MODELS": str(tiny_model_dir), "ENCRYPTION_KEY": secret})
    output = result.stdout + result.stderr
    assert result.returncode == 2
    assert "ENCRYPTION_KEY: the key is malformed" in output and "44 characters" in output
    assert secret not in output
    assert ENGINE_STARTING not in output


def test_the_sdk_local_modes_are_refused(tiny_model_dir):
    env = {"MODELS": str(tiny_model_dir), "ENCRYPTION_KEY": channel.generate_key()}
    result = start_worker({**env, "RUNPOD_WEBHOOK_GET_JOB": ""})
    assert result.returncode == 2
    assert "test_local.py" in result.stdout + result.stderr
    assert ENGINE_STARTING not in result.stdout + result.stderr


def test_an_engine_that_cannot_start_exits_non_zero_with_the_reason(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["NoSuchModel"]}')
    (tmp_path / "model.safetensors").write_bytes(b"not really weights")
    env = {"MODELS": str(tmp_path), "ENCRYPTION_KEY": channel.generate_key()}
    result = start_worker(env)
    assert result.returncode == 1
    assert "the engine could not start" in result.stdout + result.stderr


def test_when_every_model_fails_the_worker_exits_with_every_reason(tmp_path):
    env = {
        "MODELS": "Org/First,Org/Second@v2",
        "ENCRYPTION_KEY": channel.generate_key(),
        "HF_HUB_OFFLINE": "1",
        "CACHED_MODELS_DIR": str(tmp_path),
        "BAKED_MODELS_DIR": str(tmp_path),
        "HF_HUB_CACHE": str(tmp_path),
    }
    result = start_worker(env)
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert "no model of MODELS could start" in output
    assert "Org/First: HF_HUB_OFFLINE=1 and no cache holds a complete copy" in output
    assert "Org/Second@v2: HF_HUB_OFFLINE=1" in output
    assert ENGINE_STARTING not in output
