"""The client's local duties: key generation and validation before sending."""

from __future__ import annotations

import subprocess
import sys

import pydantic
import pytest
from cryptography.fernet import Fernet

import client
import protocol


def test_generate_key_prints_a_fernet_key():
    result = subprocess.run(
        [sys.executable, "client.py", "--generate-key"], capture_output=True, text=True, check=True
    )
    key = result.stdout.strip()
    assert len(key) == 44
    Fernet(key.encode())  # raises if it is not a key


def test_an_invalid_request_is_refused_before_anything_is_sent():
    # Port 9 (discard) on loopback: a request that were sent would fail with a
    # connection error, not with the validation error asserted here.
    endpoint = client.Client(
        base_url="http://127.0.0.1:9", api_key="k", encryption_key=protocol.generate_key()
    )
    with pytest.raises(pydantic.ValidationError, match="top_p"):
        next(endpoint.stream("hi", sampling_params={"top_p": 3}))
