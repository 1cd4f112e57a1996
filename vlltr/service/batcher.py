"""Dynamic micro-batching across concurrent requests.

Requests on the event loop `submit` payloads; each gets an asyncio future created on the loop. Inference
threads, one per **lane** (`lanes`, default 1), form batches from the one queue and run them. With several
lanes on CPU the service gives each its share of the cores: ONNX Runtime runs concurrent `Run()` calls of one
session side by side, and a small model's batch split over every core waits at each parallel section for
its slowest thread, while a batch per share keeps each core busy:

- a batch leaves as soon as one of three rules holds, and never otherwise:
  1. `max_batch_size` items wait (it is full);
  2. the OLDEST waiting item has waited `max_wait_s` (the deadline is anchored on its arrival, never moved
     by later arrivals or by how long batches take; nothing sleep-polls);
  3. the caller says how many items are still on their way (`upstream`, e.g. images being decoded) and
     none is: waiting longer could not make the batch any larger, only the answers later. It is checked
     whenever an item arrives and whenever the caller reports a change (`recheck`).
  Each lane runs one batch at a time. While every lane is busy, items that arrive wait, and the next
  batch leaves the moment a lane is free if a rule already holds (its oldest item may then have waited
  longer than `max_wait_s`, by at most a running batch's time);
- items whose future is already done (the client went away) are skipped;
- if the batch function raises, the batch is retried item by item, so a bad item fails alone;
- results go back to the loop with ONE `call_soon_threadsafe` per batch;
- the waiting queue is bounded (`QueueFullError` past it, answered 503 + Retry-After);
- a lane never dies from an exception in a batch; `ensure_running` restarts one if it ever does, and
  `alive()` (every lane's heartbeat) feeds readiness.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from vlltr.errors import InferenceFailedError, NotReadyError, QueueFullError
from vlltr.service.metrics import Metrics

log = logging.getLogger(__name__)

P = TypeVar("P")
R = TypeVar("R")

HEARTBEAT_S = 0.5  # the thread wakes at least this often while idle, so its heartbeat stays fresh
STALL_S = 120.0  # a batch running longer than this marks the batcher not alive (readiness fails)


@dataclass(slots=True)
class _Lane:
    """One inference thread and what readiness reads of it."""

    index: int
    thread: threading.Thread | None = None
    heartbeat: float = 0.0
    busy_since: float | None = None  # when its running batch began; None while it waits


@dataclass(slots=True)
class _Item(Generic[P, R]):
    payload: P
    future: asyncio.Future[R]
    arrival: float = field(default_factory=time.monotonic)


class MicroBatcher(Generic[P, R]):
    """Collects payloads from the event loop into batches for `process`, run on a dedicated thread.

    Args:
        process: maps a list of payloads to one result per payload, in order. A result may be an exception
            instance, which fails only that item. Runs on the inference thread.
        max_batch_size: most payloads per call of `process`.
        max_wait_s: deadline of a batch, counted from the arrival of its oldest payload.
        queue_size: most payloads waiting (not yet in a batch).
        metrics: optional; queue depth/capacity/wait, batch size and per-batch duration are recorded.
        name: thread name (lanes after the first get `-1`, `-2`, ...).
        lanes: inference threads, each running one batch at a time (a thread-safe `process` is needed
            for more than one).
        upstream: optional; the number of payloads that will be submitted soon (admitted and being
            prepared). When it is 0 a waiting batch leaves at once instead of waiting for its deadline.
            Called from both threads, so it must be cheap and thread-safe (reading an int is). When it
            drops to 0 without a submit (an item failed to prepare), call `recheck`.
    """

    def __init__(
        self,
        process: Callable[[list[P]], Sequence[R | BaseException]],
        *,
        max_batch_size: int,
        max_wait_s: float,
        queue_size: int,
        metrics: Metrics | None = None,
        name: str = "vlltr-inference",
        upstream: Callable[[], int] | None = None,
        lanes: int = 1,
    ) -> None:
        if max_batch_size < 1 or queue_size < 1 or max_wait_s < 0 or lanes < 1:
            raise ValueError("max_batch_size, queue_size and lanes must be >= 1 and max_wait_s >= 0")
        self._process = process
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.queue_size = queue_size
        self._metrics = metrics
        self._name = name
        self._upstream = upstream
        self._items: deque[_Item[P, R]] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lanes = [_Lane(i) for i in range(lanes)]
        self._stopping = False
        self.restarts = 0
        if metrics is not None:
            metrics.queue_capacity.set(queue_size)
            metrics.queue_depth.set(0)

    # ---- lifecycle (event loop side) ----------------------------------------------------------

    @property
    def lanes(self) -> int:
        """Inference threads."""
        return len(self._lanes)

    def start(self) -> None:
        """Start the inference threads; call from the event loop that will await the results."""
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        for lane in self._lanes:
            self._spawn(lane)

    def _spawn(self, lane: _Lane) -> None:
        lane.heartbeat = time.monotonic()
        lane.busy_since = None
        name = self._name if lane.index == 0 else f"{self._name}-{lane.index}"
        lane.thread = threading.Thread(target=self._run, args=(lane,), name=name, daemon=True)
        lane.thread.start()

    def ensure_running(self) -> bool:
        """Restart every inference thread that died; returns True when a restart happened."""
        if self._stopping or self._loop is None:
            return False
        dead = [lane for lane in self._lanes if lane.thread is None or not lane.thread.is_alive()]
        for lane in dead:
            log.error("the inference thread of lane %d had stopped; restarting it", lane.index)
            self.restarts += 1
            self._spawn(lane)
        return bool(dead)

    def alive(self) -> bool:
        """True while every lane's thread runs and none is stuck (heartbeat fresh, no batch running for ages)."""
        if self._stopping:
            return False
        now = time.monotonic()
        for lane in self._lanes:
            if lane.thread is None or not lane.thread.is_alive():
                return False
            since = lane.busy_since if lane.busy_since is not None else lane.heartbeat
            if now - since >= STALL_S:
                return False
        return True

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop the threads after their current batches; waiting payloads fail with `NotReadyError`."""
        with self._cond:
            self._stopping = True
            left = list(self._items)
            self._items.clear()
            self._cond.notify_all()
        for item in left:
            if not item.future.done():
                item.future.set_exception(NotReadyError("the service is shutting down"))
        deadline = time.monotonic() + timeout
        for lane in self._lanes:
            if lane.thread is not None:
                await asyncio.to_thread(lane.thread.join, max(0.0, deadline - time.monotonic()))
        self._set_depth(0)

    # ---- submitting (event loop side) -------------------------------------------------------

    @property
    def depth(self) -> int:
        """Payloads waiting for a batch."""
        return len(self._items)

    def submit_many(self, payloads: Sequence[P]) -> list[asyncio.Future[R]]:
        """Queue several payloads at once (all or none); returns their futures in order.

        Raises:
            QueueFullError: fewer than `len(payloads)` free places in the queue.
            NotReadyError: the batcher is not running.
        """
        loop = self._loop
        if loop is None or self._stopping:
            raise NotReadyError("the inference loop is not running")
        now = time.monotonic()
        items: list[_Item[P, R]] = [_Item(p, loop.create_future(), now) for p in payloads]
        with self._cond:
            waiting = len(self._items)
            if waiting + len(items) > self.queue_size:
                raise QueueFullError(f"the inference queue is full ({waiting} of {self.queue_size} places taken)")
            self._items.extend(items)
            depth = len(self._items)
            # A waiting lane only needs waking when the deadline it sleeps towards changes (first item), when a
            # batch is full, or when nothing more is on its way; other arrivals would only make it recompute
            # the same deadline.
            if waiting == 0 or depth >= self.max_batch_size or self._nothing_upstream():
                self._cond.notify()
        self._set_depth(depth)
        return [item.future for item in items]

    async def submit(self, payload: P) -> R:
        """Queue one payload and wait for its result (its exception is raised here)."""
        return await self.submit_many([payload])[0]

    def recheck(self) -> None:
        """Wake a waiting lane if items wait and nothing is upstream any more (rule 3 may now hold)."""
        with self._cond:
            if self._items and self._nothing_upstream():
                self._cond.notify()

    def _nothing_upstream(self) -> bool:
        if self._upstream is None:
            return False
        try:
            return self._upstream() <= 0
        except Exception:  # a broken callback must not stall batching: fall back to the deadline
            return False

    # ---- the inference thread -------------------------------------------------------------

    def _run(self, lane: _Lane) -> None:
        while not self._stopping:
            lane.heartbeat = time.monotonic()
            try:
                batch = self._next_batch(lane)
                if batch:
                    self._execute(batch, lane)
            except Exception:  # never let the loop die; the batch's futures were resolved in _execute
                log.exception("error in the batching loop; continuing")

    def _next_batch(self, lane: _Lane) -> list[_Item[P, R]]:
        with self._cond:
            while not self._stopping:
                lane.heartbeat = time.monotonic()
                if not self._items:
                    self._cond.wait(HEARTBEAT_S)
                    continue
                if len(self._items) >= self.max_batch_size or self._nothing_upstream():
                    break
                wait = self._items[0].arrival + self.max_wait_s - time.monotonic()
                if wait <= 0:
                    break
                self._cond.wait(min(wait, HEARTBEAT_S))
            if self._stopping:
                return []
            batch: list[_Item[P, R]] = []
            while self._items and len(batch) < self.max_batch_size:
                item = self._items.popleft()
                if not item.future.done():  # cancelled while waiting: skip it
                    batch.append(item)
            depth = len(self._items)
            if depth:  # another waiting lane sleeps towards a deadline computed before: let it look again
                self._cond.notify()
        self._set_depth(depth)
        return batch

    def _execute(self, batch: list[_Item[P, R]], lane: _Lane) -> None:
        started = time.monotonic()
        lane.busy_since = started
        results: list[R | BaseException] | None = None
        try:
            if self._metrics is not None:
                for item in batch:
                    self._metrics.queue_wait.observe(started - item.arrival)
                self._metrics.batch_size.observe(len(batch))
            results = self._run_batch([item.payload for item in batch])
            if self._metrics is not None:
                self._metrics.inference_duration.observe(time.monotonic() - started)
        finally:
            lane.busy_since = None
            if results is None:  # only on a BaseException escaping _run_batch: fail the batch, not hang it
                results = [InferenceFailedError("inference was interrupted")] * len(batch)
            self._deliver(batch, results)

    def _run_batch(self, payloads: list[P]) -> list[R | BaseException]:
        try:
            results = list(self._process(payloads))
            if len(results) != len(payloads):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(payloads)} items")
            return results
        except Exception as exc:
            if len(payloads) == 1:
                log.warning("inference failed for one item: %s: %s", type(exc).__name__, exc)
                return [exc]
            log.warning("a batch of %d failed (%s: %s); retrying item by item", len(payloads), type(exc).__name__, exc)
            out: list[R | BaseException] = []
            for payload in payloads:
                out.extend(self._run_batch([payload]))
            return out

    def _deliver(self, batch: list[_Item[P, R]], results: Sequence[R | BaseException]) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(_resolve, batch, results)
        except RuntimeError:  # the loop closed between the check and the call (shutdown)
            pass

    def _set_depth(self, depth: int) -> None:
        if self._metrics is not None:
            self._metrics.queue_depth.set(depth)


def _resolve(batch: Sequence[_Item[P, R]], results: Sequence[R | BaseException]) -> None:
    for item, result in zip(batch, results):
        future = item.future
        if future.done():
            continue
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)
