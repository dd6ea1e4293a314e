"""The verification protocol, the worker's contract (AGENTS.md):

    python3 test_local.py --prompt "Sanity check."                  # here, offline
    python3 test_local.py --endpoint-id ID --prompt "Sanity check."  # a deployed endpoint

The code is `encrypted_vllm.dev.verify`. Run with a Python that lacks its
packages, it starts again with `.venv`'s."""

import sys

from encrypted_vllm.dev import relaunch

relaunch.ensure(__name__, "httpx", "pydantic", "cryptography")

from encrypted_vllm.dev.verify import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
