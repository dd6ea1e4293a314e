"""The client library and its command line, from a checkout (installed, the
same are `from encrypted_vllm import Client` and `encrypted-vllm ...`):

    python3 client.py --endpoint-id ID --prompt "Hello"    # RUNPOD_API_KEY, ENCRYPTION_KEY
    python3 client.py --generate-key
    from client import Client

The code is `encrypted_vllm.client`; this file re-exports its library. Run with a
Python that lacks its packages, it starts again with `.venv`'s."""

import sys

from encrypted_vllm.dev import relaunch

relaunch.ensure(__name__, "httpx", "pydantic", "cryptography")

from encrypted_vllm.client.library import *  # noqa: E402, F403
from encrypted_vllm.client.library import __all__  # noqa: E402, F401

if __name__ == "__main__":
    from encrypted_vllm.client.cli import main

    sys.exit(main())
