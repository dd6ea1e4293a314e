"""RunPod serverless entry point: `python3 -u rp_handler.py` is the
container's command. The worker is `encrypted_vllm.worker` (its `main`);
this file only starts it, from the image's folder or a checkout, with no
install of the project needed. From a checkout, a Python that lacks the
worker's packages starts it again with `.venv`'s (`bash setup.sh`)."""

import sys

from encrypted_vllm.dev import relaunch

relaunch.ensure(__name__, "pydantic", "cryptography", "huggingface_hub", "psutil", "runpod", "vllm")

from encrypted_vllm.worker.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
