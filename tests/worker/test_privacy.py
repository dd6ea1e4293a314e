"""Nothing in the clear: a canary string sent in every kind of request, good
and bad, never shows up in an error or in any line the worker process wrote
(its own, the runpod SDK's, the engine's); neither does a key or a
ciphertext."""

from __future__ import annotations

import json

from cryptography.fernet import Fernet

from encrypted_vllm.client.library import JobFailed
from tests.jobs import GREEDY

CANARY = "CANARY-4f1c9e"
FERNET_TOKEN_PREFIX = "gAAAAA"  # version byte and a present-day timestamp


def test_no_canary_key_or_ciphertext_in_any_log_or_error(live, key, tenant_key):
    failures_seen: list[JobFailed] = []
    with live.client() as endpoint:
        endpoint.run_sync(f"{CANARY} in a prompt", sampling_params=GREEDY)
        endpoint.run_sync(
            messages=[
                {"role": "system", "content": CANARY},
                {"role": "user", "content": f"{CANARY} in a chat"},
            ],
            sampling_params=GREEDY,
        )
        stream = endpoint.stream(
            f"{CANARY} cancelled", sampling_params={**GREEDY, "max_tokens": 400}
        )
        next(stream)
        stream.close()
        # Wire protocol v1.1: the canary in tools, schemas, template kwargs,
        # tool calls and results, through every path (forced, auto, none).
        tool = {
            "type": "function",
            "function": {
                "name": "canary_tool",
                "description": CANARY,
                "parameters": {
                    "type": "object",
                    "properties": {
                        "q": {"type": "string", "enum": [CANARY], "description": CANARY}
                    },
                    "required": ["q"],
                },
            },
        }
        history = [
            {"role": "user", "content": [{"type": "text", "text": CANARY}]},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": f"call-{CANARY}",
                        "type": "function",
                        "function": {"name": "canary_tool", "arguments": json.dumps({"q": CANARY})},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": f"call-{CANARY}", "content": CANARY},
        ]
        for tool_choice in ("required", "auto", "none"):
            endpoint.run_sync(
                messages=history,
                tools=[tool],
                tool_choice=tool_choice,
                chat_template_kwargs={"canary": CANARY},
                sampling_params={**GREEDY, "max_tokens": 40},
            )
        endpoint.run_sync(
            messages=history[:1],
            structured_output={"json_schema": {"type": "object", "title": CANARY}},
            sampling_params={**GREEDY, "max_tokens": 20},
        )
        for constraint in (
            {"regex": f"({CANARY}"},
            {"json_schema": {"type": CANARY}},
            {"grammar": f"root ::= {CANARY}"},
            {"choice": [CANARY]},
        ):
            try:
                endpoint.run_sync(
                    f"{CANARY} constrained", structured_output=constraint, sampling_params=GREEDY
                )
            except JobFailed as failure:
                failures_seen.append(failure)

    fernet = Fernet(key.encode())
    refused = [
        {"prompt": "x", CANARY: 1},
        {"prompt": "x", "sampling_params": {CANARY: 1}},
        {"prompt": "x", "sampling_params": {"max_tokens": CANARY}},
        {"messages": [{"role": CANARY, "content": CANARY}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "text": CANARY}]}]},
        {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": CANARY}]},
        {"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"tools": CANARY}},
        {"prompt": "x", "structured_output": {"regex": CANARY, "choice": [CANARY]}},
        {"prompt": f"{CANARY} " * 3000},
        [CANARY],
    ]
    job_inputs = [{"ciphertext": fernet.encrypt(json.dumps(p).encode()).decode()} for p in refused]
    job_inputs += [
        {"ciphertext": CANARY},
        {"prompt": CANARY},
        {"ciphertext": Fernet(Fernet.generate_key()).encrypt(CANARY.encode()).decode()},
    ]
    failures = [live.failure_of(live.submit_raw(job_input)) for job_input in job_inputs]
    failures += failures_seen
    assert len(failures_seen) == 3  # the regex, schema and grammar that do not compile

    assert all(failure.code is not None for failure in failures)
    assert not [str(failure) for failure in failures if CANARY in str(failure)]
    log = live.worker_log()
    assert all(failure.job_id in log for failure in failures)  # the right log
    assert CANARY not in log
    assert key not in log and tenant_key not in log
    assert FERNET_TOKEN_PREFIX not in log
