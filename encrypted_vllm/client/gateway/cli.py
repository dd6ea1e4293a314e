"""The gateway's command line (`encrypted-vllm-gateway`, or `python3
gateway.py` in a checkout): serves the app on loopback and prints the base
URL to give an OpenAI client.

    encrypted-vllm-gateway --endpoint-id ID        # RUNPOD_API_KEY, ENCRYPTION_KEY
    encrypted-vllm-gateway --base-url http://127.0.0.1:8000/v2/local
    encrypted-vllm-gateway --config gateway.toml   # several endpoints, fallbacks

Rules:
- Arguments are parsed before the ASGI stack is imported, so `--help` and
  `--version` answer at once; a missing `gateway` extra is named with the
  line that installs it.
- It listens beyond loopback only when GATEWAY_API_KEY is set.
- Exit codes: 0 stopped, 2 bad arguments, configuration or address.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import sys
from pathlib import Path

from encrypted_vllm import __version__

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8080
# How long a stopping gateway lets open streams and the cancels of their
# jobs finish.
SHUTDOWN_GRACE_S = 10
KEEP_ALIVE_S = 75  # seconds an idle caller connection stays open
INSTALL_HINT = 'pip install "encrypted-vllm[gateway]"'


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="encrypted-vllm-gateway",
        description="Serve OpenAI's API on this machine in front of an encrypted vLLM "
        "worker on RunPod: each call becomes an encrypted job.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--endpoint-id", help="the RunPod endpoint to serve")
    where.add_argument("--base-url", help="an endpoint's URL, e.g. the loopback endpoint's")
    where.add_argument("--config", type=Path, help="a TOML file of models (docs/gateway.md)")
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"default {DEFAULT_HOST}")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}; 0: any free port"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        help="seconds a job may take (default 600, RunPod's execution timeout; "
        "--config: each model's timeout_s)",
    )
    return parser


def loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    if os.name != "nt":
        # On Windows SO_REUSEADDR lets a second server take a port in use.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    # Listening before the URL is printed, so that a caller started on
    # seeing it is queued, not refused.
    sock.listen(2048)
    return sock


def base_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        import uvicorn

        from encrypted_vllm.client import library
        from encrypted_vllm.client.gateway import app
    except ModuleNotFoundError as missing:
        print(f"error: the gateway needs {missing.name!r}: {INSTALL_HINT}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per poll otherwise

    api_key = os.environ.get("GATEWAY_API_KEY", "").strip() or None
    if api_key is None and not loopback(args.host):
        print(
            f"error: --host {args.host} is beyond loopback: set GATEWAY_API_KEY, the key "
            "that every caller must then send",
            file=sys.stderr,
        )
        return 2
    try:
        if args.config is not None:
            models = app.load_models(args.config, os.environ)
        else:
            timeout = library.DEFAULT_TIMEOUT_S if args.timeout is None else args.timeout
            endpoint = library.AsyncClient(
                args.endpoint_id, base_url=args.base_url, timeout=timeout
            )
            models = app.Models([app.Provider(endpoint, args.endpoint_id or args.base_url)])
        sock = listen(args.host, args.port)
    except (app.ConfigError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    print(f"OpenAI base URL: {base_url(sock)}", flush=True)
    if api_key is None:
        print("API key: any (GATEWAY_API_KEY is unset; loopback only)", flush=True)
    else:
        print("API key: the value of GATEWAY_API_KEY", flush=True)
    config = uvicorn.Config(
        app.Gateway(models, api_key).app,
        log_config=None,  # this process's logging, above
        access_log=False,  # the gateway's own request line says more, and no path
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
        # Longer than the callers' idle connections live (httpx's, the
        # openai and anthropic SDKs': 5 s, uvicorn's own default too), so that
        # the caller closes an idle connection first and never sends a
        # request on one the gateway is closing (seen in bench/gateway.py).
        timeout_keep_alive=KEEP_ALIVE_S,
    )
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
