# syntax=docker/dockerfile:1
# The gateway as a sidecar container: OpenAI's API on port 8080 in front of
# an encrypted worker on RunPod. Only the client side and its gateway extra:
# no vLLM, no torch. Build from the repository's root:
#   docker build -f gateway.Dockerfile -t you/encrypted-vllm-gateway:1.0.0 .
# It listens beyond loopback, so it needs GATEWAY_API_KEY (see docs/gateway.md).
FROM python:3.12-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The package and the versions the tests run the gateway with.
WORKDIR /src
COPY pyproject.toml README.md requirements-gateway.txt ./
COPY encrypted_vllm/ encrypted_vllm/
RUN pip install --no-cache-dir --constraint requirements-gateway.txt ".[gateway]" \
    && useradd --create-home --uid 10001 gateway

# Keys come from the environment (RUNPOD_API_KEY, ENCRYPTION_KEY,
# GATEWAY_API_KEY) or a mounted --config file; never from the image.
USER 10001
WORKDIR /home/gateway
EXPOSE 8080
ENTRYPOINT ["encrypted-vllm-gateway", "--host", "0.0.0.0", "--port", "8080"]
CMD ["--help"]
