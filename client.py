"""Reference client: encrypt a request, submit it to a RunPod endpoint, then
stream and decrypt the answer.

    python3 client.py --endpoint-id ID --prompt "Hello"     # RUNPOD_API_KEY, ENCRYPTION_KEY
    python3 client.py --generate-key

Rules:
- A request is validated here, with a detailed message, before anything is
  encrypted or sent: the worker's own refusals are deliberately terse.
- Only ciphertext leaves this process; the key never does.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

import protocol
from protocol import Channel, ProtocolError, StreamItem, Usage

RUNPOD_API = "https://api.runpod.ai/v2"
FINAL_STATUSES = {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"}


class JobFailed(Exception):
    """The job ended without a completion; `code` is the worker's stable code
    when the worker refused it, else None (e.g. CANCELLED, TIMED_OUT)."""

    def __init__(self, status: str, error: str | None):
        super().__init__(f"job {status}: {error}" if error else f"job {status}")
        self.status = status
        parsed = ProtocolError.parse(error) if error else None
        self.code = parsed.code if parsed else None


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str | None
    usage: Usage | None


class Client:
    """One RunPod endpoint, spoken to in wire protocol v1."""

    def __init__(
        self,
        endpoint_id: str | None = None,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        encryption_key: str | None = None,
        timeout: float = 30.0,
    ):
        if (endpoint_id is None) == (base_url is None):
            raise ValueError("give exactly one of endpoint_id or base_url")
        api_key = api_key or os.environ.get("RUNPOD_API_KEY", "")
        self.channel = Channel(encryption_key or os.environ.get("ENCRYPTION_KEY", ""))
        self._http = httpx.Client(
            base_url=base_url or f"{RUNPOD_API}/{endpoint_id}",
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=timeout,
        )

    def stream(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[dict[str, str]] | None = None,
        sampling_params: dict[str, Any] | None = None,
    ) -> Iterator[StreamItem]:
        """Submit a request and yield its decrypted items as they arrive."""
        request = protocol.validate_request(prompt, messages, sampling_params)
        job = self._post("/run", {"input": self.channel.seal_request(request)})
        yield from self._follow(job["id"])

    def run_sync(self, prompt: str | None = None, **kwargs: Any) -> Completion:
        items = list(self.stream(prompt, **kwargs))
        last = items[-1] if items else StreamItem("")
        return Completion("".join(item.text for item in items), last.finish_reason, last.usage)

    def _follow(self, job_id: str) -> Iterator[StreamItem]:
        # Poll fast at first and right after each chunk, so time to first
        # token is not set by the poll interval; back off while idle.
        delay = 0.05
        while True:
            body = self._get(f"/stream/{job_id}")
            chunks = body.get("stream") or []
            for chunk in chunks:
                yield self.channel.open_item(chunk["output"])
            status = body.get("status")
            if status in FINAL_STATUSES:
                if status != "COMPLETED":
                    raise JobFailed(status, body.get("error") or self._error_of(job_id))
                if not chunks:
                    return
            delay = 0.05 if chunks else min(delay * 1.5, 1.0)
            time.sleep(delay)

    def _error_of(self, job_id: str) -> str | None:
        return self._get(f"/status/{job_id}").get("error")

    def _get(self, path: str) -> dict:
        response = self._http.get(path)
        response.raise_for_status()
        return response.json()

    def _post(self, path: str, body: dict | None = None) -> dict:
        response = self._http.post(path, json=body)
        response.raise_for_status()
        return response.json()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--generate-key", action="store_true", help="print a new ENCRYPTION_KEY and exit"
    )
    parser.add_argument("--endpoint-id", help="the RunPod endpoint to call")
    parser.add_argument("--prompt", help="the prompt to send")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.7)
    args = parser.parse_args(argv)
    if args.generate_key:
        print(protocol.generate_key())
        return 0
    if not args.endpoint_id or args.prompt is None:
        parser.error("--endpoint-id and --prompt are required (or --generate-key)")

    client = Client(args.endpoint_id)
    sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    try:
        for item in client.stream(args.prompt, sampling_params=sampling):
            print(item.text, end="", flush=True)
    except JobFailed as error:
        print(f"\n{error}", file=sys.stderr)
        return 1
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
