"""OpenAI's embeddings API (`POST /v1/embeddings`) as the gateway serves it,
in wire protocol v1.3's terms: the request as one pydantic model, its
translation into the wire's `embed` request, and the answer in the `openai`
package's own types.

Rules:
- `input` is what OpenAI's API takes: a string, a token array, or a list of
  either (at most MAX_EMBED_INPUTS); all of it is one job.
- `encoding_format` "base64" is the wire's own encoding of a vector (float32,
  little-endian), passed on as it came; "float" decodes it.
- `dimensions` is sent on: the worker serves it for Matryoshka models, and
  for others only as the vectors' own size (a 400 otherwise, naming it).
- vLLM's `truncate_prompt_tokens` is taken as its server takes it; without
  it an input longer than the model's context is a 400.
- `user` is accepted and not sent on: it changes nothing in the answer.
- Nothing here logs or keeps request content.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from openai.types import CreateEmbeddingResponse
from openai.types import Embedding as OpenAIEmbedding
from openai.types.create_embedding_response import Usage
from pydantic import BaseModel, ConfigDict, Field

from encrypted_vllm.client.gateway.api import (
    ApiError,
    Events,
    checked_wire_request,
    openai_error_body,
)
from encrypted_vllm.client.library import (
    ClientError,
    Completion,
    embed_request,
    one_vector_each,
)

_INT32 = 2**31 - 1


class EmbeddingsRequest(BaseModel):
    """`POST /v1/embeddings`."""

    model_config = ConfigDict(extra="forbid")
    id_prefix: ClassVar[str] = "embd-"  # OpenAI's answer has no id; the log's job is its name

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, le=_INT32)
    truncate_prompt_tokens: int | None = None  # vLLM's extra; the wire checks its range
    user: str | None = None  # accepted and ignored

    error_body = staticmethod(openai_error_body)

    @property
    def stream(self) -> bool:
        return False  # OpenAI's embeddings are never streamed

    def wire_request(self) -> dict[str, Any]:
        embed = embed_request(self.input, self.truncate_prompt_tokens, self.dimensions)
        # ("embed", "input", 3) is the caller's ("input", 3).
        return checked_wire_request({"embed": embed}, lambda loc: loc[1:])

    def answer(self, completion: Completion, *, response_id: str, created: int, model: str) -> str:
        del response_id, created  # not in OpenAI's embeddings object
        inputs = len(embed_request(self.input, None, None)["input"])
        try:
            embeddings = one_vector_each(completion, inputs)
        except ClientError as error:
            raise ApiError(502, str(error), "server_error", "incomplete_answer") from None
        as_base64 = self.encoding_format == "base64"
        data = [
            OpenAIEmbedding.model_construct(
                object="embedding",
                index=embedding.index,
                # The SDK's type says floats; with base64 OpenAI sends the string.
                embedding=embedding.base64 if as_base64 else embedding.vector,
            )
            for embedding in embeddings
        ]
        tokens = completion.usage.prompt_tokens
        answer = CreateEmbeddingResponse.model_construct(
            object="list",
            data=data,
            model=model,
            usage=Usage(prompt_tokens=tokens, total_tokens=tokens),
        )
        return answer.model_dump_json(warnings=False)

    def chunks(self, *, response_id: str, created: int, model: str) -> Events:
        raise AssertionError("embeddings are never streamed")
