"""LORA_MODULES: its two forms, its checks, finding adapters as models are
found, and the choice of a request's adapter by name and key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from encrypted_vllm.wire import channel
from encrypted_vllm.wire.protocol import ErrorCode, ProtocolError
from encrypted_vllm.worker import boot
from encrypted_vllm.worker.adapters import (
    UNKNOWN_ADAPTER,
    Adapters,
    AdapterSpec,
    parse_lora_modules,
)
from encrypted_vllm.worker.config import ConfigError, WorkerConfig
from encrypted_vllm.worker.models import ModelRef, ModelSources
from tests.local_hub import hub_layout


def adapter_files(rank: int = 8) -> dict[str, bytes]:
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 16, "target_modules": ["q_proj"]}
    return {"adapter_config.json": json.dumps(config).encode(), "adapter_model.safetensors": b"w"}


def write_adapter(folder, rank: int = 8):
    folder.mkdir(parents=True)
    for name, data in adapter_files(rank).items():
        (folder / name).write_bytes(data)
    return folder


def test_both_forms_of_lora_modules(tmp_path):
    folder = write_adapter(tmp_path / "local")
    assert parse_lora_modules(f"sql=org/sql-lora@v2, local={folder}") == (
        AdapterSpec(name="sql", path="org/sql-lora@v2"),
        AdapterSpec(name="local", path=str(folder)),
    )
    parsed = parse_lora_modules(
        '[{"name": "acme", "path": "org/acme", "keys": ["0123abcd"]}, {"name": "x", "path": "o/x"}]'
    )
    assert parsed[0].keys == frozenset({"0123abcd"}) and parsed[1].keys is None
    assert parsed[0].ref == ModelRef("org/acme")


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("sql", "entries are name=path"),
        ("[{", "is not valid JSON"),
        ('{"name": "a"}', "entries are name=path"),
        ('[{"name": "a"}]', "adapter 1: path: Field required"),
        ('[{"name": "a", "path": "o/a", "rank": 8}]', "adapter 1: rank: Extra inputs"),
        ("a=o/a,a=o/b", "two adapters have the same name"),
        ("a b=o/a", "adapter 1: name: String should match pattern"),
        ("a=../adapters/a", "adapter 'a': ../adapters/a: no such directory"),
        ('[{"name": "a", "path": "o/a", "keys": ["not-an-id"]}]', "adapter 'a': keys are key ids"),
    ],
)
def test_lora_modules_problems_are_named(value, problem):
    with pytest.raises(ValueError, match="^" + problem.replace("(", r"\(")):
        parse_lora_modules(value)


def test_the_worker_configuration_takes_adapters_and_their_limits():
    key, other = channel.generate_key(), channel.generate_key()
    (key_id,) = (each.id for each in channel.load_keys(key))
    env = {
        "MODELS": "org/model",
        "ENCRYPTION_KEY": key,
        "LORA_MODULES": json.dumps([{"name": "a", "path": "org/a", "keys": [key_id]}]),
        "MAX_LORA_RANK": "32",
        "MAX_LORAS": "4",
        "LIMIT_MM_PER_PROMPT": "image=2",
        "ALLOW_IMAGE_URLS": "true",
    }
    config = WorkerConfig.from_env(env)
    assert config.lora_modules[0].keys == {key_id}
    assert (config.max_lora_rank, config.max_loras) == (32, 4)
    assert (config.limit_mm_per_prompt, config.allow_image_urls) == ({"image": 2}, True)
    arguments = boot.engine_arguments(config, "/m", "org/model")
    assert arguments["enable_lora"] is True
    assert (arguments["max_lora_rank"], arguments["max_loras"]) == (32, 4)
    assert arguments["limit_mm_per_prompt"] == {"image": 2}
    # An adapter bound to a key the worker does not have is a typo, caught at start.
    with pytest.raises(ConfigError, match="names a key id that is not one of ENCRYPTION_KEY's"):
        WorkerConfig.from_env({**env, "ENCRYPTION_KEY": other})
    # A rank vLLM has no kernels for fails before any download.
    with pytest.raises(ConfigError, match="MAX_LORA_RANK or MAX_LORAS"):
        boot.engine_arguments(
            WorkerConfig.from_env({**env, "MAX_LORA_RANK": "7"}), "/m", "org/model"
        )
    for limits in ("video=1", "image=-1", "image", '{"image": "2"}'):
        with pytest.raises(ConfigError, match="LIMIT_MM_PER_PROMPT"):
            WorkerConfig.from_env({**env, "LIMIT_MM_PER_PROMPT": limits})
    assert WorkerConfig.from_env({**env, "LIMIT_MM_PER_PROMPT": '{"image": 0}'})


def test_no_lora_modules_no_lora_engine():
    env = {"MODELS": "org/model", "ENCRYPTION_KEY": channel.generate_key()}
    arguments = boot.engine_arguments(WorkerConfig.from_env(env), "/m", "org/model")
    assert "enable_lora" not in arguments and "limit_mm_per_prompt" not in arguments
    with pytest.raises(ConfigError, match="'enable_lora' has its own variable"):
        boot.engine_arguments(
            WorkerConfig.from_env({**env, "ENGINE_ARGS": '{"enable_lora": true}'}), "/m", "m"
        )


def test_adapters_are_found_as_models_are(tmp_path):
    volume, hub_cache = tmp_path / "volume", tmp_path / "hub"
    snapshot = hub_layout(volume, "models--org--sql-lora", adapter_files())
    local = write_adapter(tmp_path / "local")
    sources = ModelSources(
        CACHED_MODELS_DIR=volume, BAKED_MODELS_DIR=tmp_path / "none", HF_HUB_CACHE=hub_cache
    )
    specs = parse_lora_modules(f"sql=Org/SQL-LoRA,local={local}")
    adapters = Adapters.resolve(specs, sources, max_lora_rank=None)
    assert adapters.requests["sql"].lora_path == str(snapshot)
    assert adapters.requests["local"].lora_path == str(local)
    # vLLM tells adapters apart by their integer ids.
    assert {each.lora_int_id for each in adapters.requests.values()} == {1, 2}


def test_an_adapter_is_downloaded_from_the_hub_when_nothing_has_it(tmp_path, hub):
    """The loopback Hub (tests/local_hub.py) speaks the real Hub's HTTP
    protocol; only the adapter's files are fetched."""
    commit = hub.add("org/support-lora", {**adapter_files(), "README.md": b"an adapter"})
    sources = ModelSources(
        CACHED_MODELS_DIR=tmp_path / "none",
        BAKED_MODELS_DIR=tmp_path / "none",
        HF_HUB_CACHE=tmp_path / "hub-cache",
        HF_ENDPOINT=hub.url,
    )
    adapters = Adapters.resolve(parse_lora_modules("support=org/support-lora"), sources, None)
    folder = Path(adapters.requests["support"].lora_path)
    assert folder == tmp_path / "hub-cache" / "models--org--support-lora" / "snapshots" / commit
    assert sorted(path.name for path in folder.iterdir()) == sorted(adapter_files())
    assert (folder / "adapter_config.json").read_bytes() == adapter_files()["adapter_config.json"]


