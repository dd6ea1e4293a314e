"""Wire protocol v1.1 on the real engine: structured outputs, forced and
parsed tool calls, reasoning, logprobs, multi-byte text and the describe
card, each checked against real values (schemas with `jsonschema`, vLLM's
own non-streaming parsers, the engine's own output)."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from encrypted_vllm.wire import protocol
from encrypted_vllm.wire.protocol import ErrorCode
from tests.jobs import CLOCK, WEATHER, only_error, open_all, run_job

GREEDY = {"temperature": 0, "max_tokens": 200}
TOOLS = [WEATHER, CLOCK]
ASK = [{"role": "user", "content": "What is the weather in Paris this week?"}]
POINT = {
    "type": "object",
    "properties": {
        "x": {"type": "integer", "minimum": -100, "maximum": 100},
        "label": {"type": "string", "maxLength": 12},
        "ok": {"type": "boolean"},
    },
    "required": ["x", "label", "ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="session")
def make_worker(engine, worker):
    """Workers on the session's engine with the given parsers."""
    from encrypted_vllm.worker.generation import Planner
    from encrypted_vllm.worker.handler import Worker

    made = {}

    def make(**parsers) -> Worker:
        name = tuple(sorted(parsers.items()))
        if name not in made:
            made[name] = Worker(engine, worker.inbox, planner=Planner(engine, **parsers))
        return made[name]

    return make


async def items_of(worker, client_channel, **request) -> list[protocol.StreamItem]:
    sealed = client_channel.seal_request(protocol.validate_request(**request))
    return open_all(client_channel, await run_job(worker, sealed))


def joined(items) -> tuple[str, str, list[protocol.ToolCallResult]]:
    text = "".join(item.text for item in items)
    reasoning = "".join(item.reasoning for item in items)
    calls = protocol.join_tool_calls([call for item in items for call in item.tool_calls])
    return text, reasoning, calls


# --- Structured outputs ------------------------------------------------------


@pytest.mark.parametrize("sampling", [GREEDY, {"temperature": 1.0, "max_tokens": 200, "seed": 7}])
@pytest.mark.parametrize("shape", ["prompt", "messages"])
async def test_json_schema_output_parses_and_validates(worker, client_channel, sampling, shape):
    request = {"prompt": "A point:"} if shape == "prompt" else {"messages": ASK}
    for attempt in range(3):  # three seeds when sampled
        params = (
            {**sampling, "seed": sampling["seed"] + attempt} if "seed" in sampling else sampling
        )
        items = await items_of(
            worker,
            client_channel,
            **request,
            sampling_params=params,
            structured_output={"json_schema": POINT},
        )
        text, _, _ = joined(items)
        assert items[-1].finish_reason == "stop", text
        jsonschema.validate(json.loads(text), POINT)


