"""LoRA adapters end to end: the real worker process (`rp_handler.py`) with
LORA_MODULES behind the loopback endpoint, its jobs encrypted, its answers
compared with vLLM's own greedy output through the same adapter (an engine
in this process, with the same configuration), and the gateway serving the
adapter to the unmodified `openai` SDK by model name.

The adapter is random (tiny_model.build_adapter): what it says is
gibberish, but it differs from the base model's, which is what proves it
was applied."""

from __future__ import annotations

import json
import os

import openai
import pytest

import encrypted_vllm
from encrypted_vllm.client.library import JobFailed
from encrypted_vllm.dev import tiny_model
from encrypted_vllm.wire import channel
from encrypted_vllm.wire.protocol import ErrorCode
from encrypted_vllm.worker.adapters import UNKNOWN_ADAPTER
from tests.conftest import engine_for, worker_behind_endpoint
from tests.jobs import chat_prompt_ids, greedy_text

PROMPT = "The quick brown fox"
TOKENS = 24
GREEDY = {"temperature": 0, "max_tokens": TOKENS, "ignore_eos": True}


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    return tiny_model.build_adapter(tiny_model_dir, tmp_path_factory.mktemp("lora") / "adapter")


@pytest.fixture(scope="module")
def lora_env(worker_env, adapter_dir, key, tenant_key) -> dict[str, str]:
    """Two adapters: one for every key, and one bound to the tenant's key
    (the same weights under another name)."""
    (tenant_id,) = (each.id for each in channel.load_keys(tenant_key))
    adapters = [
        {"name": "tiny-lora", "path": str(adapter_dir)},
        {"name": "tenant-lora", "path": str(adapter_dir), "keys": [tenant_id]},
    ]
    return {
        **worker_env,
        "ENCRYPTION_KEY": f"{key},{tenant_key}",
        "LORA_MODULES": json.dumps(adapters),
        "MAX_LORA_RANK": "8",
        "MAX_LORAS": "2",
    }


@pytest.fixture(scope="module")
async def truth(lora_env):
    """The ground truth: vLLM's own greedy text for prompt tokens, through
    an adapter by name (or none), on an engine with the worker's
    configuration in this process, the adapters resolved as it resolves them."""
    from encrypted_vllm.worker import boot
    from encrypted_vllm.worker.config import WorkerConfig

    adapters = boot.resolve_adapters(WorkerConfig.from_env(lora_env))
    with engine_for(lora_env) as engine:

        async def greedy(prompt_ids: list[int], adapter: str | None = None) -> str:
            lora = adapters.requests[adapter] if adapter else None
            return await greedy_text(engine, prompt_ids, TOKENS, lora_request=lora)

        yield greedy