def test_an_adapter_that_cannot_serve_stops_the_start(tmp_path):
    sources = ModelSources(HF_HUB_CACHE=tmp_path / "hub", HF_HUB_OFFLINE=True)
    wide = write_adapter(tmp_path / "wide", rank=64)
    with pytest.raises(Exception, match=r"its rank 64 exceeds MAX_LORA_RANK=16"):
        Adapters.resolve(parse_lora_modules(f"wide={wide}"), sources, max_lora_rank=None)
    assert Adapters.resolve(parse_lora_modules(f"wide={wide}"), sources, max_lora_rank=64)
    (tmp_path / "empty").mkdir()
    with pytest.raises(Exception, match="has no adapter_config.json or no weights"):
        Adapters.resolve(parse_lora_modules(f"e={tmp_path / 'empty'}"), sources, None)
    # A model folder is not an adapter.
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "model" / "model.safetensors").write_bytes(b"w")
    with pytest.raises(Exception, match="has no adapter_config.json"):
        Adapters.resolve(parse_lora_modules(f"m={tmp_path / 'model'}"), sources, None)
    env = {
        "MODELS": "org/model",
        "ENCRYPTION_KEY": channel.generate_key(),
        "LORA_MODULES": "missing=org/missing",
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "CACHED_MODELS_DIR": str(tmp_path / "none"),
    }
    with pytest.raises(ConfigError, match="^LORA_MODULES: org/missing: HF_HUB_OFFLINE=1"):
        boot.resolve_adapters(WorkerConfig.from_env(env))


def test_a_request_names_an_adapter_its_key_may_use(tmp_path):
    shared, own = write_adapter(tmp_path / "shared"), write_adapter(tmp_path / "own")
    specs = parse_lora_modules(
        json.dumps(
            [
                {"name": "shared", "path": str(shared)},
                {"name": "own", "path": str(own), "keys": ["0000aaaa"]},
            ]
        )
    )
    adapters = Adapters.resolve(specs, ModelSources(), max_lora_rank=None)
    assert adapters.for_request("own", "0000aaaa").lora_name == "own"
    assert adapters.for_request("shared", "1111bbbb").lora_name == "shared"
    assert adapters.names_for("0000aaaa") == ("shared", "own")
    assert adapters.names_for("1111bbbb") == ("shared",)
    # Another tenant's adapter and one that does not exist are refused alike.
    refusals = []
    for name in ("own", "nonexistent"):
        with pytest.raises(ProtocolError) as refused:
            adapters.for_request(name, "1111bbbb")
        refusals.append((refused.value.code, refused.value.reason))
    assert refusals == [(ErrorCode.INVALID_INPUT, UNKNOWN_ADAPTER)] * 2
