"""The worker's configuration: defaults, validation, and no secret in errors."""

from __future__ import annotations

import re

import pytest

from encrypted_vllm.wire import channel
from encrypted_vllm.worker.config import DEFAULT_MAX_CONCURRENCY, ConfigError, WorkerConfig
from encrypted_vllm.worker.models import ModelRef


@pytest.fixture
def env() -> dict[str, str]:
    return {"MODELS": "org/model", "ENCRYPTION_KEY": channel.generate_key()}


def test_defaults(env):
    config = WorkerConfig.from_env(env)
    assert config.models == (ModelRef("org/model"),)
    assert config.gpu_memory_utilization == 0.95
    assert config.max_model_len is None
    assert config.dtype == "auto"
    assert config.tensor_parallel_size is None
    assert config.engine_args == {}
    assert config.max_concurrency == DEFAULT_MAX_CONCURRENCY
    assert config.runpod_log_level == "INFO"
    assert (config.encryption_ttl_s, config.padding_bucket) == (900, 256)
    assert str(config.sources.cached_models_dir) == "/runpod-volume/huggingface-cache/hub"
    assert (config.sources.hf_transfer, config.sources.offline) == (False, False)


def test_every_variable_is_parsed(env):
    env.update(
        MODELS=" org/a , org/b ",
        GPU_MEMORY_UTILIZATION="0.9",
        MAX_MODEL_LEN="4096",
        DTYPE="bfloat16",
        TENSOR_PARALLEL_SIZE="2",
        ENGINE_ARGS='{"enforce_eager": true, "max_num_seqs": 32}',
        MAX_CONCURRENCY="16",
        RUNPOD_LOG_LEVEL="warn",
    )
    config = WorkerConfig.from_env(env)
    assert config.models == (ModelRef("org/a"), ModelRef("org/b"))
    assert (config.gpu_memory_utilization, config.max_model_len) == (0.9, 4096)
    assert (config.dtype, config.tensor_parallel_size) == ("bfloat16", 2)
    assert config.engine_args == {"enforce_eager": True, "max_num_seqs": 32}
    assert (config.max_concurrency, config.runpod_log_level) == (16, "WARN")


def test_empty_variables_count_as_unset(env):
    env.update(MAX_MODEL_LEN="", DTYPE=" ")
    config = WorkerConfig.from_env(env)
    assert (config.max_model_len, config.dtype) == (None, "auto")


def test_every_problem_is_reported_at_once_and_the_key_is_never_repeated():
    bad_key = "not-a-fernet-key-but-secret"
    with pytest.raises(ConfigError) as caught:
        WorkerConfig.from_env(
            {
                "ENCRYPTION_KEY": bad_key,
                "GPU_MEMORY_UTILIZATION": "1.5",
                "ENGINE_ARGS": "[1]",
                "MAX_CONCURRENCY": "0",
                "RUNPOD_LOG_LEVEL": "DEBUG",
                "PADDING_BUCKET": "100",
                "HF_HUB_OFFLINE": "maybe",
                "HF_TOKEN": "hf_secret_token",
            }
        )
    message = str(caught.value)
    for name in (
        "MODELS",
        "ENCRYPTION_KEY",
        "GPU_MEMORY_UTILIZATION",
        "ENGINE_ARGS",
        "MAX_CONCURRENCY",
        "RUNPOD_LOG_LEVEL",
        "PADDING_BUCKET",
        "HF_HUB_OFFLINE",
    ):
        assert name in message
    assert bad_key not in message and "hf_secret_token" not in message


def test_a_missing_key_says_how_to_make_one(env):
    del env["ENCRYPTION_KEY"]
    with pytest.raises(ConfigError, match="generate-key"):
        WorkerConfig.from_env(env)


@pytest.mark.parametrize(
    "models, message",
    [
        ("./no-such-dir", "MODELS: ./no-such-dir: no such directory"),
        ("/models/missing,Org/Fine", "MODELS: /models/missing: no such directory"),
        ("org/name with spaces", "neither a directory nor a Hugging Face repo id (org/name)"),
    ],
)
def test_a_models_entry_that_can_name_no_model_says_why_before_any_download(env, models, message):
    env["MODELS"] = models
    with pytest.raises(ConfigError, match=re.escape(message)):
        WorkerConfig.from_env(env)


def test_a_directory_and_a_repo_id_are_both_models(env, tmp_path):
    env["MODELS"] = f"{tmp_path},Org/Model@v2"
    models = WorkerConfig.from_env(env).models
    assert [(ref.name, ref.revision) for ref in models] == [
        (str(tmp_path), None),
        ("Org/Model", "v2"),
    ]