@pytest.mark.parametrize(
    "constraint, check",
    [
        ({"regex": r"[0-9]{3}-[a-z]{2,4}"}, lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", t)),
        ({"choice": ["yes", "no", "maybe"]}, lambda t: t in ("yes", "no", "maybe")),
        ({"grammar": 'root ::= "A" "B"+ "C"+'}, lambda t: re.fullmatch(r"AB+C+", t)),
        ({"grammar": 'start: "x" ("y" | "z")+\n'}, lambda t: re.fullmatch(r"x[yz]+", t)),
    ],
    ids=["regex", "choice", "ebnf", "lark"],
)
async def test_regex_choice_and_grammar_outputs_match(worker, client_channel, constraint, check):
    sampling = {"temperature": 0, "max_tokens": 20}
    items = await items_of(
        worker,
        client_channel,
        prompt="Say:",
        sampling_params=sampling,
        structured_output=constraint,
    )
    text = joined(items)[0]
    assert check(text), text


@pytest.mark.parametrize(
    "constraint",
    [
        {"json_schema": {"type": "nonsense"}},
        {"json_schema": {"$ref": "#/$defs/missing"}},
        {"regex": "(unclosed"},
        {"grammar": 'root ::= "a" | undefined_rule'},
    ],
)
async def test_a_constraint_the_backend_cannot_compile_is_invalid_input(
    worker, client_channel, constraint, caplog
):
    sealed = client_channel.seal_request(
        protocol.validate_request(prompt="x", structured_output=constraint)
    )
    error = only_error(await run_job(worker, sealed))
    assert error.code is ErrorCode.INVALID_INPUT
    assert error.reason == "the structured output or tools could not be compiled into a grammar"
    assert "nonsense" not in caplog.text and "unclosed" not in caplog.text


# --- Tool calls ----------------------------------------------------------------


def check_calls(calls, tools) -> None:
    by_name = {tool["function"]["name"]: tool["function"]["parameters"] for tool in tools}
    assert calls
    for call in calls:
        assert call.name in by_name and call.id
        jsonschema.validate(json.loads(call.arguments), by_name[call.name])


@pytest.mark.parametrize(
    "parsers", [{}, {"tool_call_parser": "hermes"}], ids=["no parser", "hermes"]
)
async def test_tool_choice_required_forces_valid_calls(make_worker, client_channel, parsers):
    items = await items_of(
        make_worker(**parsers),
        client_channel,
        messages=ASK,
        sampling_params=GREEDY,
        tools=TOOLS,
        tool_choice="required",
    )
    text, _, calls = joined(items)
    assert text == ""
    check_calls(calls, TOOLS)
    assert items[-1].finish_reason == "tool_calls"


async def test_parallel_tool_calls_false_allows_one_call(worker, client_channel):
    items = await items_of(
        worker,
        client_channel,
        messages=ASK,
        sampling_params={**GREEDY, "seed": 3, "temperature": 1.0},
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
    )
    (call,) = joined(items)[2]
    check_calls([call], TOOLS)


@pytest.mark.parametrize("name", ["get_weather", "get_time"])
async def test_a_named_tool_choice_calls_that_function(worker, client_channel, name):
    items = await items_of(
        worker,
        client_channel,
        messages=ASK,
        sampling_params=GREEDY,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": name}},
    )
    (call,) = joined(items)[2]
    assert call.name == name
    check_calls([call], TOOLS)
    assert items[-1].finish_reason == "tool_calls"


async def test_tool_choice_auto_without_a_parser_is_refused(worker, client_channel):
    sealed = client_channel.seal_request(protocol.validate_request(messages=ASK, tools=TOOLS))
    error = only_error(await run_job(worker, sealed))
    assert error.code is ErrorCode.INVALID_INPUT and "TOOL_CALL_PARSER" in error.reason


# The model's own format, as the hermes parser reads it; the regex makes the
# random model write it.
HERMES_CALLS = (
    r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome)", '
    r'"days": [1-7]\}\}\n</tool_call>\n<tool_call>\n\{"name": "get_time", '
    r'"arguments": \{"zone": "[A-Z]{3}"\}\}\n</tool_call>'
)


async def test_auto_tool_calls_stream_as_the_hermes_parser_reads_them(
    make_worker, client_channel, worker
):
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.tool_parsers import ToolParserManager

    request = {
        "messages": ASK,
        "sampling_params": GREEDY,
        "tools": TOOLS,
        "structured_output": {"regex": HERMES_CALLS},
    }
    items = await items_of(make_worker(tool_call_parser="hermes"), client_channel, **request)
    # The same greedy output, unparsed: tool_choice "none" with the same constraint.
    raw = await items_of(worker, client_channel, **request, tool_choice="none")
    raw_text = joined(raw)[0]
    assert re.fullmatch(HERMES_CALLS, raw_text), raw_text

    parser = ToolParserManager.get_tool_parser("hermes")(worker.planner.tokenizer, None)
    vllm_request = ChatCompletionRequest(messages=ASK, tools=TOOLS)
    expected = parser.extract_tool_calls(raw_text, vllm_request)
    text, _, calls = joined(items)
    assert expected.tools_called and text == ""
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        (c.function.name, json.loads(c.function.arguments)) for c in expected.tool_calls
    ]
    assert len({call.id for call in calls}) == 2
    assert sum(1 for item in items if item.tool_calls) >= 2  # streamed, not at the end
    assert items[-1].finish_reason == "tool_calls"


THINKING = r"<think>[a-z ]{8,30}</think>[a-z ]{4,20}"


