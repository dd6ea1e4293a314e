"""Constant-rate streaming (STREAM_INTERVAL_MS): a stream whose timing, item
sizes and item count say nothing about its text but a bucket.

Rules:
- From the job's start, a shaped stream posts exactly one item per interval
  until its end, each exactly one PADDING_BUCKET long: what does not fit
  waits for the next item, and an interval with nothing new posts an empty
  item (`{"text": ""}`).
- Its item count is rounded up to a multiple of STREAM_ITEMS_QUANTUM with
  empty items after the final one (the one with finish_reason and usage), so
  its length and duration tell an observer only which band they fell in.
- Only text is split, at character boundaries; a unit that cannot be split
  (a tool call's id and name, the describe card) larger than a bucket goes
  alone in a larger item.
- A late post (the SDK awaits each) delays the next item, never bunches the
  ones after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from encrypted_vllm.wire.channel import REQUEST_BINDING_CHARS
from encrypted_vllm.wire.protocol import StreamItem, ToolCallDelta

MAX_SEQ = 10**7 - 1

# An entry of log-probabilities (20 alternatives, say) may not fit a bucket,
# and cannot be split.
NO_LOGPROBS = "logprobs are not offered with constant-rate streaming (STREAM_INTERVAL_MS)"
NO_EMBEDDINGS = "embeddings are not offered with constant-rate streaming (STREAM_INTERVAL_MS)"


@dataclass(frozen=True)
class Shaping:
    interval_s: float
    bucket: int  # PADDING_BUCKET: the plaintext size of every item
    quantum: int  # STREAM_ITEMS_QUANTUM

    async def shape(
        self, items: AsyncIterator[StreamItem], started: float
    ) -> AsyncIterator[StreamItem]:
        """`items` (what the engine produced, as it came) reposted on the
        clock; `started`: when the job arrived (time.monotonic)."""
        buffer = _Buffer()
        producer = asyncio.ensure_future(buffer.fill(items))
        sent = 0
        due = started
        try:
            while True:
                due += self.interval_s
                await asyncio.sleep(max(due - time.monotonic(), 0))
                due = max(due, time.monotonic())  # late: start the next interval now
                if producer.done() and producer.exception() is not None:
                    raise producer.exception()
                item, final = buffer.take(self._fits, producer.done())
                yield item
                sent += 1
                if final:
                    break
            while sent % self.quantum:
                due += self.interval_s
                await asyncio.sleep(max(due - time.monotonic(), 0))
                due = max(due, time.monotonic())
                yield StreamItem()
                sent += 1
        finally:
            if not producer.done():
                producer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await producer

    def _fits(self, item: StreamItem) -> bool:
        # Measured as it will be sealed: naming its request and its place
        # (a stream of up to ten million items).
        bound = replace(item, request="-" * REQUEST_BINDING_CHARS, seq=MAX_SEQ)
        return len(bound.to_json()) <= self.bucket


class _Buffer:
    """What the engine produced and no item has carried yet."""

    def __init__(self):
        self.text = ""
        self.reasoning = ""
        self.tool_calls: list[ToolCallDelta] = []
        self.last: StreamItem | None = None  # the final item, once it came

    async def fill(self, items: AsyncIterator[StreamItem]) -> None:
        async for item in items:
            self.text += item.text
            self.reasoning += item.reasoning
            self.tool_calls += item.tool_calls
            if item.final:
                self.last = item

    def take(self, fits, source_done: bool) -> tuple[StreamItem, bool]:
        """The next item, as full as one bucket allows, and whether it is
        the final one."""
        item = StreamItem()
        item = self._take_text(item, "reasoning", fits)
        item = self._take_text(item, "text", fits)
        while self.tool_calls:
            call = self.tool_calls[0]

            def with_call(arguments: str, call=call, item=item) -> StreamItem:
                return replace(
                    item, tool_calls=(*item.tool_calls, replace(call, arguments=arguments))
                )

            if fits(with_call(call.arguments)):
                item = with_call(call.arguments)
                self.tool_calls.pop(0)
                continue
            if not (fits(with_call("")) or item.empty):
                break  # its id and name wait for the next item
            # As much of the arguments as fits (none, for a head that needs
            # a bucket of its own: it then goes alone).
            cut = _longest_prefix(call.arguments, lambda part: fits(with_call(part)))
            item = with_call(call.arguments[:cut])
            self.tool_calls[0] = ToolCallDelta(call.index, arguments=call.arguments[cut:])
            break
        drained = not (self.text or self.reasoning or self.tool_calls)
        if drained and source_done and self.last is not None:
            last = self.last
            final = replace(
                item, finish_reason=last.finish_reason, usage=last.usage, card=last.card
            )
            if fits(final) or item.empty:
                return final, True
        return item, False

    def _take_text(self, item: StreamItem, name: str, fits) -> StreamItem:
        text = getattr(self, name)
        if not text:
            return item
        cut = _longest_prefix(text, lambda part: fits(replace(item, **{name: part})))
        setattr(self, name, text[cut:])
        return replace(item, **{name: text[:cut]})


def _longest_prefix(text: str, fits) -> int:
    """The most characters of `text` that `fits` (a binary search)."""
    low, high = 0, len(text)
    while low < high:
        middle = (low + high + 1) // 2
        if fits(text[:middle]):
            low = middle
        else:
            high = middle - 1
    return low
