"""Real language through the whole path: the offline real model
(SmolLM2-135M-Instruct) served by the real worker process behind the
loopback endpoint, each answer the engine's own greedy text and English.

The model is tiny and often wrong: these tests check language, structure
and exactness against the engine, never facts. Its answers end by
themselves (finish_reason `stop`), which the tiny random model's never do.
"""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

from encrypted_vllm.dev.english import looks_like_english
from encrypted_vllm.wire import protocol
from tests.gateway_process import in_front_of
from tests.jobs import WEATHER, chat_prompt_ids, greedy_text, open_all, run_job

WORDS = re.compile(r"[A-Za-z][A-Za-z .'-]*")
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer"},
        "city": {"type": "string", "maxLength": 40},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
# A prompt whose greedy answer carries characters of more than one byte.
ACCENTED = "Write a short sentence that uses the word café."


async def truth(engine, tokenizer, messages, max_tokens, **options) -> str:
    """The engine's greedy answer, ended by the model or by `max_tokens`."""
    return await greedy_text(
        engine, chat_prompt_ids(tokenizer, messages), max_tokens, ignore_eos=False, **options
    )


async def test_a_chat_answer_is_the_engines_greedy_english(real_live, real_engine, real_tokenizer):
    messages = [{"role": "user", "content": "Write one sentence about the sea."}]
    with real_live.client() as client:
        answer = client.run_sync(
            messages=messages, sampling_params={"temperature": 0, "max_tokens": 96}
        )
    assert answer.text == await truth(real_engine, real_tokenizer, messages, 96)
    assert looks_like_english(answer.text), answer.text
    assert answer.finish_reason == "stop"  # the model ended it, not the limit
    assert answer.usage.prompt_tokens == len(chat_prompt_ids(real_tokenizer, messages))


async def test_a_conversation_goes_through_the_real_template_with_its_system_prompt(
    real_live, real_engine, real_tokenizer
):
    messages = [
        {"role": "system", "content": "You are a friendly assistant who answers in plain English."},
        {"role": "user", "content": "What is a good name for a pet cat?"},
        {"role": "assistant", "content": "A good name for a pet cat is Whiskers."},
        {"role": "user", "content": "Why is that a good name?"},
    ]
    prompt = chat_prompt_ids(real_tokenizer, messages)
    rendered = real_tokenizer.decode(prompt)
    assert "<|im_start|>system\nYou are a friendly assistant" in rendered  # ChatML, as served
    with real_live.client() as client:
        answer = client.run_sync(
            messages=messages, sampling_params={"temperature": 0, "max_tokens": 96}
        )
    assert answer.text == await truth(real_engine, real_tokenizer, messages, 96)
    assert looks_like_english(answer.text), answer.text
    assert answer.usage.prompt_tokens == len(prompt)  # the system prompt was rendered


async def test_a_json_schema_answer_validates_and_its_strings_are_words(
    real_live, real_engine, real_tokenizer
):
    messages = [
        {"role": "user", "content": "Describe a person as JSON with the keys name, age and city."}
    ]
    with real_live.client() as client:
        answer = client.run_sync(
            messages=messages,
            sampling_params={"temperature": 0, "max_tokens": 96},
            structured_output={"json_schema": PERSON},
        )
    assert answer.text == await truth(real_engine, real_tokenizer, messages, 96, json_schema=PERSON)
    person = json.loads(answer.text)
    jsonschema.validate(person, PERSON)
    assert answer.finish_reason == "stop"
    for field in ("name", "city"):
        assert WORDS.fullmatch(person[field]), person


@pytest.mark.parametrize(
    "prompt", ["Describe a cat as a JSON object.", "Give me a JSON object with your name and age."]
)
async def test_json_object_output_is_an_object_the_model_closes(
    real_worker, client_channel, prompt
):
    """Unconstrained but for being an object: only a real model ends it."""
    request = protocol.validate_request(
        messages=[{"role": "user", "content": prompt}],
        sampling_params={"temperature": 0, "max_tokens": 400},
        structured_output={"json_object": True},
    )
    items = open_all(
        client_channel, await run_job(real_worker, client_channel.seal_request(request))
    )
    assert items[-1].finish_reason == "stop"
    assert isinstance(json.loads("".join(item.text for item in items)), dict)


def test_a_forced_tool_call_has_arguments_that_validate(real_live):
    messages = [{"role": "user", "content": "What is the weather in Oslo for the next three days?"}]
    with real_live.client() as client:
        answer = client.run_sync(
            messages=messages,
            tools=[WEATHER],
            tool_choice="required",
            parallel_tool_calls=False,
            sampling_params={"temperature": 0, "max_tokens": 96},
        )
    (call,) = answer.tool_calls
    assert call.name == "get_weather" and answer.finish_reason == "tool_calls"
    jsonschema.validate(json.loads(call.arguments), WEATHER["function"]["parameters"])


async def test_a_streamed_answer_with_multibyte_characters_matches_the_whole_one(
    real_live, real_engine, real_tokenizer
):
    messages = [{"role": "user", "content": ACCENTED}]
    request = {"messages": messages, "sampling_params": {"temperature": 0, "max_tokens": 64}}
    with real_live.client() as client:
        whole = client.run_sync(**request)
        with client.stream(**request) as deltas:
            pieces = list(deltas)
    streamed = "".join(pieces)
    assert streamed.encode() == whole.text.encode()
    assert whole.text == await truth(real_engine, real_tokenizer, messages, 64)
    assert any(len(character.encode()) > 1 for character in whole.text), whole.text
    assert "\ufffd" not in streamed and len(pieces) >= 2
    assert looks_like_english(whole.text), whole.text


@pytest.fixture(scope="module")
def real_gateway(real_live, tmp_path_factory):
    process = in_front_of(real_live, tmp_path_factory.mktemp("real-gateway"))
    yield process
    process.stop()


async def test_the_gateway_answers_the_openai_sdk_in_english(
    real_gateway, real_engine, real_tokenizer
):
    sdk = openai.OpenAI(base_url=real_gateway.url, api_key="unused", max_retries=0, timeout=120)
    (model,) = sdk.models.list().data
    messages = [{"role": "user", "content": "Write one sentence about the sea."}]
    stream = sdk.chat.completions.create(
        model=model.id, messages=messages, max_tokens=96, temperature=0, stream=True
    )
    chunks = list(stream)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == await truth(real_engine, real_tokenizer, messages, 96)
    assert looks_like_english(text), text
    assert chunks[-1].choices[0].finish_reason == "stop"
