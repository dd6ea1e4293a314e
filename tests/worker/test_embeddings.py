"""Embeddings through the production path (wire protocol v1.3): the client
library's `embed` against the real worker process serving all-MiniLM-L6-v2
behind the loopback RunPod endpoint. Vectors are checked against the same
model run by transformers; refusals by their fixed reasons; and the other
kind of worker refuses what it does not serve."""

from __future__ import annotations

import json
import math

import pytest
from cryptography.fernet import Fernet

from encrypted_vllm.client.library import JobFailed
from encrypted_vllm.wire import protocol
from encrypted_vllm.wire.protocol import ErrorCode

TEXTS = [
    "The cat sat on the mat.",
    "Encrypted prompts cross the queue as Fernet tokens.",
    "Retrieval needs embeddings too.",
]


def cosine(left: list[float], right: list[float]) -> float:
    dot = sum(a * b for a, b in zip(left, right, strict=True))
    return dot / math.sqrt(sum(a * a for a in left) * sum(b * b for b in right))


def refusal(endpoint, **request) -> JobFailed:
    with pytest.raises(JobFailed) as caught:
        endpoint.run_sync(**request)
    assert caught.value.code is ErrorCode.INVALID_INPUT
    return caught.value


def test_the_card_says_embed_and_the_vectors_size(embedding_live):
    with embedding_live.client() as endpoint:
        card = endpoint.describe()
    assert (card.task, card.dimensions, card.matryoshka, card.protocol) == (
        "embed",
        384,
        False,
        protocol.VERSION,
    )


def test_vectors_are_the_models_own_in_the_inputs_order(embedding_live, reference_embeddings):
    with embedding_live.client() as endpoint:
        answer = endpoint.embed(TEXTS)
        alone = endpoint.embed(TEXTS[1])
    expected = reference_embeddings(TEXTS)
    assert len(answer.vectors) == 3 and all(len(vector) == 384 for vector in answer.vectors)
    assert [
        cosine(got, want) >= 0.999 for got, want in zip(answer.vectors, expected, strict=True)
    ] == [True] * 3
    assert cosine(answer.vectors[0], expected[1]) < 0.9  # each vector is its own input's
    assert all(abs(math.fsum(v * v for v in vector) - 1) < 1e-3 for vector in answer.vectors)
    assert cosine(alone.vectors[0], expected[1]) >= 0.999
    tokens = [len(reference_embeddings.tokenizer(text)["input_ids"]) for text in TEXTS]
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (sum(tokens), 0)


async def test_many_inputs_and_token_arrays_in_one_job(embedding_live, reference_embeddings):
    texts = [
        f"Document number {index} is about {'cats' if index % 2 else 'ships'}."
        for index in range(150)
    ]
    token_arrays = [reference_embeddings.tokenizer(text)["input_ids"] for text in texts[:2]]
    async with embedding_live.async_client() as endpoint:
        answer = await endpoint.embed(texts)
        from_tokens = await endpoint.embed(token_arrays)
        one_array = await endpoint.embed(token_arrays[0])
    expected = reference_embeddings(texts)
    assert len(answer.vectors) == 150
    assert (
        min(cosine(got, want) for got, want in zip(answer.vectors, expected, strict=True)) >= 0.999
    )
    assert [
        cosine(got, want) >= 0.999
        for got, want in zip(from_tokens.vectors, expected[:2], strict=True)
    ] == [
        True,
        True,
    ]
    assert cosine(one_array.vectors[0], expected[0]) >= 0.999
    stored = embedding_live.stored_output(answer.job_id)  # what RunPod keeps: ciphertext only
    assert stored and all(set(item) == {"ciphertext"} for item in stored)


def test_truncation_keeps_the_first_tokens_and_a_long_input_is_refused(
    embedding_live, reference_embeddings
):
    """As the tokenizer truncates (sentence-transformers' own way): the
    first tokens, its special tokens kept at both ends."""
    long_text = "privacy " * 600  # past the 256-token context
    tokenizer = reference_embeddings.tokenizer
    ids = [tokenizer(long_text, truncation=True, max_length=n)["input_ids"] for n in (8, 256)]
    with embedding_live.client() as endpoint:
        cut = endpoint.embed(long_text, truncate_prompt_tokens=8)
        whole_context = endpoint.embed(long_text, truncate_prompt_tokens=-1)
        failure = refusal(endpoint, embed={"input": [long_text]})
    (expected_cut, expected_context) = reference_embeddings(ids)
    assert cosine(cut.vectors[0], expected_cut) >= 0.999
    assert (cut.usage.prompt_tokens, whole_context.usage.prompt_tokens) == (8, 256)
    assert cosine(whole_context.vectors[0], expected_context) >= 0.999
    assert failure.reason == (
        "an embeddings input is longer than the model's context of 256 tokens: "
        "shorten it or set truncate_prompt_tokens"
    )


def test_dimensions_only_as_the_vectors_own_size(embedding_live, reference_embeddings):
    with embedding_live.client() as endpoint:
        same = endpoint.embed(TEXTS[0], dimensions=384)
        failure = refusal(endpoint, embed={"input": TEXTS[:1], "dimensions": 64})
    assert cosine(same.vectors[0], reference_embeddings(TEXTS[:1])[0]) >= 0.999
    assert failure.reason == (
        "this model's embeddings have a fixed size of 384: dimensions can only be that"
    )


def test_an_embedding_worker_refuses_completions_and_keeps_serving(embedding_live):
    with embedding_live.client() as endpoint:
        failure = refusal(endpoint, messages=[{"role": "user", "content": "Hello"}])
        assert endpoint.embed("still serving").vectors[0]
    assert failure.reason == (
        "this worker serves an embedding model: ask it for embed, not a completion"
    )
    assert "Hello" not in embedding_live.worker_log()


def test_a_generative_worker_refuses_embed(live):
    with live.client() as endpoint:
        failure = refusal(endpoint, embed={"input": ["a secret document"]})
        assert endpoint.describe().task == "generate"
    assert failure.reason == "this worker serves a generative model: embed needs an embedding model"


@pytest.mark.parametrize(
    ("embed", "reason"),
    [
        ({"input": [""]}, "an embeddings input is empty"),
        ({"input": [[]]}, "an embeddings input is empty"),
        ({"input": ["x"] * 2049}, "request exceeds MAX_EMBED_INPUTS=2048"),
        (
            {"input": ["x"], "truncate_prompt_tokens": 0},
            "truncate_prompt_tokens is -1 or a count of tokens to keep",
        ),
    ],
)
def test_the_worker_refuses_what_the_schema_forbids(embedding_live, embed, reason):
    """Sent past the client's own check, as another client might."""
    token = Fernet(embedding_live.key.encode()).encrypt(json.dumps({"embed": embed}).encode())
    job_id = embedding_live.submit_raw({"ciphertext": token.decode()})
    assert embedding_live.failure_of(job_id).reason == reason
