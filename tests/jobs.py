"""Helpers that run jobs through a Worker in-process and read their outputs,
and the tools the tests offer the model."""

from __future__ import annotations

import itertools

from encrypted_vllm.wire import protocol
from encrypted_vllm.wire.protocol import StreamItem

GREEDY = {"temperature": 0, "max_tokens": 24, "ignore_eos": True}
_job_ids = itertools.count()

# Two tools whose schemas constrain every argument, so that a forced call's
# arguments can be checked against them.
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "pattern": "^[A-Z]{3}$"}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}


async def run_job(worker, job_input) -> list[dict]:
    job = {"id": f"test-{next(_job_ids)}", "input": job_input}
    return [output async for output in worker.handler(job)]


def open_all(client_channel, outputs) -> list[StreamItem]:
    assert all("error" not in output for output in outputs), outputs
    return [client_channel.open_item(output) for output in outputs]


def only_error(outputs) -> protocol.ProtocolError:
    assert len(outputs) == 1 and set(outputs[0]) == {"error"}, outputs
    error = protocol.ProtocolError.parse(outputs[0]["error"])
    assert error is not None, outputs
    return error


async def greedy_text(
    engine,
    prompt_token_ids: list[int],
    max_tokens: int,
    *,
    ignore_eos: bool = True,
    json_schema: dict | None = None,
    lora_request=None,
) -> str:
    """The engine's own greedy completion of these tokens, in one piece
    (held to `json_schema` by the engine's structured-output backend; through
    the LoRA adapter of `lora_request`, vLLM's own, if given)."""
    from vllm import SamplingParams
    from vllm.renderers.inputs.preprocess import parse_model_prompt
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    prompt = parse_model_prompt(engine.model_config, {"prompt_token_ids": prompt_token_ids})
    (engine_input,) = await engine.renderer.render_cmpl_async([prompt])
    params = SamplingParams(
        temperature=0,
        max_tokens=max_tokens,
        ignore_eos=ignore_eos,
        structured_outputs=None
        if json_schema is None
        else StructuredOutputsParams(json=json_schema),
        output_kind=RequestOutputKind.FINAL_ONLY,
    )
    request_id = f"truth-{next(_job_ids)}"
    async for output in engine.generate(
        engine_input, params, request_id, lora_request=lora_request
    ):
        final = output
    return final.outputs[0].text


def chat_prompt_ids(tokenizer, messages, tools=None) -> list[int]:
    """The prompt's tokens through the model's own chat template, by transformers."""
    return tokenizer.apply_chat_template(
        messages, tools=tools, add_generation_prompt=True, tokenize=True, return_dict=False
    )
