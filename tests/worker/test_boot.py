"""Start-up without a running engine: the engine arguments, where vLLM's
compile cache goes (and where it must not), and the phases read from the
lines vLLM's own processes log."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from vllm.config import StructuredOutputsConfig

from encrypted_vllm.wire import channel
from encrypted_vllm.worker import boot
from encrypted_vllm.worker.config import ConfigError, WorkerConfig


@pytest.fixture
def env() -> dict[str, str]:
    return {"MODELS": "org/model", "ENCRYPTION_KEY": channel.generate_key()}


def test_unknown_parser_names_stop_the_worker_naming_the_valid_ones(env):
    env.update(TOOL_CALL_PARSER="hermes-ish", REASONING_PARSER="deepseek_r1")
    with pytest.raises(ConfigError) as caught:
        boot.engine_arguments(WorkerConfig.from_env(env), "/models/x", "org/model")
    message = str(caught.value)
    assert "TOOL_CALL_PARSER: 'hermes-ish' is not one of vLLM's: " in message
    assert "hermes" in message.split("TOOL_CALL_PARSER", 1)[1]
    assert "REASONING_PARSER" not in message


def test_a_reasoning_parser_also_gates_the_structured_output_backend(env):
    env["REASONING_PARSER"] = "qwen3"
    arguments = boot.engine_arguments(WorkerConfig.from_env(env), "/models/x", "org/model")
    assert arguments["reasoning_parser"] == "qwen3"
    assert arguments["structured_outputs_config"].backend == "xgrammar"
    assert arguments["structured_outputs_config"].disable_any_whitespace is True


def test_engine_args_may_choose_another_structured_output_backend(env):
    env["ENGINE_ARGS"] = '{"structured_outputs_config": {"backend": "guidance"}}'
    arguments = boot.engine_arguments(WorkerConfig.from_env(env), "/models/x", "org/model")
    assert arguments["structured_outputs_config"].backend == "guidance"
    env["ENGINE_ARGS"] = '{"structured_outputs_config": {"backend": "no-such"}}'
    with pytest.raises(ConfigError, match="structured_outputs_config is not a valid vLLM one"):
        boot.engine_arguments(WorkerConfig.from_env(env), "/models/x", "org/model")


def test_engine_args_cannot_shadow_variables_or_name_unknown_arguments(env):
    env["ENGINE_ARGS"] = '{"dtype": "half", "no_such_argument": 1, "enable_log_requests": true}'
    config = WorkerConfig.from_env(env)
    with pytest.raises(ConfigError) as caught:
        boot.engine_arguments(config, "/models/x", "org/model")
    message = str(caught.value)
    assert "'dtype'" in message and "'no_such_argument'" in message
    assert "'enable_log_requests'" in message


def test_engine_arguments_carry_every_setting(env):
    env.update(MAX_MODEL_LEN="2048", TENSOR_PARALLEL_SIZE="1", ENGINE_ARGS='{"max_num_seqs": 8}')
    arguments = boot.engine_arguments(WorkerConfig.from_env(env), "/models/x", "org/model")
    assert arguments == {
        "model": "/models/x",
        "served_model_name": "org/model",
        "gpu_memory_utilization": 0.95,
        "max_model_len": 2048,
        "dtype": "auto",
        "tensor_parallel_size": 1,
        "structured_outputs_config": StructuredOutputsConfig(**boot.DEFAULT_STRUCTURED_OUTPUTS),
        "enable_log_requests": False,
        "max_num_seqs": 8,
    }


# --- The compile cache -------------------------------------------------------


def test_the_cache_goes_on_the_network_volume_keyed_by_version_and_device(tmp_path):
    environ: dict[str, str] = {}
    folder = Path(boot.place_compile_cache(environ, volume=tmp_path))
    assert folder.parent == tmp_path / "vllm-cache"
    assert folder.name == "vllm-0.32.0-cpu"
    assert environ["VLLM_CACHE_ROOT"] == str(folder)
    assert environ["VLLM_USE_AOT_COMPILE"] == "0"  # the CPU build cannot load them back
    assert environ["TORCHINDUCTOR_CPP_CACHE_PRECOMPILE_HEADERS"] == "0"  # $TMPDIR starts empty


def test_without_a_volume_the_cache_stays_on_the_containers_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    environ: dict[str, str] = {}
    folder = Path(boot.place_compile_cache(environ, volume=tmp_path / "no-volume"))
    assert folder == tmp_path / "home" / ".cache" / "vllm" / "vllm-0.32.0-cpu"
    assert not (tmp_path / "no-volume").exists()


def test_a_volume_that_cannot_take_the_cache_is_passed_over(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    unwritable = tmp_path / "volume"
    unwritable.mkdir()
    (unwritable / "vllm-cache").write_text("a file where the folder would go")
    folder = Path(boot.place_compile_cache({}, volume=unwritable))
    assert folder.is_relative_to(tmp_path / "home")

    monkeypatch.setattr(boot, "MIN_FREE_BYTES", shutil.disk_usage(tmp_path).free * 2)  # a full one
    environ: dict[str, str] = {}
    assert "vllm-cache" in boot.place_compile_cache(environ, volume=tmp_path / "other")


def test_a_cache_root_set_by_hand_is_kept(tmp_path):
    environ = {"VLLM_CACHE_ROOT": str(tmp_path / "mine"), "TORCHINDUCTOR_CACHE_DIR": "/kernels"}
    assert boot.place_compile_cache(environ, volume=tmp_path) == str(tmp_path / "mine")
    assert environ["TORCHINDUCTOR_CACHE_DIR"] == "/kernels"


def test_torchs_own_default_kernel_cache_is_moved_beside_vllms(tmp_path):
    # As the worker finds its environment once torch and vLLM are imported:
    # torch has written its default ($TMPDIR) into it.
    import torch._inductor.runtime.cache_dir_utils as inductor_dirs

    environ = {"TORCHINDUCTOR_CACHE_DIR": os.path.abspath(inductor_dirs.default_cache_dir())}
    folder = boot.place_compile_cache(environ, volume=tmp_path)
    assert environ["TORCHINDUCTOR_CACHE_DIR"] == os.path.join(folder, "inductor")
    assert environ["TRITON_CACHE_DIR"] == os.path.join(folder, "triton")


# --- The boot's phases -----------------------------------------------------------

# vLLM 0.32's own lines, as its processes print them.
VLLM_LINES = [
    "(Worker pid=2485) INFO 12-01 10:57:10 [default_loader.py:502] "
    "Loading weights took 0.02 seconds",
    "(Worker pid=2485) INFO 12-01 10:57:10 [cpu_model_runner.py:87] "
    "Warming up model for the compilation...",
    "(Worker pid=2485) INFO 12-01 11:00:54 [cpu_model_runner.py:91] Warming up done.",
    "(EngineCore pid=2398) INFO 12-01 11:00:54 [kv_cache_utils.py:2327] CPU KV cache size: "
    "1,048,576 tokens, Maximum concurrency for 512 tokens per request: 2048.00x",
    "(EngineCore pid=2398) INFO 12-01 11:00:55 [core.py:402] init engine (profile, create kv "
    "cache, warmup model) took 224.80 s (compilation: 31.50 s)",
    "(Worker pid=7) INFO 12-01 11:00:55 [gpu_model_runner.py:6582] "
    "Graph capturing finished in 12 secs, took 0.45 GiB",
    "(Worker pid=7) INFO 12-01 11:00:55 [backends.py:296] Directly load the compiled graph(s) "
    "for compile range (1, 8192) from the cache, took 0.412 s",
]


def test_the_phases_vllm_reports_are_read_from_its_lines():
    report = boot.BootReport(process_started=0.0)
    said = [report.read(line) for line in VLLM_LINES]
    assert report.fields == {
        "weights_s": 0.02,
        "warmup_s": report.fields["warmup_s"],
        "kv_cache_tokens": 1048576,
        "engine_init_s": 224.8,
        "compilation_s": 31.5,
        "cuda_graphs_s": 12.0,
        "compile_cache": "hit",
    }
    assert said[0] == "weights took 0.0 s (vLLM)"
    assert said[3] == "the KV cache holds 1,048,576 tokens"
    line = report.ready_line()
    assert line.startswith("worker ready {") and json.loads(line.split(" ", 2)[2])["total_s"] > 0