async def test_reasoning_is_split_from_the_answer_as_the_parser_reads_it(
    make_worker, client_channel, worker
):
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.reasoning import ReasoningParserManager

    request = {"messages": ASK, "sampling_params": GREEDY, "structured_output": {"regex": THINKING}}
    items = await items_of(make_worker(reasoning_parser="deepseek_r1"), client_channel, **request)
    raw_text = joined(await items_of(worker, client_channel, **request))[0]
    assert re.fullmatch(THINKING, raw_text), raw_text

    parser = ReasoningParserManager.get_reasoning_parser("deepseek_r1")(worker.planner.tokenizer)
    reasoning, content = parser.extract_reasoning(raw_text, ChatCompletionRequest(messages=ASK))
    text, streamed_reasoning, _ = joined(items)
    assert (streamed_reasoning, text) == (reasoning, content)
    assert reasoning and content
    assert any(item.reasoning for item in items) and any(item.text for item in items)


async def test_a_tool_result_round_trip_renders_through_the_template(
    worker, client_channel, engine, hf_tokenizer
):
    """An assistant's call and the tool's result render as the model's own
    template renders them, and the answer is the engine's greedy text."""
    from tests.jobs import greedy_text

    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'},
    }
    messages = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "18C"}]},
    ]
    sampling = {"temperature": 0, "max_tokens": 16, "ignore_eos": True}
    items = await items_of(
        worker,
        client_channel,
        messages=messages,
        tools=TOOLS,
        tool_choice="none",
        sampling_params=sampling,
    )
    template_messages = [
        *ASK,
        {
            **messages[1],
            "tool_calls": [
                {
                    **call,
                    "function": {**call["function"], "arguments": {"city": "Paris", "days": 2}},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
    ]
    prompt_ids = hf_tokenizer.apply_chat_template(
        template_messages, tools=TOOLS, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert items[-1].usage.prompt_tokens == len(prompt_ids)
    assert joined(items)[0] == await greedy_text(engine, prompt_ids, 16)


# --- Logprobs, multi-byte text, the card ------------------------------------------


@pytest.mark.parametrize("top", [0, 3])
async def test_logprobs_come_with_every_token(worker, client_channel, top):
    sampling = {"temperature": 0, "max_tokens": 12, "ignore_eos": True, "logprobs": top}
    items = await items_of(worker, client_channel, prompt="Sanity check.", sampling_params=sampling)
    entries = [entry for item in items for entry in item.logprobs]
    assert len(entries) == 12
    for entry in entries:
        assert entry["logprob"] <= 0 and entry["bytes"] == list(entry["token"].encode())
        alternatives = entry["top_logprobs"]
        assert len(alternatives) == top
        assert [a["logprob"] for a in alternatives] == sorted(
            (a["logprob"] for a in alternatives), reverse=True
        )
        if top:  # greedy: the chosen token is the likeliest
            assert alternatives[0]["logprob"] == entry["logprob"]


async def test_logprobs_beyond_the_limit_are_refused_naming_it():
    with pytest.raises(ValueError, match="MAX_LOGPROBS=20"):
        protocol.validate_request(prompt="a", sampling_params={"logprobs": 21})


WORDS = "日本語のテキスト 🎉🔒✨"


async def test_multi_byte_text_streams_whole_characters(make_worker, client_channel, hf_tokenizer):
    """The tiny tokenizer splits these characters into byte pieces; each item
    (one per engine step) must still hold whole characters."""
    pieces = hf_tokenizer(WORDS, add_special_tokens=False).input_ids
    assert any("\ufffd" in hf_tokenizer.decode([piece]) for piece in pieces)

    items = await items_of(
        make_worker(),  # unpaced: an item per engine step
        client_channel,
        prompt="Say it:",
        sampling_params={"temperature": 0, "max_tokens": 64},
        structured_output={"choice": [WORDS]},
    )
    texts = [item.text for item in items]
    assert "".join(texts) == WORDS
    assert not any("\ufffd" in text for text in texts)
    assert items[-1].usage.completion_tokens > len([text for text in texts if text])


async def test_describe_answers_with_the_workers_card(make_worker, client_channel, engine):
    items = await items_of(make_worker(tool_call_parser="hermes"), client_channel, describe=True)
    (item,) = items
    assert item.finish_reason == "stop" and item.usage == protocol.Usage(0, 0)
    assert item.card == protocol.WorkerCard(
        model=engine.model_config.served_model_name,
        max_model_len=engine.model_config.max_model_len,
        chat_template=True,
        tool_call_parser="hermes",
        reasoning_parser=None,
        structured_output_backend="xgrammar",
        max_logprobs=20,
    )
