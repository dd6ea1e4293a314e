"""The OpenAI-compatible gateway, from a checkout (installed, the same is
`encrypted-vllm-gateway ...`):

    python3 gateway.py --endpoint-id ID        # RUNPOD_API_KEY, ENCRYPTION_KEY

The code is `encrypted_vllm.client.gateway`. Run with a Python that lacks
its packages, it starts again with `.venv`'s."""

import sys

from encrypted_vllm.dev import relaunch

relaunch.ensure(__name__, "httpx", "pydantic", "cryptography", "starlette", "uvicorn", "openai")

from encrypted_vllm.client.gateway.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
