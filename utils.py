"""Model locator: turns an entry of MODELS into a directory the engine loads.

Rules:
- A local directory is used as it is.
- Anything else is a Hugging Face repo id, fetched into (or found in) the
  standard hub cache, limited to the files vLLM needs.
"""

from __future__ import annotations

import os

# What vLLM reads from a repo: config, tokenizer and generation files, and
# safetensors weights with their index.
VLLM_FILES = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja"]


def resolve_model(spec: str) -> str:
    """A local directory holding the model named by `spec`."""
    if os.path.isdir(spec):
        return spec
    from huggingface_hub import snapshot_download

    return snapshot_download(spec, allow_patterns=VLLM_FILES)
