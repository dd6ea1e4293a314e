"""The gateway as its users run it, one process per test module: in front
of the loopback endpoint with the tiny model's worker (`gateway`), or with
the real model's (`real_gateway`). Callers must send GATEWAY_API_KEY."""

from __future__ import annotations

import pytest

from encrypted_vllm.wire import channel
from tests.gateway_process import GatewayProcess, in_front_of


@pytest.fixture(scope="module")
def gateway_key() -> str:
    return channel.generate_key()  # any random text would do


def _gateway(live, gateway_key: str, log_dir) -> GatewayProcess:
    return in_front_of(live, log_dir, GATEWAY_API_KEY=gateway_key)


@pytest.fixture(scope="module")
def gateway(live, gateway_key, tmp_path_factory):
    """One endpoint (the tiny model's), named by its worker's card."""
    process = _gateway(live, gateway_key, tmp_path_factory.mktemp("gateway"))
    yield process
    process.stop()


@pytest.fixture(scope="module")
def real_gateway(real_live, gateway_key, tmp_path_factory):
    """One endpoint serving the real model, named by its worker's card."""
    process = _gateway(real_live, gateway_key, tmp_path_factory.mktemp("real-gateway"))
    yield process
    process.stop()


@pytest.fixture(scope="module")
def embedding_gateway(embedding_live, gateway_key, tmp_path_factory):
    """One endpoint serving the embedding model, named by its worker's card."""
    process = _gateway(embedding_live, gateway_key, tmp_path_factory.mktemp("embedding-gateway"))
    yield process
    process.stop()
