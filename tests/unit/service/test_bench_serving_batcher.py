"""The batcher's third rule, which the serving benchmark led to: a batch leaves at once when nothing else is
on its way (`upstream` says 0), and otherwise by the same full/deadline rules as without it: however slow the
batches, items still on their way never stretch the deadline. Dispatch times are measured (support.batching)."""

from __future__ import annotations

import asyncio
import time

from support.batching import SLACK_S, DispatchLog
from vlltr.service.batcher import MicroBatcher


def run(coro):
    return asyncio.run(coro)


def test_nothing_upstream_dispatches_at_once():
    async def main() -> DispatchLog:
        log = DispatchLog()
        # A 30 s deadline: only the "nothing upstream" rule can release a lone item this soon.
        b = MicroBatcher(log.process, max_batch_size=8, max_wait_s=30.0, queue_size=10, upstream=lambda: 0)
        b.start()
        await asyncio.wait_for(asyncio.gather(*log.submit_at(b.submit_many, [1])), timeout=10)
        await b.stop()
        return log

    log = run(main())
    assert log.batches == [[1]]
    assert log.waited(0) < SLACK_S


def test_items_on_their_way_are_waited_for_and_the_batch_leaves_with_the_last():
    # Three items arrive 50 ms apart while the others are still "being prepared"; the batch leaves when the
    # third arrives and nothing else is coming (about 100 ms), long before the 30 s deadline.
    async def main() -> DispatchLog:
        log = DispatchLog()
        preparing = {"n": 3}
        b = MicroBatcher(log.process, max_batch_size=8, max_wait_s=30.0, queue_size=10, upstream=lambda: preparing["n"])
        b.start()
        futures = []
        for i in range(3):
            preparing["n"] -= 1
            futures += log.submit_at(b.submit_many, [i])
            await asyncio.sleep(0.05)
        await asyncio.wait_for(asyncio.gather(*futures), timeout=10)
        await b.stop()
        return log

    log = run(main())
    assert log.batches == [[0, 1, 2]]
    last = log.submitted[2]
    assert last <= log.calls[0].at < last + SLACK_S


def test_recheck_releases_a_batch_whose_last_expected_item_never_comes():
    # Item 0 waits for one more item on its way; that one fails to prepare (it is never submitted) and the
    # caller says so with `recheck`: the batch leaves then, not at its 30 s deadline.
    async def main() -> tuple[DispatchLog, float]:
        log = DispatchLog()
        preparing = {"n": 1}
        b = MicroBatcher(log.process, max_batch_size=8, max_wait_s=30.0, queue_size=10, upstream=lambda: preparing["n"])
        b.start()
        futures = log.submit_at(b.submit_many, [0])
        await asyncio.sleep(0.2)
        preparing["n"] = 0
        told = time.monotonic()
        b.recheck()
        await asyncio.wait_for(asyncio.gather(*futures), timeout=10)
        await b.stop()
        return log, told

    log, told = run(main())
    assert log.batches == [[0]]
    assert told <= log.calls[0].at < told + SLACK_S


def test_slow_batches_do_not_stretch_the_deadline_while_items_are_on_their_way():
    # A 3 s batch runs first. Items then keep arriving with more always on their way, so only the 50 ms deadline
    # may release them: each batch must leave 50 ms after its oldest item. A deadline stretched to a tenth of
    # the recent batch time (as this batcher once did) would hold them 300 ms, past the bound.
    wait = 0.05

    async def main() -> DispatchLog:
        log = DispatchLog(hold={0: 3.0})
        b = MicroBatcher(log.process, max_batch_size=8, max_wait_s=wait, queue_size=10, upstream=lambda: 1)
        b.start()
        await asyncio.wait_for(asyncio.gather(*log.submit_at(b.submit_many, [0])), timeout=10)
        for i in (1, 2, 3):
            await asyncio.wait_for(asyncio.gather(*log.submit_at(b.submit_many, [i])), timeout=10)
        await b.stop()
        return log

    log = run(main())
    assert log.batches == [[0], [1], [2], [3]]
    for index in (1, 2, 3):
        assert wait <= log.waited(index) < wait + SLACK_S, (index, log.waited(index))