@pytest.fixture(scope="module")
def lora_live(lora_env, key, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("lora-worker") / "worker.log"
    with worker_behind_endpoint({**os.environ, **lora_env}, log_path, 600, key) as served:
        yield served


async def test_a_job_naming_an_adapter_streams_the_engines_greedy_text(
    lora_live, truth, hf_tokenizer
):
    prompt_ids = hf_tokenizer(PROMPT)["input_ids"]
    adapted, base = (
        await truth(prompt_ids, "tiny-lora"),
        await truth(prompt_ids),
    )
    assert adapted != base  # the adapter changes the answer
    async with lora_live.async_client() as client:
        streamed = [
            delta
            async for delta in await client.stream(
                PROMPT, adapter="tiny-lora", sampling_params=GREEDY
            )
        ]
        without = await client.run_sync(PROMPT, sampling_params=GREEDY)
    assert "".join(streamed) == adapted
    assert len(streamed) > 1  # streamed, not one piece
    assert without.text == base  # the same worker still serves the base model


async def test_a_chat_names_an_adapter(lora_live, truth, hf_tokenizer):
    messages = [{"role": "user", "content": PROMPT}]
    expected = await truth(chat_prompt_ids(hf_tokenizer, messages), "tiny-lora")
    async with lora_live.async_client() as client:
        answer = await client.run_sync(
            messages=messages, adapter="tiny-lora", sampling_params=GREEDY
        )
    assert answer.text == expected


async def test_an_adapter_bound_to_a_key_serves_that_key_alone(
    lora_live, truth, hf_tokenizer, tenant_key
):
    prompt_ids = hf_tokenizer(PROMPT)["input_ids"]
    expected = await truth(prompt_ids, "tenant-lora")
    async with lora_live.async_client(encryption_key=tenant_key) as tenant:
        assert (
            await tenant.run_sync(PROMPT, adapter="tenant-lora", sampling_params=GREEDY)
        ).text == (expected)
        assert (await tenant.describe()).adapters == ("tiny-lora", "tenant-lora")
    async with lora_live.async_client() as other:
        # Another key's adapter is refused exactly as one that does not exist.
        refusals = []
        for name in ("tenant-lora", "no-such-lora"):
            with pytest.raises(JobFailed) as failed:
                await other.run_sync(PROMPT, adapter=name, sampling_params=GREEDY)
            refusals.append((failed.value.code, failed.value.reason))
        assert refusals == [(ErrorCode.INVALID_INPUT, UNKNOWN_ADAPTER)] * 2
        assert (await other.describe()).adapters == ("tiny-lora",)
        # The worker serves on.
        assert (await other.run_sync(PROMPT, sampling_params=GREEDY)).text == await truth(
            prompt_ids
        )


async def test_the_gateway_serves_an_adapter_by_model_name(lora_live, truth, hf_tokenizer):
    """As `vllm serve` does: the adapter is a model of its own in
    /v1/models, with the model it adapts as its parent."""
    messages = [{"role": "user", "content": PROMPT}]
    expected = await truth(chat_prompt_ids(hf_tokenizer, messages), "tiny-lora")
    async with encrypted_vllm.AsyncOpenAI(
        base_url=lora_live.serving.url,
        api_key=lora_live.endpoint.api_key,
        encryption_key=lora_live.key,
    ) as llm:
        listed = {model.id: getattr(model, "parent", None) async for model in llm.models.list()}
        base = next(name for name, parent in listed.items() if parent is None)
        assert listed == {base: None, "tiny-lora": base}  # not the tenant's adapter
        answer = await llm.chat.completions.create(
            model="tiny-lora",
            messages=messages,
            temperature=0,
            max_tokens=TOKENS,
            extra_body={"ignore_eos": True},
        )
        assert answer.choices[0].message.content == expected
        assert answer.model == "tiny-lora"
        with pytest.raises(openai.NotFoundError):
            await llm.chat.completions.create(model="tenant-lora", messages=messages)


async def test_a_configured_model_names_its_adapter(lora_live, truth, hf_tokenizer, tmp_path):
    """With --config, a model may stand for an adapter of its endpoint
    (`adapter = "..."`), and fall back to another model."""
    config = tmp_path / "gateway.toml"
    config.write_text(
        f"""
[models.tuned]
base_url = "{lora_live.serving.url}"
adapter = "tiny-lora"
fallbacks = ["plain"]

[models.plain]
base_url = "{lora_live.serving.url}"
"""
    )
    messages = [{"role": "user", "content": PROMPT}]
    prompt_ids = chat_prompt_ids(hf_tokenizer, messages)
    greedy = {"temperature": 0, "max_tokens": TOKENS, "extra_body": {"ignore_eos": True}}
    env = {"RUNPOD_API_KEY": lora_live.endpoint.api_key, "ENCRYPTION_KEY": lora_live.key}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        async with encrypted_vllm.AsyncOpenAI(config=config) as llm:
            tuned = await llm.chat.completions.create(model="tuned", messages=messages, **greedy)
            plain = await llm.chat.completions.create(model="plain", messages=messages, **greedy)
            listed = [model.id async for model in llm.models.list()]
    assert tuned.choices[0].message.content == await truth(prompt_ids, "tiny-lora")
    assert plain.choices[0].message.content == await truth(prompt_ids)
    assert (tuned.model, listed) == ("tuned", ["tuned", "plain"])
