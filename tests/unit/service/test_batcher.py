"""The micro-batcher: when batches leave (measured against the rule in vlltr/service/batcher.py), ordering,
per-item failures, cancellation, supervision."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from support.batching import SLACK_S, DispatchLog
from vlltr.errors import NotReadyError, QueueFullError
from vlltr.service.batcher import MicroBatcher
from vlltr.service.metrics import Metrics


class Recorder:
    """A batch function that records the batches it saw and can be told to fail."""

    def __init__(self, fail_on: set[int] | None = None, delay: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.fail_on = fail_on or set()
        self.delay = delay
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, items: list[int]) -> list[int]:
        self.gate.wait(10)
        self.batches.append(list(items))
        if self.delay:
            time.sleep(self.delay)
        if any(i in self.fail_on for i in items):
            raise ValueError(f"bad item among {items}")
        return [i * 10 for i in items]


def run(coro):
    return asyncio.run(coro)


def test_results_come_back_in_order_and_batched():
    async def main():
        rec = Recorder()
        b = MicroBatcher(rec, max_batch_size=8, max_wait_s=0.05, queue_size=100)
        b.start()
        results = await asyncio.gather(*(b.submit(i) for i in range(20)))
        await b.stop()
        return rec, results

    rec, results = run(main())
    assert results == [i * 10 for i in range(20)]
    assert max(len(batch) for batch in rec.batches) == 8
    assert [i for batch in rec.batches for i in batch] == list(range(20))  # FIFO across batches


def test_a_full_batch_leaves_at_once():
    async def main() -> DispatchLog:
        log = DispatchLog()
        # A 30 s deadline and items always "on their way": only the "full" rule can release these.
        b = MicroBatcher(log.process, max_batch_size=4, max_wait_s=30.0, queue_size=100, upstream=lambda: 5)
        b.start()
        futures = log.submit_at(b.submit_many, [0, 1, 2, 3])
        await asyncio.wait_for(asyncio.gather(*futures), timeout=10)
        await b.stop()
        return log

    log = run(main())
    assert log.batches == [[0, 1, 2, 3]]
    assert log.waited(0) < SLACK_S


def test_a_partial_batch_leaves_when_its_oldest_item_has_waited_max_wait():
    # Items at 0, 300 and 600 ms with a 500 ms deadline and more always on their way (so only the deadline
    # can release them). Anchored on the oldest item, [0, 1] leaves at 500 ms and [2] at 1,100 ms. A deadline
    # anchored on the newest item would send [0, 1, 2] at 1,100 ms (each arrival pushing it back); one that
    # left as soon as anything waited would send three batches at once.
    wait = 0.5

    async def main() -> DispatchLog:
        log = DispatchLog()
        b = MicroBatcher(log.process, max_batch_size=64, max_wait_s=wait, queue_size=100, upstream=lambda: 1)
        b.start()
        futures = log.submit_at(b.submit_many, [0])
        await asyncio.sleep(0.3)
        futures += log.submit_at(b.submit_many, [1])
        await asyncio.sleep(0.3)
        futures += log.submit_at(b.submit_many, [2])
        await asyncio.wait_for(asyncio.gather(*futures), timeout=10)
        await b.stop()
        return log

    log = run(main())
    assert log.batches == [[0, 1], [2]]
    for index in range(2):
        assert wait <= log.waited(index) < wait + SLACK_S, (index, log.waited(index))


def _slow_batch_then_one_more_item(hold_s: float, lanes: int) -> DispatchLog:
    """Item 0's batch runs `hold_s`; item 1 arrives 100 ms after it, with a 50 ms deadline."""

    async def main() -> DispatchLog:
        log = DispatchLog(hold={0: hold_s})
        b = MicroBatcher(log.process, max_batch_size=8, max_wait_s=0.05, queue_size=100, lanes=lanes)
        b.start()
        first = log.submit_at(b.submit_many, [0])
        await asyncio.sleep(0.1)
        second = log.submit_at(b.submit_many, [1])
        await asyncio.wait_for(asyncio.gather(*first, *second), timeout=10)
        await b.stop()
        return log

    return run(main())


def test_a_busy_thread_sends_the_next_batch_the_moment_it_is_free():
    # Item 1 reaches its deadline (150 ms) while item 0's batch still runs (400 ms): it leaves as soon as that
    # batch is done, not a deadline later.
    log = _slow_batch_then_one_more_item(0.4, lanes=1)
    free_at = log.calls[0].at + 0.4
    assert log.batches == [[0], [1]]
    assert free_at <= log.calls[1].at < free_at + SLACK_S


def test_without_upstream_a_lone_item_waits_for_its_deadline():
    # With nobody saying what is on its way, a lone item waits its full deadline (it cannot leave early).
    wait = 0.3

    async def main() -> DispatchLog:
        log = DispatchLog()
        b = MicroBatcher(log.process, max_batch_size=8, max_wait_s=wait, queue_size=10)
        b.start()
        await asyncio.wait_for(asyncio.gather(*log.submit_at(b.submit_many, [7])), timeout=10)
        await b.stop()
        return log

    log = run(main())
    assert log.batches == [[7]]
    assert wait <= log.waited(0) < wait + SLACK_S


