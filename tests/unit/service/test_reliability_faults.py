"""Faults inside the service's lifespan, in-process: a release that hangs cannot hold shutdown past its bound,
and the class sync stops even when a store call absorbs the cancellation. tests/e2e/test_reliability_faults.py
injects faults into a real deployment."""

from __future__ import annotations

import time


def test_a_hanging_release_cannot_hold_shutdown_past_its_bound(tmp_path, caplog, reliability_log):
    # The one thing a real process cannot be made to do on demand is hang while releasing; a runtime whose stop
    # never returns stands in for it, and the app's lifespan must still finish within its bound.
    import asyncio

    from vlltr.service.app import STOP_TIMEOUT_S, create_app
    from vlltr.service.metrics import Metrics
    from vlltr.service.settings import Settings

    class HangingRuntime:
        metrics = Metrics()

        async def before_serving(self) -> None:
            return None

        async def start(self) -> None:
            return None

        async def stop(self) -> None:
            await asyncio.Event().wait()

    app = create_app(Settings(cache_dir=tmp_path), core=HangingRuntime())  # type: ignore[arg-type]

    async def run() -> float:
        async with app.router.lifespan_context(app):
            await asyncio.sleep(0.05)
            started = time.monotonic()
        return time.monotonic() - started

    with caplog.at_level("ERROR", logger="vlltr.service.app"):
        took = asyncio.run(run())
    reliability_log.add("faults", faults=1)
    assert took < STOP_TIMEOUT_S + 2.0
    assert any(
        "releasing resources took over" in r.getMessage() and "HangingRuntime.stop" in r.getMessage()
        for r in caplog.records
    ), [r.getMessage()[:300] for r in caplog.records]


def test_class_sync_stops_even_when_a_store_call_absorbs_the_cancellation(bundle_v1, tmp_path, reliability_log):
    # Seen under load: shutdown waited forever on the class-table poll, cancelled once while inside a Redis
    # call that absorbed the cancellation and went on polling. A store whose state() absorbs a cancellation
    # the same way (around the real file store) must not keep close() from ending.
    import asyncio

    from vlltr.model.runtime.bundle import load_bundle
    from vlltr.service.core import trained_classes
    from vlltr.service.registry import ClassRegistry
    from vlltr.service.store_file import FileClassStore

    class AbsorbingStore(FileClassStore):
        absorbed = 0
        inside: asyncio.Event | None = None

        async def state(self):
            if self.inside is None:  # the start-up load: not the poll this test is about
                return await super().state()
            self.inside.set()
            try:
                await asyncio.sleep(0.05)  # the library call the cancellation lands in
            except asyncio.CancelledError:
                if type(self).absorbed:  # absorbed once, as a client library can do; later ones go through
                    raise
                type(self).absorbed += 1
            return await super().state()

    bundle = load_bundle(bundle_v1)
    store = AbsorbingStore(tmp_path / "classes.jsonl")
    registry = ClassRegistry(
        trained_classes(bundle), lambda texts: None, store, bundle_id=bundle.bundle_id, sync_interval_s=0.001
    )

    async def main() -> None:
        await registry.start()
        store.inside = asyncio.Event()
        await asyncio.wait_for(store.inside.wait(), 10)
        started = time.monotonic()
        await asyncio.wait_for(registry.close(), 10)
        assert time.monotonic() - started < 5.0
        # Nothing of the registry is left running (the poll, the store watch, a refresh).
        left = [t.get_name() for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert left == [], left

    asyncio.run(main())
    reliability_log.add("faults", faults=1)
    assert AbsorbingStore.absorbed >= 1
