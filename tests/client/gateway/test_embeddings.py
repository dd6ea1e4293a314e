"""`POST /v1/embeddings` as the unmodified `openai` SDK calls it: the
gateway process in front of the loopback endpoint and the real worker
serving all-MiniLM-L6-v2. Vectors are checked against the same model run by
transformers, in both encodings; refusals as OpenAI's 400s."""

from __future__ import annotations

import base64
import math
import struct

import httpx
import openai
import pytest

from tests.worker.test_embeddings import TEXTS, cosine


@pytest.fixture
def sdk(embedding_gateway, gateway_key) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=embedding_gateway.url, api_key=gateway_key, max_retries=0, timeout=120
    )


@pytest.fixture
def model(sdk) -> str:
    (listed,) = sdk.models.list().data
    return listed.id


def test_the_models_route_lists_the_embedding_model(model, embedding_model_dir):
    assert model == str(embedding_model_dir)  # a local folder is named by its path


# The SDK's default asks for base64 and decodes it itself.
@pytest.mark.parametrize("encoding_format", ["float", openai.NOT_GIVEN])
def test_vectors_in_both_encodings_are_the_models_own(
    sdk, model, reference_embeddings, encoding_format, embedding_gateway
):
    answer = sdk.embeddings.create(model=model, input=TEXTS, encoding_format=encoding_format)
    expected = reference_embeddings(TEXTS)
    assert [item.index for item in answer.data] == [0, 1, 2]
    assert all(len(item.embedding) == 384 for item in answer.data)
    assert [
        cosine(item.embedding, want) >= 0.999
        for item, want in zip(answer.data, expected, strict=True)
    ] == [True] * 3
    tokens = sum(len(reference_embeddings.tokenizer(text)["input_ids"]) for text in TEXTS)
    assert (answer.usage.prompt_tokens, answer.usage.total_tokens) == (tokens, tokens)
    assert (answer.object, answer.model) == ("list", model)
    (line,) = [
        line for line in embedding_gateway.request_lines() if line["route"] == "/v1/embeddings"
    ][-1:]
    assert (line["status"], line["outcome"], line["prompt_tokens"]) == (200, "completed", tokens)


def test_the_sdks_default_is_base64_of_little_endian_float32(
    embedding_gateway, gateway_key, model, reference_embeddings
):
    response = httpx.post(
        f"{embedding_gateway.url}/embeddings",
        json={"model": model, "input": TEXTS[0], "encoding_format": "base64"},
        headers={"Authorization": f"Bearer {gateway_key}"},
        timeout=120,
    )
    (item,) = response.json()["data"]
    vector = list(struct.unpack("<384f", base64.b64decode(item["embedding"])))
    assert cosine(vector, reference_embeddings(TEXTS[:1])[0]) >= 0.999
    assert math.isclose(math.fsum(v * v for v in vector), 1, abs_tol=1e-3)


def test_token_arrays_and_vllms_truncation(sdk, model, reference_embeddings):
    tokenizer = reference_embeddings.tokenizer
    ids = tokenizer(TEXTS[1])["input_ids"]
    from_tokens = sdk.embeddings.create(model=model, input=[ids])
    cut = sdk.embeddings.create(
        model=model, input=TEXTS[1], extra_body={"truncate_prompt_tokens": 6}
    )
    first_six = tokenizer(TEXTS[1], truncation=True, max_length=6)["input_ids"]
    (whole, first_six) = reference_embeddings([ids, first_six])
    assert cosine(from_tokens.data[0].embedding, whole) >= 0.999
    assert cosine(cut.data[0].embedding, first_six) >= 0.999
    assert cut.usage.prompt_tokens == 6


@pytest.mark.parametrize(
    ("request_fields", "param", "in_message"),
    [
        ({"dimensions": 64}, None, "fixed size of 384"),
        ({"input": ""}, "input", "empty"),
        ({"input": ["a"] * 2049}, "input", "MAX_EMBED_INPUTS=2048"),
        ({"encoding_format": "int8"}, "encoding_format", "encoding_format"),
        ({"stream": True}, "stream", "Unrecognized request argument"),
    ],
)
def test_refusals_are_openais_400s(
    embedding_gateway, gateway_key, model, request_fields, param, in_message
):
    body = {"model": model, "input": "fine", **request_fields}
    response = httpx.post(
        f"{embedding_gateway.url}/embeddings",
        json=body,
        headers={"Authorization": f"Bearer {gateway_key}"},
        timeout=120,
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert in_message in error["message"]


def test_a_chat_asked_of_the_embedding_model_is_a_400(sdk, model):
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}])
    assert caught.value.body["code"] == "invalid_input"
    assert "serves an embedding model" in caught.value.body["message"]
