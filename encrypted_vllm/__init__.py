"""Encrypted streaming vLLM on RunPod serverless: every prompt and every token
crosses RunPod as a Fernet token.

    from encrypted_vllm import Client
    with Client("ENDPOINT_ID") as client:        # RUNPOD_API_KEY, ENCRYPTION_KEY
        print(client.run_sync(messages=[{"role": "user", "content": "Hi"}]).text)

The package's folders are the two sides of the wire and what joins them:
- `wire/`: what both sides share: the protocol's plaintexts (`protocol`)
  and their encryption (`channel`).
- `client/`: what runs on the user's machine: the library and its command
  line, and `client/gateway/`, OpenAI's API served locally or in process.
- `worker/`: what runs on RunPod: the job handler, its engine and its boot.
  It needs vLLM and the runpod SDK, which the client side never imports.
- `dev/`: tools for this repository: the loopback RunPod endpoint, the
  offline models, the verification protocol (`test_local.py`).

Rules:
- Importing this package imports nothing but the standard library: the
  names below are loaded on first use, so that the worker's configuration
  check and the command lines' `--help` stay instant.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "1.0.0"

if TYPE_CHECKING:
    from encrypted_vllm.client.gateway.in_process import AsyncOpenAI, OpenAI
    from encrypted_vllm.client.library import (
        AsyncClient,
        AuthenticationError,
        Client,
        ClientError,
        Completion,
        DecryptionFailed,
        Embeddings,
        EndpointNotFound,
        JobFailed,
        JobTimeout,
        RateLimited,
        ServerError,
        StreamIntegrityError,
        image_part,
    )
    from encrypted_vllm.wire.channel import generate_key

# Public name -> the module that defines it.
_EXPORTS = {
    **dict.fromkeys(
        (
            "AsyncClient",
            "AuthenticationError",
            "Client",
            "ClientError",
            "Completion",
            "DecryptionFailed",
            "Embeddings",
            "EndpointNotFound",
            "JobFailed",
            "JobTimeout",
            "RateLimited",
            "ServerError",
            "StreamIntegrityError",
            "image_part",
        ),
        "encrypted_vllm.client.library",
    ),
    "OpenAI": "encrypted_vllm.client.gateway.in_process",
    "AsyncOpenAI": "encrypted_vllm.client.gateway.in_process",
    "generate_key": "encrypted_vllm.wire.channel",
}

__all__ = [
    "AsyncClient",
    "AsyncOpenAI",
    "AuthenticationError",
    "Client",
    "ClientError",
    "Completion",
    "DecryptionFailed",
    "Embeddings",
    "EndpointNotFound",
    "JobFailed",
    "JobTimeout",
    "OpenAI",
    "RateLimited",
    "ServerError",
    "StreamIntegrityError",
    "__version__",
    "generate_key",
    "image_part",
]


def __getattr__(name: str) -> Any:
    try:
        module = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'encrypted_vllm' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
