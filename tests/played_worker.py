"""A test as the worker of a loopback endpoint (`PlayedWorker`): it takes
jobs over the job API that the runpod SDK's worker loop uses and answers
them itself, item by item, to play what a real worker would not do (a
failure mid-stream, reasoning from a model that has none), through the
real client side."""

from __future__ import annotations

import collections
import dataclasses
import json
import threading
import time

import httpx

from encrypted_vllm.dev import local_endpoint
from encrypted_vllm.wire import channel, protocol
from encrypted_vllm.wire.protocol import StreamItem


class PlayedWorker:
    """This test as the worker of a loopback endpoint, over the job API that
    the runpod SDK's worker loop uses; its items name their request and
    place, as the worker's do (protocol v1.2 on)."""

    def __init__(self, serving: local_endpoint.Serving, key: str):
        self.channel = channel.Channel(key)
        self._bindings: dict[str, str] = {}
        self._posted: collections.Counter[str] = collections.Counter()
        # The SDK worker sends its key bare, and posts JSON labelled as form data.
        self._http = httpx.Client(
            base_url=serving.url, headers={"Authorization": serving.endpoint.api_key}, timeout=10
        )

    def take(self, timeout_s: float = 20) -> tuple[str, protocol.Request]:
        deadline = time.monotonic() + timeout_s
        while (taken := self._http.get("/job-take/played?gpu=LOCAL")).status_code == 204:
            assert time.monotonic() < deadline, "no job came"
        job = taken.json()
        token = job["input"]["ciphertext"]
        plaintext, _, _ = self.channel.open_request(token)
        self._bindings[job["id"]] = channel.request_binding(token)
        return job["id"], protocol.parse_request(plaintext)

    def stream(self, job_id: str, item: StreamItem, sealer: channel.Channel | None = None) -> None:
        bound = dataclasses.replace(item, request=self._bindings[job_id], seq=self._posted[job_id])
        self._posted[job_id] += 1
        self._post("job-stream", job_id, {"output": (sealer or self.channel).seal_item(bound)})

    def fail(self, job_id: str, error: str) -> None:
        self._post("job-done", job_id, {"error": error})

    def _post(self, kind: str, job_id: str, body: dict) -> None:
        response = self._http.post(
            f"/{kind}/played/{job_id}?gpu=LOCAL&isStream=false",
            content=json.dumps(body),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        response.raise_for_status()


def in_background(play) -> threading.Thread:
    thread = threading.Thread(target=play, daemon=True)
    thread.start()
    return thread
