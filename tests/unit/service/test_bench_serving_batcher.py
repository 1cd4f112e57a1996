"""The batcher's dispatch rules that the serving benchmark led to: leave at once when nothing else is on
its way, and, while images are still being prepared, wait for them longer when batches are slow."""

from __future__ import annotations

import asyncio
import time

from vlltr.service.batcher import MicroBatcher


def test_nothing_upstream_dispatches_before_the_deadline():
    async def main() -> list[int]:
        b = MicroBatcher(
            lambda xs: [x + 1 for x in xs], max_batch_size=8, max_wait_s=30.0, queue_size=10, upstream=lambda: 0
        )
        b.start()
        # A 30 s deadline: only the "nothing upstream" rule can release a lone item within the timeout.
        out = await asyncio.wait_for(asyncio.gather(b.submit(1)), timeout=10)
        await b.stop()
        return out

    assert asyncio.run(main()) == [2]


def test_items_on_their_way_are_waited_for_and_batched_together():
    async def main() -> list[list[int]]:
        batches: list[list[int]] = []
        preparing = {"n": 3}

        def process(xs: list[int]) -> list[int]:
            batches.append(list(xs))
            return xs

        b = MicroBatcher(process, max_batch_size=8, max_wait_s=30.0, queue_size=10, upstream=lambda: preparing["n"])
        b.start()
        futures = []
        for i in range(3):  # three items arrive one by one while the rest are still "being prepared"
            preparing["n"] -= 1
            futures += b.submit_many([i])
            await asyncio.sleep(0.05)
        await asyncio.wait_for(asyncio.gather(*futures), timeout=10)
        await b.stop()
        return batches

    assert asyncio.run(main()) == [[0, 1, 2]]


def test_slow_batches_stretch_the_wait_while_items_are_being_prepared():
    async def main() -> list[list[int]]:
        batches: list[list[int]] = []

        def process(xs: list[int]) -> list[int]:
            batches.append(list(xs))
            time.sleep(2.0)  # a slow encoder: a tenth of it (200 ms) is worth waiting for stragglers
            return xs

        preparing = {"n": 1}
        b = MicroBatcher(process, max_batch_size=8, max_wait_s=0.001, queue_size=10, upstream=lambda: preparing["n"])
        b.start()
        await b.submit(0)  # one batch runs, so the batcher knows batches take about 2 s
        first = b.submit_many([1])
        await asyncio.sleep(0.02)  # longer than max_wait_s, shorter than a tenth of the batch time
        preparing["n"] = 0
        second = b.submit_many([2])
        await asyncio.wait_for(asyncio.gather(*first, *second), timeout=10)
        await b.stop()
        return batches

    assert asyncio.run(main()) == [[0], [1, 2]]


def test_without_upstream_the_deadline_is_max_wait() -> None:
    async def main() -> list[list[int]]:
        batches: list[list[int]] = []

        def process(xs: list[int]) -> list[int]:
            batches.append(list(xs))
            time.sleep(0.3)
            return xs

        b = MicroBatcher(process, max_batch_size=8, max_wait_s=0.001, queue_size=10)
        b.start()
        await b.submit(0)
        first = b.submit_many([1])
        await asyncio.sleep(0.25)  # far past max_wait_s: item 1 has left alone
        second = b.submit_many([2])
        await asyncio.wait_for(asyncio.gather(*first, *second), timeout=10)
        await b.stop()
        return batches

    assert asyncio.run(main()) == [[0], [1], [2]]
