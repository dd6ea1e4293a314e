"""One engine serving RunPod jobs: a job's life from its ciphertext to its
last encrypted item.

Rules:
- `Worker.handler` is an async generator, so every job shares one event loop
  and one engine (continuous batching). Each yielded item is the encrypted
  delta since the previous one, sealed under the key that opened the job's
  request; a stream yields at most its share of MAX_ITEMS_PER_SECOND, and
  the SDK posts each item before resuming us, so busy workers and slow
  networks coalesce tokens and lose none. Under STREAM_INTERVAL_MS the
  stream is shaped instead (`shaping`), its pace and sizes fixed.
- Every job, whatever its end, logs one `job done {...}` line of numbers.
- A dead engine fails every job in flight with ENGINE_ERROR and calls
  `on_engine_death`, so that the process exits and RunPod replaces it.
- A job fails only by yielding `{"error": "<CODE>: <reason>"}`: never by
  raising (the SDK would put a traceback into the job's error) and never
  inside successful output.
- Nothing from a request or its completion is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
import traceback
from collections.abc import AsyncIterator, Callable, Iterator

from vllm.engine.async_llm_engine import AsyncLLMEngine
from vllm.exceptions import VLLMClientError

from encrypted_vllm.wire.channel import Inbox
from encrypted_vllm.wire.protocol import (
    Embed,
    Embedding,
    ErrorCode,
    ProtocolError,
    Request,
    StreamItem,
    Usage,
)
from encrypted_vllm.worker import shaping
from encrypted_vllm.worker.generation import Delta, Planner, describe

log = logging.getLogger("worker")

STOPPED_REASON = "the worker stopped before the job finished: submit it again"
# An embeddings item's vectors, at most, in base64 characters (about 170
# vectors of 384 floats): RunPod posts each item in one request.
EMBEDDING_ITEM_CHARS = 256 * 1024


@dataclasses.dataclass
class JobRecord:
    """What the one log line of a job says: numbers and codes, never text."""

    job: str
    model: str
    received: float = dataclasses.field(default_factory=time.monotonic)
    # Whole seconds from the client's encryption to the worker: Fernet's
    # timestamp has that resolution, so 0 means "under about a second".
    queue_wait_s: int | None = None
    key: str | None = None  # the fingerprint of the key that opened the job
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_item: float | None = None
    last_item: float | None = None
    items: int = 0
    finish_reason: str | None = None
    error: str | None = None
    outcome: str | None = None  # set for jobs that did not run to their end
    stopped_by_worker: bool = False  # the worker's own stop cut it off
    logged: bool = False

    def log(self) -> None:
        if not self.logged:
            self.logged = True
            log.info("job done %s", self.line())

    def log_stop(self, _task: asyncio.Task | None = None) -> None:
        """The line of a job that ended before its request did."""
        self.outcome = "stopped" if self.stopped_by_worker else "cancelled"
        self.log()

    def line(self) -> str:
        ttft = self.first_item - self.received if self.first_item else None
        streaming = (self.last_item or 0) - (self.first_item or 0)
        rate = self.completion_tokens / streaming if streaming > 0 else None
        fields = {
            "job": self.job,
            "model": self.model,
            "key": self.key,
            "outcome": self.outcome or ("failed" if self.error else "completed"),
            "error": self.error,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "items": self.items,
            "queue_wait_s": self.queue_wait_s,
            "ttft_s": _rounded(ttft),
            "tokens_per_s": _rounded(rate, 1),
            "finish_reason": self.finish_reason,
        }
        return json.dumps({key: value for key, value in fields.items() if value is not None})


def _rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


class Worker:
    """Serves jobs on one engine; its only state is the bookkeeping of jobs in flight."""

    def __init__(
        self,
        engine: AsyncLLMEngine,
        inbox: Inbox,
        *,
        planner: Planner | None = None,
        max_items_per_s: float = 0,
        shaper: shaping.Shaping | None = None,
        on_engine_death: Callable[[], None] = lambda: None,
    ):
        self.engine = engine
        self.inbox = inbox
        self.planner = planner or Planner(engine)
        self.max_items_per_s = max_items_per_s
        self.shaper = shaper
        self.on_engine_death = on_engine_death
        self.model_name: str = engine.model_config.served_model_name
        self._aborting: set[asyncio.Task] = set()
        # Jobs' tasks while they await the engine, and those of them that
        # the engine's death watch cancelled (see _watch_engine).
        self._in_engine: set[asyncio.Task] = set()
        self._failing: set[asyncio.Task] = set()
        # Every job's task while it runs, and its record.
        self.jobs: dict[asyncio.Task, JobRecord] = {}
        self._watch: asyncio.Task | None = None
        self._death_reported = False

    async def handler(self, job: dict) -> AsyncIterator[dict]:
        """A RunPod job in, encrypted stream items out; one log line at its end."""
        record = JobRecord(job=str(job.get("id")), model=self.model_name)
        task = asyncio.current_task()
        self.jobs[task] = record
        # RunPod's stop signal cancels the job's task wherever it waits, often
        # in the SDK's post of an item, where this generator sits at a yield
        # and is closed only by a later garbage collection: its end is logged
        # when the task ends.
        task.add_done_callback(record.log_stop)
        self._start_watch()
        failure: ProtocolError | None = None
        try:
            request, issued_at, channel, binding, cache_salt = self.inbox.admit(job.get("input"))
            record.key = channel.key_id
            record.queue_wait_s = max(int(time.time()) - issued_at, 0)
            if self.shaper is not None and request.sampling_params.logprobs is not None:
                raise ProtocolError(ErrorCode.INVALID_INPUT, shaping.NO_LOGPROBS)
            if request.describe:
                items = self._card(record, channel.key_id)
            elif request.embed is not None:
                if self.shaper is not None:
                    raise ProtocolError(ErrorCode.INVALID_INPUT, shaping.NO_EMBEDDINGS)
                items = self.embed(request.embed, record, cache_salt)
            else:
                items = self.generate(request, record, cache_salt)
            if self.shaper is not None:
                items = self.shaper.shape(items, record.received)
            async with contextlib.aclosing(items):
                async for item in items:
                    if not item.empty:
                        record.last_item = time.monotonic()
                        record.first_item = record.first_item or record.last_item
                    # Each item names its request and its place (v1.2).
                    item = dataclasses.replace(item, request=binding, seq=record.items)
                    record.items += 1
                    yield channel.seal_item(item)
        except ProtocolError as error:
            failure = error
        except (asyncio.CancelledError, GeneratorExit):
            record.log_stop(task)
            raise
        except Exception as error:
            # A bug must fail the job, not reach the SDK, which would put the
            # exception's message (possibly request content) in the job's error.
            log.error("job %s: internal error %s", record.job, _where(error))
            failure = ProtocolError(ErrorCode.ENGINE_ERROR, "internal error in the worker")
        finally:
            self.jobs.pop(task, None)
            task.remove_done_callback(record.log_stop)
        record.error = failure.code.value if failure else None
        if failure and failure.code is ErrorCode.WORKER_STOPPED:
            record.outcome = "stopped"
        record.log()
        if failure:
            yield {"error": str(failure)}

    async def _card(self, record: JobRecord, key_id: str) -> AsyncIterator[StreamItem]:
        """The answer to `{"describe": true}`."""
        record.finish_reason = "stop"
        yield describe(self.planner, key_id)

    def _item_interval(self) -> float:
        """Each stream's share of max_items_per_s, in seconds. An item costs
        an encryption here and an HTTP post to RunPod whether it holds one
        token or ten: pacing keeps that cost flat as streams multiply, while
        a lone stream still gets its tokens as they come. Shaped streams set
        their own pace."""
        if not self.max_items_per_s or self.shaper is not None:
            return 0.0
        return self.engine.get_num_unfinished_requests() / self.max_items_per_s

    async def generate(
        self, request: Request, record: JobRecord, cache_salt: str | None = None
    ) -> AsyncIterator[StreamItem]:
        """The engine's deltas for one request, as items: whenever a delta
        brings something, the item holds everything pending (so a consumer
        that skips some loses nothing); the last carries finish_reason and
        usage. Keeps `record` up to date."""
        request_id = record.job
        plan = await self.planner.plan(request, cache_salt, record.key)
        record.prompt_tokens = len(plan.engine_input["prompt_token_ids"])
        finished = stopped = False
        pending = Delta()
        next_item_due = 0.0

        def stop_early(_job: asyncio.Task | None = None) -> None:
            # Once, if the job ended before its request did. RunPod's stop
            # signal cancels the job's task wherever it waits: often in the
            # SDK's post of an item, while this generator sits at a yield and
            # would only be closed by a later garbage collection.
            nonlocal stopped
            if not (finished or stopped):
                stopped = True
                self._abort_soon(request_id, request_id)

        job = asyncio.current_task()
        job.add_done_callback(stop_early)
        outputs = self.engine.generate(
            plan.engine_input, plan.params, request_id, **plan.engine_kwargs
        )
        if plan.reader.constraint_given:
            refused = "the structured output or tools could not be compiled into a grammar"
        else:
            refused = "the engine refused the request"
        try:
            with self._engine_failures(job, request_id, refused, "generation failed"):
                # aclosing: leaving this loop early closes the engine's stream too.
                async with contextlib.aclosing(outputs):
                    while True:
                        self._in_engine.add(job)
                        try:
                            output = await anext(outputs)
                        except StopAsyncIteration:
                            break
                        finally:
                            self._in_engine.discard(job)
                        if record.stopped_by_worker:
                            raise ProtocolError(ErrorCode.WORKER_STOPPED, STOPPED_REASON)
                        completion = output.outputs[0]
                        record.completion_tokens += len(completion.token_ids)
                        pending.add(plan.reader.read(completion, finished=output.finished))
                        if output.finished:
                            finished = True
                            record.finish_reason = plan.reader.finish_reason(completion)
                            usage = Usage(record.prompt_tokens, record.completion_tokens)
                            item = pending.take(record.finish_reason, usage)
                            if record.finish_reason == "stop" and isinstance(
                                completion.stop_reason, str
                            ):
                                item = dataclasses.replace(
                                    item, stop_sequence=completion.stop_reason
                                )
                            yield item
                        elif pending and time.monotonic() >= next_item_due:
                            yield pending.take()
                            next_item_due = time.monotonic() + self._item_interval()
                        # Else held back: pacing, a character not yet complete, or
                        # text a parser keeps until it knows what it is.
        finally:
            job.remove_done_callback(stop_early)
            stop_early()

    async def embed(
        self, embed: Embed, record: JobRecord, cache_salt: str | None = None
    ) -> AsyncIterator[StreamItem]:
        """The vectors of an embeddings request, as items: every input is its
        own engine request, so the engine batches them with other jobs' as it
        likes; whenever vectors are done, an item holds them (paced as a
        stream's text is, and at most EMBEDDING_ITEM_CHARS of base64), and
        the last item has the usage."""
        plan = await self.planner.plan_embed(embed, cache_salt)
        record.prompt_tokens = sum(len(each["prompt_token_ids"]) for each in plan.engine_inputs)
        request_ids = [f"{record.job}-{index}" for index in range(len(plan.engine_inputs))]
        unfinished = set(request_ids)

        async def vector(index: int) -> Embedding:
            request_id = request_ids[index]
            encoding = self.engine.encode(plan.engine_inputs[index], plan.params, request_id)
            outputs = [output async for output in encoding]
            unfinished.discard(request_id)
            return Embedding.of(index, outputs[-1].outputs.data.tolist())

        def stop_early(_job: asyncio.Task | None = None) -> None:
            # As in generate: the job may end while this generator sits at a
            # yield, not to be closed before a garbage collection.
            for task in tasks:
                task.cancel()
            if unfinished:
                self._abort_soon(record.job, sorted(unfinished))
                unfinished.clear()

        job = asyncio.current_task()
        tasks = [asyncio.ensure_future(vector(index)) for index in range(len(request_ids))]
        job.add_done_callback(stop_early)
        pending: list[Embedding] = []
        next_item_due = 0.0
        try:
            with self._engine_failures(
                job, record.job, "the engine refused the request", "embedding failed"
            ):
                # `left`: how many vectors are still to come after this one.
                for left, done in zip(
                    range(len(tasks) - 1, -1, -1), asyncio.as_completed(tasks), strict=True
                ):
                    self._in_engine.add(job)
                    try:
                        pending.append(await done)
                    finally:
                        self._in_engine.discard(job)
                    if record.stopped_by_worker:
                        raise ProtocolError(ErrorCode.WORKER_STOPPED, STOPPED_REASON)
                    if left and time.monotonic() >= next_item_due:
                        for batch in _embedding_batches(pending):
                            yield StreamItem(embeddings=batch)
                        pending = []
                        next_item_due = time.monotonic() + self._item_interval()
                record.finish_reason = "stop"
                *batches, last = _embedding_batches(pending)
                for batch in batches:
                    yield StreamItem(embeddings=batch)
                usage = Usage(record.prompt_tokens, 0)
                yield StreamItem(embeddings=last, finish_reason="stop", usage=usage)
        finally:
            job.remove_done_callback(stop_early)
            stop_early()

    @contextlib.contextmanager
    def _engine_failures(
        self, job: asyncio.Task, request_id: str, refused: str, failed: str
    ) -> Iterator[None]:
        """What the engine raises while it serves a job, as the job's error:
        a cancel that the engine's death watch made, or any failure of a dead
        engine, is ENGINE_ERROR and the worker's replacement; a request the
        engine refused (VLLMValidationError: a schema or grammar the backend
        cannot compile...) is INVALID_INPUT `refused`, since vLLM's message
        may quote the request; anything else ENGINE_ERROR `failed`. Other
        cancels (RunPod's stop signal, the worker's stop) pass through."""
        try:
            yield
        except asyncio.CancelledError:
            if job not in self._failing:
                raise
            self._failing.discard(job)
            job.uncancel()
            raise self._engine_died(request_id, "stuck on the dead engine") from None
        except ProtocolError:
            raise
        except (VLLMClientError, ValueError) as error:
            log.info("engine refused request %s: %s", request_id, type(error).__name__)
            raise ProtocolError(ErrorCode.INVALID_INPUT, refused) from None
        except Exception as error:
            if self.engine.errored:
                raise self._engine_died(request_id, type(error).__name__) from None
            log.error("%s for %s: %s", failed, request_id, type(error).__name__)
            raise ProtocolError(ErrorCode.ENGINE_ERROR, failed) from None

    def stop_jobs(self) -> None:
        """Ends every job still running with WORKER_STOPPED at its next step
        (the worker's stop, once its grace is over)."""
        for record in self.jobs.values():
            record.stopped_by_worker = True

    def _start_watch(self) -> None:
        loop = asyncio.get_running_loop()
        if self._watch is None or self._watch.done() or self._watch.get_loop() is not loop:
            self._watch = loop.create_task(self._watch_engine())

    async def _watch_engine(self, every_s: float = 0.5) -> None:
        """A dying engine fails the requests it holds with EngineDeadError,
        but a job caught on its way in (adding its request as the engine
        died) would wait forever: cancel those, to fail them too."""
        while True:
            await asyncio.sleep(every_s)
            if self.engine.errored:
                for task in self._in_engine - self._failing:
                    self._failing.add(task)
                    task.cancel()

    def _engine_died(self, request_id: str, why: str) -> ProtocolError:
        log.error("the engine died (%s); failing job %s", why, request_id)
        if not self._death_reported:
            self._death_reported = True
            self.on_engine_death()
        reason = "the engine died; this worker is being replaced"
        return ProtocolError(ErrorCode.ENGINE_ERROR, reason)

    def _abort_soon(self, job: str, request_ids: str | list[str]) -> None:
        task = asyncio.ensure_future(self._abort(job, request_ids))
        self._aborting.add(task)  # a reference, until it is done
        task.add_done_callback(self._aborting.discard)

    async def _abort(self, job: str, request_ids: str | list[str]) -> None:
        if not self.engine.errored:
            await self.engine.abort(request_ids)
        log.info(
            "job %s stopped early: request aborted, %d unfinished in the engine",
            job,
            self.engine.get_num_unfinished_requests(),
        )


def _embedding_batches(embeddings: list[Embedding]) -> list[tuple[Embedding, ...]]:
    """Vectors in items of at most EMBEDDING_ITEM_CHARS (one vector at least)."""
    batches: list[list[Embedding]] = [[]]
    size = 0
    for embedding in embeddings:
        if batches[-1] and size + len(embedding.base64) > EMBEDDING_ITEM_CHARS:
            batches.append([])
            size = 0
        batches[-1].append(embedding)
        size += len(embedding.base64)
    return [tuple(batch) for batch in batches]


def _where(error: BaseException) -> str:
    """An exception's type and innermost frame, without its message."""
    frames = traceback.extract_tb(error.__traceback__)
    place = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    return f"{type(error).__name__}{place}"