def test_a_failing_item_fails_alone():
    async def main():
        rec = Recorder(fail_on={3})
        b = MicroBatcher(rec, max_batch_size=8, max_wait_s=0.05, queue_size=100)
        b.start()
        results = await asyncio.gather(*(b.submit(i) for i in range(6)), return_exceptions=True)
        await b.stop()
        return rec, results

    rec, results = run(main())
    assert isinstance(results[3], ValueError)
    assert [r for i, r in enumerate(results) if i != 3] == [0, 10, 20, 40, 50]
    assert rec.batches[0] == [0, 1, 2, 3, 4, 5]  # tried as a batch first, then item by item
    assert [3] in rec.batches[1:]


def test_result_exceptions_fail_only_their_item():
    def process(items):
        return [ValueError("no") if i == 1 else i for i in items]

    async def main():
        b = MicroBatcher(process, max_batch_size=4, max_wait_s=0.02, queue_size=10)
        b.start()
        out = await asyncio.gather(*(b.submit(i) for i in range(3)), return_exceptions=True)
        await b.stop()
        return out

    out = run(main())
    assert out[0] == 0 and out[2] == 2 and isinstance(out[1], ValueError)


def test_cancelled_requests_are_skipped():
    async def main():
        rec = Recorder()
        rec.gate.clear()  # hold the inference thread inside the first batch
        b = MicroBatcher(rec, max_batch_size=2, max_wait_s=0.01, queue_size=100)
        b.start()
        first = asyncio.ensure_future(b.submit(0))
        await asyncio.sleep(0.1)  # the thread is now blocked running [0]
        doomed = [asyncio.ensure_future(b.submit(i)) for i in (1, 2)]
        kept = asyncio.ensure_future(b.submit(3))
        await asyncio.sleep(0.05)
        for f in doomed:
            f.cancel()
        rec.gate.set()
        results = await asyncio.gather(first, kept)
        await b.stop()
        return rec, results

    rec, results = run(main())
    assert results == [0, 30]
    assert [0] in rec.batches and all(1 not in batch and 2 not in batch for batch in rec.batches)


def test_loop_survives_a_batch_function_that_always_raises():
    calls = {"n": 0}

    def process(items):
        calls["n"] += 1
        if calls["n"] <= 3:
            raise RuntimeError("broken")
        return items

    async def main():
        b = MicroBatcher(process, max_batch_size=2, max_wait_s=0.01, queue_size=10)
        b.start()
        failed = await asyncio.gather(b.submit(1), b.submit(2), return_exceptions=True)
        ok = await b.submit(7)
        alive = b.alive()
        await b.stop()
        return failed, ok, alive

    failed, ok, alive = run(main())
    assert all(isinstance(f, RuntimeError) for f in failed)
    assert ok == 7 and alive


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_dead_thread_is_restarted_and_its_batch_fails_instead_of_hanging():
    class Die(BaseException):
        pass

    calls = {"n": 0}

    def process(items):
        calls["n"] += 1
        if calls["n"] == 1:
            raise Die()  # escapes every `except Exception`: the thread dies
        return items

    async def main():
        b = MicroBatcher(process, max_batch_size=1, max_wait_s=0.0, queue_size=10)
        b.start()
        first = await asyncio.gather(b.submit(1), return_exceptions=True)
        await asyncio.sleep(0.1)
        assert not b.alive()
        assert b.ensure_running()
        second = await asyncio.wait_for(b.submit(2), timeout=10)
        await b.stop()
        return first, second, b.restarts

    first, second, restarts = run(main())
    assert isinstance(first[0], RuntimeError)
    assert second == 2 and restarts == 1


def test_bounded_queue_refuses_when_full_and_counts_depth():
    async def main():
        rec = Recorder()
        rec.gate.clear()
        metrics = Metrics()
        b = MicroBatcher(rec, max_batch_size=1, max_wait_s=0.0, queue_size=3, metrics=metrics)
        b.start()
        running = asyncio.ensure_future(b.submit(0))
        await asyncio.sleep(0.1)  # [0] is inside the batch function; the queue is empty again
        waiting = b.submit_many([1, 2, 3])
        with pytest.raises(QueueFullError):
            b.submit_many([4])
        depth = metrics.registry.get_sample_value("vlltr_queue_depth")
        capacity = metrics.registry.get_sample_value("vlltr_queue_capacity")
        rec.gate.set()
        results = await asyncio.gather(running, *waiting)
        await b.stop()
        return results, depth, capacity

    results, depth, capacity = run(main())
    assert results == [0, 10, 20, 30]
    assert depth == 3 and capacity == 3


