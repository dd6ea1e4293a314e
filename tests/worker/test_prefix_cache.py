"""Tenants share no prompt cache: a request's cached prefix blocks are salted
with the key that opened it (`Key.cache_salt`), so that the same long prompt
under another key is computed afresh while the same key's repeat hits the
cache. Read from vLLM's own count of cached prompt tokens, on the real
engine, with the request admitted and planned as the worker does."""

from __future__ import annotations

import itertools

from encrypted_vllm.wire import protocol
from encrypted_vllm.wire.channel import Channel, Inbox

# Several of vLLM's cache blocks (16 tokens each on CPU) of one prompt.
LONG_PROMPT = " ".join(f"Line {n} of a long shared system prompt." for n in range(40))
_ids = itertools.count()


async def cached_tokens(engine, planner, inbox: Inbox, key: str) -> int:
    """vLLM's count of this request's prompt tokens served from its cache."""
    from vllm.sampling_params import RequestOutputKind

    sealed = Channel(key).seal_request(
        protocol.validate_request(LONG_PROMPT, sampling_params={"max_tokens": 1})
    )
    admission = inbox.admit(sealed)
    plan = await planner.plan(admission.request, admission.cache_salt)
    plan.params.output_kind = RequestOutputKind.FINAL_ONLY
    async for output in engine.generate(plan.engine_input, plan.params, f"salt-{next(_ids)}"):
        final = output
    return final.num_cached_tokens


async def test_two_keys_never_share_a_cached_prefix_and_one_key_does(engine, key, tenant_key):
    from encrypted_vllm.worker.generation import Planner

    assert engine.vllm_config.cache_config.enable_prefix_caching
    inbox = Inbox(Channel(f"{key},{tenant_key}"), ttl_s=60, max_request_bytes=1 << 20)
    planner = Planner(engine)

    first = await cached_tokens(engine, planner, inbox, key)
    other_tenant = await cached_tokens(engine, planner, inbox, tenant_key)
    same_tenant = await cached_tokens(engine, planner, inbox, key)

    assert first == 0
    assert other_tenant == 0  # the same prompt, another key: computed afresh
    assert same_tenant >= 16 * 10  # the same key: its prefix blocks were hit
    assert Channel(key).keys[0].cache_salt != Channel(tenant_key).keys[0].cache_salt
