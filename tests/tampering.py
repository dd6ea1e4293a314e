"""A loopback RunPod endpoint that runs the real worker honestly, then
changes what it serves, as RunPod (or anyone between it and the client)
could: the test double of the integrity tests.

It holds each job's posted items until the job is done, then serves the
sequence a `Tamper` makes of them on both of RunPod's output paths, `/stream`
and `/status`, as an attacker in RunPod's place would, so that neither path
can repair the other. `lost_final` is the honest case: RunPod's stream lost
the last post, and `/status` still holds every item.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from encrypted_vllm.dev.local_endpoint import LocalEndpoint

Items = list[Any]
# (this job's items, the previous job's) -> (what /stream serves, what /status serves)
Tamper = Callable[[Items, Items], tuple[Items, Items]]


def both(change: Callable[[Items, Items], Items]) -> Tamper:
    def tamper(items: Items, previous: Items) -> tuple[Items, Items]:
        changed = change(items, previous)
        return changed, changed

    return tamper


TAMPERS: dict[str, Tamper] = {
    # Another job's whole answer in place of this one's.
    "replayed": both(lambda items, previous: list(previous)),
    # One item of another job in place of this job's second.
    "spliced": both(lambda items, previous: [items[0], previous[1], *items[2:]]),
    "swapped": both(lambda items, previous: [items[0], items[2], items[1], *items[3:]]),
    "dropped": both(lambda items, previous: [items[0], *items[2:]]),
    "repeated": both(lambda items, previous: [items[0], items[1], items[1], *items[2:]]),
    # The last items, the final one among them, cut off.
    "cut": both(lambda items, previous: items[: len(items) // 2]),
}


def lost_final(items: Items, previous: Items) -> tuple[Items, Items]:
    """Honest loss: the stream lacks its final item; /status has them all."""
    return items[:-1], items


class TamperingEndpoint(LocalEndpoint):
    """`tamper` decides what each job's outputs become; None serves honestly
    (and remembers the job's items for the next one to replay)."""

    def __init__(self, **options):
        super().__init__(**options)
        self.tamper: Tamper | None = None
        self.previous: Items = []
        self._held: dict[str, Items] = {}

    async def job_stream(self, request: web.Request) -> web.Response:
        job, body, size = await self._posted(request)
        if job is not None:
            job.posts.append((len(job.posts), size))
            self._held.setdefault(job.id, []).append(body)
        return web.json_response({"ok": True})

    async def job_done(self, request: web.Request) -> web.Response:
        job, body, _ = await self._posted(request)
        if job is not None:
            items = [chunk["output"] for chunk in self._held.pop(job.id, [])]
            if body.get("error"):
                self._finish(job, "FAILED", output=body.get("output"), error=body["error"])
            else:
                streamed, stored = (self.tamper or (lambda i, p: (i, i)))(items, self.previous)
                if self.tamper is None:
                    self.previous = items
                job.chunks = [{"output": item} for item in streamed]
                self._finish(job, "COMPLETED", output=stored)
            await self._notify()
        return web.json_response({"ok": True})