def test_submit_many_is_all_or_nothing():
    async def main():
        rec = Recorder()
        rec.gate.clear()
        b = MicroBatcher(rec, max_batch_size=1, max_wait_s=0.0, queue_size=2)
        b.start()
        running = asyncio.ensure_future(b.submit(0))
        await asyncio.sleep(0.1)
        with pytest.raises(QueueFullError):
            b.submit_many([1, 2, 3])
        depth = b.depth
        rec.gate.set()
        await running
        await b.stop()
        return depth

    assert run(main()) == 0


def test_stop_fails_waiting_items_and_refuses_new_ones():
    async def main():
        rec = Recorder()
        rec.gate.clear()
        b = MicroBatcher(rec, max_batch_size=1, max_wait_s=0.0, queue_size=10)
        b.start()
        running = asyncio.ensure_future(b.submit(0))
        await asyncio.sleep(0.1)
        waiting = asyncio.ensure_future(b.submit(1))
        await asyncio.sleep(0)
        stopping = asyncio.ensure_future(b.stop(timeout=5))
        await asyncio.sleep(0.05)
        rec.gate.set()
        await stopping
        with pytest.raises(NotReadyError):
            b.submit_many([2])
        return await asyncio.gather(running, waiting, return_exceptions=True)

    running, waiting = run(main())
    assert running == 0
    assert isinstance(waiting, NotReadyError)


def test_metrics_record_batch_sizes_and_waits():
    async def main():
        metrics = Metrics()
        b = MicroBatcher(lambda items: items, max_batch_size=4, max_wait_s=0.01, queue_size=10, metrics=metrics)
        b.start()
        await asyncio.gather(*(b.submit(i) for i in range(4)))
        await b.stop()
        return metrics

    m = run(main()).registry
    assert m.get_sample_value("vlltr_batch_size_sum") == 4
    assert m.get_sample_value("vlltr_queue_wait_seconds_count") == 4
    assert m.get_sample_value("vlltr_inference_duration_seconds_count") == 1


# ---- lanes: several batches at once ------------------------------------------------------------------------


def test_a_second_lane_sends_a_batch_while_the_first_still_runs():
    # Item 0's batch runs 600 ms; item 1 arrives at 100 ms with a 50 ms deadline. With two lanes it leaves at
    # its deadline (150 ms), beside the running batch; one lane would hold it until 600 ms.
    log = _slow_batch_then_one_more_item(0.6, lanes=2)
    assert log.batches == [[0], [1]]
    assert 0.05 <= log.waited(1) < 0.05 + SLACK_S, log.waited(1)
    assert log.calls[1].at < log.calls[0].at + 0.6 - SLACK_S  # began while the first batch still ran


def test_what_a_full_batch_leaves_behind_goes_on_another_lanes_deadline(monkeypatch):
    # Three items at once, batches of two, more always on the way (only "full" and the deadline release them):
    # one lane takes [0, 1] and holds it 1 s; item 2 must leave at its own deadline (200 ms) on the other lane.
    # A lane asleep towards the next heartbeat (made 5 s here) instead of the new deadline would send it when
    # the first batch ends, at 1 s.
    monkeypatch.setattr("vlltr.service.batcher.HEARTBEAT_S", 5.0)
    wait = 0.2

    async def main() -> DispatchLog:
        log = DispatchLog(hold={0: 1.0})
        b = MicroBatcher(log.process, max_batch_size=2, max_wait_s=wait, queue_size=100, upstream=lambda: 1, lanes=2)
        b.start()
        await asyncio.sleep(0.05)  # both lanes asleep on the empty queue
        futures = log.submit_at(b.submit_many, [0, 1, 2])
        await asyncio.wait_for(asyncio.gather(*futures), timeout=10)
        await b.stop()
        return log

    log = run(main())
    assert log.batches == [[0, 1], [2]]
    assert log.waited(0) < SLACK_S
    assert wait <= log.waited(1) < wait + SLACK_S, log.waited(1)


def test_every_lane_must_live_for_the_batcher_to_be_alive_and_only_dead_ones_restart():
    async def main() -> tuple[bool, bool, int, list[int]]:
        b = MicroBatcher(
            lambda items: [i * 3 for i in items], max_batch_size=4, max_wait_s=0.001, queue_size=16, lanes=3
        )
        b.start()
        healthy = b.alive()
        threads = [lane.thread for lane in b._lanes]
        victim = b._lanes[1]
        victim.thread = threading.Thread(target=lambda: None)  # a lane whose thread has ended
        victim.thread.start()
        victim.thread.join()
        after_death = b.alive()
        restarted = b.ensure_running()
        kept = [i for i, lane in enumerate(b._lanes) if lane.thread is threads[i]]
        results = await asyncio.wait_for(asyncio.gather(*(b.submit(i) for i in range(10))), timeout=10)
        assert results == [i * 3 for i in range(10)]
        alive = b.alive()
        await b.stop()
        return healthy and alive, after_death, b.restarts if restarted else -1, kept

    alive, after_death, restarts, kept = run(main())
    assert alive and not after_death
    assert restarts == 1 and kept == [0, 2]
