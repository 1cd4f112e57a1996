"""The class stores under real concurrency: processes racing on the file store, and two registries racing and
synchronising through real Redis."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import uuid

import numpy as np
import pytest

from vlltr.errors import ClassConflictError
from vlltr.model.runtime.bundle import load_bundle
from vlltr.model.runtime.sessions import TextEncoder
from vlltr.service.core import trained_classes
from vlltr.service.redis_link import RedisLink
from vlltr.service.registry import ClassRegistry
from vlltr.service.store import AddedClass, FileClassStore, RedisClassStore


@pytest.fixture(scope="module")
def bundle(service_bundle):
    return load_bundle(service_bundle)


@pytest.fixture(scope="module")
def encoder(bundle):
    return TextEncoder(bundle.text_encoder_path, bundle.tokenizer(), "cpu")


@pytest.fixture(scope="module")
def trained(bundle):
    return trained_classes(bundle)


def _registry(trained, encoder, store, **kw):
    return ClassRegistry(trained, encoder.encode_texts, store, sync_interval_s=0.1, **kw)


# ---- processes on the local file store --------------------------------------------------------


def _race_add(path: str, bundle_id: str, barrier, results) -> None:
    store = FileClassStore(path, bundle_id=bundle_id)
    record = AddedClass("Same", ("d",), ("d",), np.ones((1, 4), np.float32), np.ones(4, np.float32))
    barrier.wait()
    try:
        results.put(asyncio.run(store.add(record)))
    except ClassConflictError:
        results.put("exists")


def test_processes_racing_on_the_file_store_have_one_winner(tmp_path):
    ctx = multiprocessing.get_context("fork")  # the child only touches the store file
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_race_add, args=(str(tmp_path / "c.json"), "b", barrier, results)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    outcomes = sorted((results.get(timeout=5) for _ in procs), key=str)
    assert outcomes == [1, "exists", "exists", "exists"]
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["bundles"]["b"]["version"] == 1 and list(data["bundles"]["b"]["classes"]) == ["same"]


# ---- Redis store -----------------------------------------------------------------------------


def test_redis_replicas_race_and_sync(shared_redis_url, trained, encoder, bundle):
    prefix = f"vlltr-test-{uuid.uuid4().hex[:12]}"

    async def main():
        links = [RedisLink(shared_redis_url, timeout_s=1.0, retry_s=0.2) for _ in range(2)]
        regs = [
            _registry(trained, encoder, RedisClassStore(link, prefix=prefix, bundle_id=bundle.bundle_id))
            for link in links
        ]
        for reg in regs:
            await reg.start()
        try:
            results = await asyncio.gather(
                *(reg.add_class("Raced", ["a raced class"]) for reg in regs * 3), return_exceptions=True
            )
            winners = [r for r in results if not isinstance(r, BaseException)]
            assert len(winners) == 1 and all(isinstance(r, ClassConflictError) for r in results if r not in winners)
            for _ in range(100):  # pub/sub (or the poll) brings the loser up to date
                if all(reg.current.version == 1 for reg in regs):
                    break
                await asyncio.sleep(0.02)
            assert [reg.current.version for reg in regs] == [1, 1]
            assert all(reg.current.table.names[-1] == "Raced" for reg in regs)
            _, version = await regs[1].remove_class("raced")
            assert version == 2
        finally:
            for reg in regs:
                await reg.close()
            for link in links:
                await link.close()

    try:
        asyncio.run(main())
    finally:
        _delete_prefix(shared_redis_url, prefix)


def _delete_prefix(url: str, prefix: str) -> None:
    """Remove this test's keys from the shared Redis (never a flush)."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()
