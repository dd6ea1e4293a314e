"""The gateway in the caller's process (`encrypted_vllm.OpenAI`, `AsyncOpenAI`
and their httpx clients), against the real worker behind the loopback
endpoint: the unmodified `openai` SDK, sync and async, streamed and not,
LangChain and Agno, each answering the engine's greedy text, with no port
opened and the same errors as the gateway process."""

from __future__ import annotations

import openai
import psutil
import pytest

import encrypted_vllm
from encrypted_vllm.client.gateway import in_process
from tests.jobs import chat_prompt_ids, greedy_text

MODEL = "Org/Tiny-Model"  # what the live worker's card names (tests/conftest.py)
GREEDY = {"temperature": 0, "max_tokens": 16, "extra_body": {"ignore_eos": True}}


def listening_ports() -> set[int]:
    connections = psutil.Process().net_connections(kind="inet")
    return {c.laddr.port for c in connections if c.status == psutil.CONN_LISTEN}


@pytest.fixture
def endpoint(live) -> dict:
    """The gateway's arguments for the live loopback endpoint."""
    return {
        "base_url": live.serving.url,
        "api_key": live.endpoint.api_key,
        "encryption_key": live.key,
    }


async def expected(engine, hf_tokenizer, prompt: str) -> str:
    ids = chat_prompt_ids(hf_tokenizer, [{"role": "user", "content": prompt}])
    return await greedy_text(engine, ids, 16)


async def test_the_sync_client_answers_and_streams_the_greedy_text_with_no_port(
    endpoint, engine, hf_tokenizer
):
    ports = listening_ports()
    with encrypted_vllm.OpenAI(**endpoint) as llm:
        assert isinstance(llm, openai.OpenAI)
        (model,) = llm.models.list().data
        assert model.id == MODEL
        messages = [{"role": "user", "content": "In process."}]
        answer = llm.chat.completions.create(model=MODEL, messages=messages, **GREEDY)
        stream = llm.chat.completions.create(model=MODEL, messages=messages, stream=True, **GREEDY)
        deltas = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    truth = await expected(engine, hf_tokenizer, "In process.")
    assert answer.choices[0].message.content == "".join(deltas) == truth
    assert len([delta for delta in deltas if delta]) >= 2  # streamed, not in one piece
    assert answer.usage.completion_tokens == 16
    assert listening_ports() == ports


async def test_the_async_client_answers_and_streams_the_greedy_text(endpoint, engine, hf_tokenizer):
    async with encrypted_vllm.AsyncOpenAI(**endpoint) as llm:
        assert isinstance(llm, openai.AsyncOpenAI)
        messages = [{"role": "user", "content": "In process, async."}]
        answer = await llm.chat.completions.create(model=MODEL, messages=messages, **GREEDY)
        stream = await llm.chat.completions.create(
            model=MODEL, messages=messages, stream=True, **GREEDY
        )
        text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream])
    truth = await expected(engine, hf_tokenizer, "In process, async.")
    assert answer.choices[0].message.content == text == truth


def test_errors_are_the_gateways_openai_errors(endpoint):
    with encrypted_vllm.OpenAI(**endpoint) as llm:
        with pytest.raises(openai.NotFoundError) as unknown:
            llm.chat.completions.create(
                model="no-such-model", messages=[{"role": "user", "content": "x"}]
            )
        with pytest.raises(openai.BadRequestError) as refused:
            llm.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "x"}], n=2
            )
    assert unknown.value.code == "model_not_found"
    assert refused.value.param == "n"


def test_a_wrong_key_is_refused_before_any_request(live):
    with pytest.raises(ValueError):
        encrypted_vllm.OpenAI(
            base_url=live.serving.url, api_key=live.endpoint.api_key, encryption_key="not a key"
        )


async def test_langchain_runs_on_the_in_process_http_clients(endpoint, engine, hf_tokenizer):
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(
        model=MODEL,
        base_url=in_process.BASE_URL,
        api_key="unused",
        max_retries=0,
        http_client=in_process.http_client(**endpoint),
        http_async_client=in_process.async_http_client(**endpoint),
        **GREEDY,
    )
    truth = await expected(engine, hf_tokenizer, "LangChain in process.")
    assert chat.invoke("LangChain in process.").content == truth
    assert (await chat.ainvoke("LangChain in process.")).content == truth


async def test_an_agno_agent_runs_on_the_in_process_client(
    endpoint, engine, hf_tokenizer, monkeypatch
):
    monkeypatch.setenv("AGNO_TELEMETRY", "false")  # its telemetry would leave loopback
    from agno.agent import Agent
    from agno.models.openai.like import OpenAILike

    with encrypted_vllm.OpenAI(**endpoint) as llm:
        model = OpenAILike(
            id=MODEL, client=llm, temperature=0, max_tokens=16, extra_body={"ignore_eos": True}
        )
        answer = Agent(model=model, telemetry=False).run("Agno in process.")
    assert answer.content == await expected(engine, hf_tokenizer, "Agno in process.")
