"""The class stores under real concurrency: processes racing on the file store, and two registries racing and
synchronising through real Redis."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import uuid

import pytest

from vlltr.errors import ClassConflictError
from vlltr.model.runtime.bundle import load_bundle
from vlltr.model.runtime.sessions import TextEncoder
from vlltr.service.core import trained_classes
from vlltr.service.redis_link import RedisLink
from vlltr.service.registry import ClassRegistry
from vlltr.service.store import ClassRecord, NewClass
from vlltr.service.store_file import FileClassStore
from vlltr.service.store_redis import RedisClassStore


@pytest.fixture(scope="module")
def bundle(service_bundle):
    return load_bundle(service_bundle)


@pytest.fixture(scope="module")
def encoder(bundle):
    return TextEncoder(bundle.text_encoder_path, bundle.tokenizer(), "cpu")


@pytest.fixture(scope="module")
def trained(bundle):
    return trained_classes(bundle)


def _registry(trained, encoder, store, bundle_id, **kw):
    return ClassRegistry(trained, encoder.encode_texts, store, bundle_id=bundle_id, sync_interval_s=0.1, **kw)


# ---- processes on the local file store --------------------------------------------------------


def _race_add(path: str, descriptions: tuple[str, ...], barrier, results) -> None:
    store = FileClassStore(path)
    record = ClassRecord("Same", descriptions)
    barrier.wait()
    (result,) = asyncio.run(store.add_many([NewClass(record)]))
    results.put(result.state.version if result.created else result.record.descriptions)


def test_processes_racing_on_the_file_store_have_one_winner(tmp_path):
    ctx = multiprocessing.get_context("fork")  # the child only touches the store file
    barrier, results = ctx.Barrier(4), ctx.Queue()
    path = tmp_path / "c.jsonl"
    procs = [ctx.Process(target=_race_add, args=(str(path), (f"d{i}",), barrier, results)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    outcomes = [results.get(timeout=5) for _ in procs]
    winners = [o for o in outcomes if o == 1]
    assert len(winners) == 1, outcomes
    # The losers are told which class holds the name (the winner's descriptions).
    losers = [o for o in outcomes if o != 1]
    assert len(set(losers)) == 1 and len(losers) == 3
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["op"] for line in lines[1:]] == ["add"] and lines[1]["key"] == "same"


# ---- Redis store -----------------------------------------------------------------------------


def test_redis_replicas_race_and_sync(shared_redis_url, trained, encoder, bundle):
    prefix = f"vlltr-test-{uuid.uuid4().hex[:12]}"

    async def main():
        links = [RedisLink(shared_redis_url, timeout_s=1.0, retry_s=0.2) for _ in range(2)]
        regs = [_registry(trained, encoder, RedisClassStore(link, prefix=prefix), bundle.bundle_id) for link in links]
        for reg in regs:
            await reg.start()
        try:
            # Identical adds racing: one class, and every add succeeds (one created it, the rest found it).
            results = await asyncio.gather(*(reg.add_class("Raced", ["a raced class"]) for reg in regs * 3))
            assert sorted(r.status for r in results) == ["created"] + ["exists"] * 5
            # Different descriptions for a name that exists: a conflict.
            with pytest.raises(ClassConflictError):
                await regs[0].add_class("raced", ["another text"])
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
