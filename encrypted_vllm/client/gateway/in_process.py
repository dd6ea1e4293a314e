"""The gateway inside the caller's process: `openai` clients, from the
`openai` package and unmodified, whose HTTP transport is the gateway's own
ASGI app, so that no second process runs and no port opens.

    import encrypted_vllm
    llm = encrypted_vllm.OpenAI("ENDPOINT_ID")         # RUNPOD_API_KEY, ENCRYPTION_KEY
    llm = encrypted_vllm.AsyncOpenAI(config="gateway.toml")
    ChatOpenAI(model=..., base_url=BASE_URL, api_key="unused",      # LangChain
               http_client=http_client("ENDPOINT_ID"),
               http_async_client=async_http_client("ENDPOINT_ID"))

Rules:
- One code path: the same `app.Gateway`, routes, translation and errors as
  `encrypted-vllm-gateway` serves, and the same client library under it.
- The app's lifespan (its warm-up of the endpoint, the cancels of abandoned
  jobs at the end) starts with the first request and ends when the client
  is closed: close it, or use it as a context manager.
- `OpenAI` runs the app on a private event loop in a thread of its own;
  `AsyncOpenAI` on the caller's loop, which it must then keep to.
- The keys stay in this process; only ciphertext leaves it, towards RunPod.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
import openai
from starlette.applications import Starlette

from encrypted_vllm.client.gateway import app
from encrypted_vllm.client.gateway.asgi_transport import AsyncASGITransport, SyncASGITransport
from encrypted_vllm.client.library import DEFAULT_TIMEOUT_S, AsyncClient

# The host is never resolved: every request goes to the app.
BASE_URL = "http://in-process/v1"


def gateway_app(
    endpoint_id: str | None = None,
    *,
    base_url: str | None = None,
    config: str | os.PathLike[str] | None = None,
    api_key: str | None = None,
    encryption_key: str | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> Starlette:
    """The gateway's ASGI app for one endpoint (by id or URL), or for the
    models of a `--config` file; keys default to RUNPOD_API_KEY and
    ENCRYPTION_KEY, as for `Client`."""
    if config is not None:
        if endpoint_id is not None or base_url is not None:
            raise ValueError("give config, or an endpoint_id or base_url, not both")
        models = app.load_models(Path(config), os.environ)
    else:
        endpoint = AsyncClient(
            endpoint_id,
            base_url=base_url,
            api_key=api_key,
            encryption_key=encryption_key,
            timeout=timeout,
        )
        models = app.Models([app.Provider(endpoint, endpoint_id or base_url or "")])
    return app.Gateway(models, api_key=None).app


def http_client(endpoint_id: str | None = None, **gateway_options: Any) -> httpx.Client:
    """An `httpx.Client` whose requests the gateway serves in this process,
    on a private event loop (arguments: `gateway_app`'s); for callers that
    build their own `openai` client from one (LangChain's `http_client`)."""
    app = gateway_app(endpoint_id, **gateway_options)
    return httpx.Client(transport=SyncASGITransport(app, lifespan=True), base_url=BASE_URL)


def async_http_client(endpoint_id: str | None = None, **gateway_options: Any) -> httpx.AsyncClient:
    """`http_client`, to await, served on the caller's loop (LangChain's
    `http_async_client`)."""
    app = gateway_app(endpoint_id, **gateway_options)
    return httpx.AsyncClient(transport=AsyncASGITransport(app, lifespan=True), base_url=BASE_URL)


def OpenAI(  # a factory that reads as the class it returns
    endpoint_id: str | None = None,
    *,
    base_url: str | None = None,
    config: str | os.PathLike[str] | None = None,
    api_key: str | None = None,
    encryption_key: str | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    **openai_options: Any,
) -> openai.OpenAI:
    """An `openai.OpenAI` whose every call the gateway serves in this
    process. The first arguments are `gateway_app`'s (`api_key` is RunPod's);
    `openai_options` go to `openai.OpenAI` (`max_retries` is 0 unless given:
    the client library under the app already retries what is safe to)."""
    client = http_client(
        endpoint_id,
        base_url=base_url,
        config=config,
        api_key=api_key,
        encryption_key=encryption_key,
        timeout=timeout,
    )
    # openai annotates an httpx2.Client and takes an httpx.Client too.
    return openai.OpenAI(**_sdk_options(openai_options), http_client=client)  # type: ignore[arg-type]


def AsyncOpenAI(  # as OpenAI
    endpoint_id: str | None = None,
    *,
    base_url: str | None = None,
    config: str | os.PathLike[str] | None = None,
    api_key: str | None = None,
    encryption_key: str | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    **openai_options: Any,
) -> openai.AsyncOpenAI:
    """`OpenAI`, to await: an `openai.AsyncOpenAI` served on the caller's loop."""
    client = async_http_client(
        endpoint_id,
        base_url=base_url,
        config=config,
        api_key=api_key,
        encryption_key=encryption_key,
        timeout=timeout,
    )
    return openai.AsyncOpenAI(**_sdk_options(openai_options), http_client=client)  # type: ignore[arg-type]


def _sdk_options(options: dict[str, Any]) -> dict[str, Any]:
    # The SDK's own key is never needed (the app asks none in process), and a
    # real OPENAI_API_KEY from the environment must not reach the app.
    return {"api_key": "in-process", "base_url": BASE_URL, "max_retries": 0, **options}
