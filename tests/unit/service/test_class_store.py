"""The class store and the registry's sync rules on the local file store, without processes or Redis (on the
committed bundle the previous version exported, no torch): the append-only layout, the migration of the
previous layout, quarantine, idempotent adds, promotion, epoch / version / history reloads, a committed add
whose refresh fails, and adds that cost their own size. tests/integration/test_class_store_faults.py does the
same against real Redis servers and `vlltr serve` processes."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil

import numpy as np
import pytest

from vlltr.model.runtime.bundle import load_bundle
from vlltr.model.runtime.sessions import TextEncoder
from vlltr.service import store_file
from vlltr.service.core import trained_classes
from vlltr.service.metrics import Metrics
from vlltr.service.registry import ClassRegistry, NewClassText
from vlltr.service.store import ClassRecord, NewClass, encode_array
from vlltr.service.store_file import FileClassStore


@pytest.fixture(scope="module")
def bundle(bundle_v1):
    return load_bundle(bundle_v1)


@pytest.fixture(scope="module")
def encoder(bundle):
    return TextEncoder(bundle.text_encoder_path, bundle.tokenizer(), "cpu")


@pytest.fixture(scope="module")
def trained(bundle):
    return trained_classes(bundle)


class CountingEncoder:
    """The real text encoder, counting the sentences it encodes."""

    def __init__(self, encoder: TextEncoder) -> None:
        self.encoder = encoder
        self.sentences = 0

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.sentences += len(texts)
        return self.encoder.encode_texts(texts)


def _registry(trained, encode, store, bundle_id="bundle-a", **kw):
    return ClassRegistry(trained, encode, store, bundle_id=bundle_id, sync_interval_s=0.05, **kw)


def _run(coro):
    return asyncio.run(coro)


async def _started(reg):
    await reg.start()
    return reg


def _names(reg, bundle):
    return list(reg.current.table.names[bundle.num_classes :])


# ---- layout ----------------------------------------------------------------------------------------------


def test_adds_append_to_the_file_and_are_fsynced(tmp_path, monkeypatch):
    path = tmp_path / "c.jsonl"
    store = FileClassStore(path)
    synced: list[int] = []
    real_fsync = store_file.os.fsync
    monkeypatch.setattr(store_file.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    _run(store.add_many([NewClass(ClassRecord("first", ("one",)))]))
    before, inode = path.read_bytes(), path.stat().st_ino
    synced.clear()
    (result,) = _run(store.add_many([NewClass(ClassRecord("second", ("two",)))]))
    assert result.created and result.state.version == 2
    after = path.read_bytes()
    # Appended (the earlier bytes untouched, the same file), fsynced before add_many returned.
    assert after.startswith(before) and path.stat().st_ino == inode and len(after) - len(before) < 400
    assert synced
    snap = _run(store.snapshot())
    assert [r.name for r in snap.records] == ["first", "second"] and [r.seq for r in snap.records] == [1, 2]


def test_directory_is_fsynced_after_create_and_rename(tmp_path, monkeypatch):
    synced: list[str] = []
    real = store_file.fsync_dir
    monkeypatch.setattr(store_file, "fsync_dir", lambda p: (synced.append(str(p)), real(p))[1])
    store = FileClassStore(tmp_path / "c.jsonl")
    _run(store.state())  # creates the file: temporary file, rename, then the directory
    assert synced == [str(tmp_path)]
    monkeypatch.setattr(store_file, "COMPACT_MIN_DEAD", 5)
    for i in range(6):
        _run(store.add_many([NewClass(ClassRecord(f"c{i}", ("x",)))]))
        _run(store.remove(f"c{i}"))
    assert len(synced) >= 2  # a compaction renamed a new file over the store
    state = _run(store.state())
    assert state.version == 12 and _run(store.snapshot()).records == ()
    lines = (tmp_path / "c.jsonl").read_text().splitlines()
    assert len(lines) < 12  # compacted: the dead lines are gone, the state is the same
    reopened = _run(FileClassStore(tmp_path / "c.jsonl").state())
    assert reopened == state


def test_a_torn_last_line_is_cut_off_by_the_next_writer(tmp_path, caplog):
    path = tmp_path / "c.jsonl"
    store = FileClassStore(path)
    _run(store.add_many([NewClass(ClassRecord("kept", ("k",)))]))
    with open(path, "ab") as fh:
        fh.write(b'{"seq":2,"op":"add","key":"torn","fp":"')  # a write cut short: never acknowledged
    assert [r.name for r in _run(FileClassStore(path).snapshot()).records] == ["kept"]
    with caplog.at_level(logging.WARNING):
        _run(store.add_many([NewClass(ClassRecord("next", ("n",)))]))
    assert "torn last line" in caplog.text
    snap = _run(FileClassStore(path).snapshot())
    assert [r.name for r in snap.records] == ["kept", "next"] and snap.quarantined == ()


# ---- migration of the previous layout --------------------------------------------------------------------


def _old_record(name, descriptions, anchors, feats, seq, created):
    emb = feats.mean(axis=0)
    return {
        "seq": seq,
        "name": name,
        "descriptions": list(descriptions),
        "anchors": list(anchors),
        "anchor_features": encode_array(feats),
        "embedding": encode_array(emb / np.linalg.norm(emb)),
        "created": created,
    }


def test_a_store_file_of_the_previous_layout_is_migrated(tmp_path, trained, encoder, bundle):
    """Classes the previous version stored per bundle id are served after the upgrade, on that bundle with the
    features it stored and on any other bundle derived anew; the old file is kept beside."""
    path = tmp_path / "classes.json"
    feats = encoder.encode_texts(["a red thing", "a blue thing"])
    old = {
        "format_version": 1,
        "bundles": {
            bundle.bundle_id: {
                "version": 2,
                "classes": {
                    "red": _old_record("Red", ["a red thing"], ["a red thing"], feats[:1], 1, "2026-01-01T00:00:00"),
                    "blue": _old_record(
                        "blue", ["a blue thing"], ["a blue thing"], feats[1:], 2, "2026-01-02T00:00:00"
                    ),
                },
            },
            "an-older-bundle": {
                "version": 1,
                "classes": {"gone": _old_record("gone", ["x"], ["x"], feats[:1], 1, "2025-12-01T00:00:00")},
            },
        },
    }
    path.write_text(json.dumps(old))
    counting = CountingEncoder(encoder)

    async def main():
        reg = await _started(_registry(trained, counting, FileClassStore(path), bundle_id=bundle.bundle_id))
        names = _names(reg, bundle)
        features = [c.derived.features for c in reg.current.added]
        await reg.close()
        return names, features

    names, features = _run(main())
    assert names == ["gone", "Red", "blue"]  # every section, oldest first
    assert counting.sentences == 1  # the served bundle's own features were kept; only "gone" was derived
    np.testing.assert_array_equal(features[1], feats[:1])
    assert json.loads((tmp_path / "classes.json.v1").read_text()) == old  # the previous content, kept
    assert (tmp_path / "classes.json").read_text().startswith('{"format": "vlltr-class-store"')


def test_the_previous_default_file_is_migrated_into_the_new_one(tmp_path):
    old = {
        "format_version": 1,
        "bundles": {"b": {"version": 1, "classes": {"x": {"name": "x", "descriptions": ["d"]}}}},
    }
    (tmp_path / "classes.json").write_text(json.dumps(old))
    store = FileClassStore(tmp_path / "classes.jsonl", legacy_path=tmp_path / "classes.json")
    assert [r.name for r in _run(store.snapshot()).records] == ["x"]
    assert json.loads((tmp_path / "classes.json").read_text()) == old  # left as it was


# ---- quarantine ------------------------------------------------------------------------------------------


def test_bad_records_are_quarantined_and_never_block_the_others(tmp_path, trained, encoder, bundle):
    path = tmp_path / "c.jsonl"
    store = FileClassStore(path)
    _run(store.add_many([NewClass(ClassRecord("good one", ("fine",)))]))
    with open(path, "a") as fh:
        fh.write("this line is not JSON\n")
        bad = {"seq": 2, "op": "add", "key": "nameless", "fp": "f", "digest": "d", "record": {"descriptions": ["x"]}}
        fh.write(json.dumps(bad) + "\n")
        slash = {"name": "a/b", "descriptions": ["y"]}
        fh.write(json.dumps({"seq": 3, "op": "add", "key": "a/b", "fp": "f", "digest": "e", "record": slash}) + "\n")
    _run(store.add_many([NewClass(ClassRecord("good two", ("fine too",)))]))
    metrics = Metrics()

    async def main():
        reg = await _started(_registry(trained, encoder.encode_texts, FileClassStore(path), metrics=metrics))
        out = _names(reg, bundle), {q.key: q.reason for q in reg.current.quarantined}
        await reg.close()
        return out

    names, quarantined = _run(main())
    assert names == ["good one", "good two"]
    assert set(quarantined) == {"line 3", "nameless", "a/b"}, quarantined
    assert "no name" in quarantined["nameless"] and "path separators" in quarantined["a/b"]
    text, _ = metrics.exposition()
    assert b'vlltr_class_records{state="quarantined"} 3.0' in text
    assert "this line is not JSON" in path.read_text()  # kept as it was


# ---- idempotent adds, conflicts, promotion ---------------------------------------------------------------


def test_identical_adds_succeed_and_different_ones_conflict(tmp_path, trained, encoder, bundle):
    async def main():
        a = await _started(_registry(trained, encoder.encode_texts, FileClassStore(tmp_path / "c.jsonl")))
        b = await _started(_registry(trained, encoder.encode_texts, FileClassStore(tmp_path / "c.jsonl")))
        first = await a.add_class("Okapi", ["a forest giraffe"])
        again = await b.add_class("okapi", ["a forest giraffe"])  # the other replica has not seen it yet
        bulk = await a.add_classes(
            [NewClassText("okapi", ("a forest giraffe",)), NewClassText("OKAPI", ("zebra legs",))]
        )
        out = first, again, bulk, _names(a, bundle)
        await a.close()
        await b.close()
        return out

    first, again, bulk, names = _run(main())
    assert first.status == "created" and again.status == "exists" and again.record == first.record
    assert [o.status for o in bulk] == ["exists", "conflict"] and "other descriptions" in bulk[1].message
    assert names == ["Okapi"]


def test_a_trained_class_wins_over_an_added_class_of_its_name(tmp_path, trained, encoder, bundle, caplog):
    """A store holding an added class whose name the bundle trains (promoted by a retrain): the trained class is
    served, the added one is kept in the store, listed, logged and counted, and it can still be deleted."""
    store = FileClassStore(tmp_path / "c.jsonl")
    trained_name = bundle.class_names[1]
    _run(store.add_many([NewClass(ClassRecord(trained_name.upper(), ("text only, before images",)))]))
    _run(store.add_many([NewClass(ClassRecord("still added", ("served",)))]))
    metrics = Metrics()

    async def main():
        reg = await _started(_registry(trained, encoder.encode_texts, store, metrics=metrics))
        promoted = [(p.record.name, p.trained_id) for p in reg.current.promoted]
        names = _names(reg, bundle)
        await reg.remove_class(trained_name)  # removes the stored added record, not the trained class
        left = reg.current.promoted, reg.current.table.names[1]
        await reg.close()
        return promoted, names, left

    with caplog.at_level(logging.WARNING):
        promoted, names, (left, still_trained) = _run(main())
    assert promoted == [(trained_name.upper(), 1)] and names == ["still added"]
    assert f"has the name of trained class {trained_name!r}" in caplog.text
    assert left == () and still_trained == trained_name
    assert [r.name for r in _run(store.snapshot()).records] == ["still added"]


# ---- sync rules ------------------------------------------------------------------------------------------


async def _until(condition, timeout=5.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.02)


def test_a_rolled_back_store_is_reloaded_even_when_its_version_catches_up(tmp_path, trained, encoder, bundle, caplog):
    """The store restored from an older copy, then written to until its version equals the replica's: a replica
    comparing versions only would keep the lost class and miss the new one; the digest tells them apart."""
    path = tmp_path / "c.jsonl"

    async def main():
        reader = await _started(_registry(trained, encoder.encode_texts, FileClassStore(path)))
        writer = _registry(trained, encoder.encode_texts, FileClassStore(path))
        await writer.start()
        await writer.add_class("kept", ["kept across the restore"])
        shutil.copy(path, tmp_path / "backup.jsonl")
        await writer.add_class("lost", ["added after the backup"])
        await _until(lambda: "lost" in _names(reader, bundle))
        await reader.close()  # stop it while the store is rolled back and written again
        shutil.copy(tmp_path / "backup.jsonl", path)
        writer2 = _registry(trained, encoder.encode_texts, FileClassStore(path))
        await writer2.start()
        await writer2.add_class("new", ["added after the restore"])  # version 2 again, another history
        reader._closing = False
        await reader.refresh()
        names = _names(reader, bundle)
        await writer.close()
        await writer2.close()
        return names

    with caplog.at_level(logging.WARNING):
        names = _run(main())
    assert names == ["kept", "new"]
    assert "change history differs" in caplog.text and "'lost'" in caplog.text


def test_another_epoch_reloads_and_names_what_is_gone(tmp_path, trained, encoder, bundle, caplog):
    path = tmp_path / "c.jsonl"
    metrics = Metrics()

    async def main():
        reg = await _started(_registry(trained, encoder.encode_texts, FileClassStore(path), metrics=metrics))
        await reg.add_class("before", ["there before the store was created again"])
        path.unlink()  # the store is created again (a new epoch) and filled by someone else
        _run_elsewhere = FileClassStore(path)
        await _run_elsewhere.add_many([NewClass(ClassRecord("after", ("a new store",)))])
        await _until(lambda: _names(reg, bundle) == ["after"])
        await reg.close()

    with caplog.at_level(logging.WARNING):
        _run(main())
    assert "another epoch" in caplog.text and "'before'" in caplog.text
    text, _ = metrics.exposition()
    assert b'vlltr_class_store_reloads_total{reason="epoch"} 1.0' in text


def test_a_committed_add_is_a_success_even_when_the_refresh_fails(tmp_path, trained, encoder, bundle, caplog):
    class FailingOnce(FileClassStore):
        fail = False

        async def state(self):
            if self.fail:
                self.fail = False
                from vlltr.errors import StoreUnavailableError

                raise StoreUnavailableError("the store went away right after the write")
            return await super().state()

        async def add_many(self, items):
            results = await super().add_many(items)
            self.fail = True  # the refresh that follows the committed write fails
            return results

    store = FailingOnce(tmp_path / "c.jsonl")

    async def main():
        reg = await _started(_registry(trained, encoder.encode_texts, store))
        outcome = await reg.add_class("committed", ["written before the refresh failed"])
        served_at_once = "committed" in _names(reg, bundle)
        await _until(lambda: "committed" in _names(reg, bundle))  # the sync loop brings it in
        again = await reg.add_class("committed", ["written before the refresh failed"])
        await reg.close()
        return outcome, served_at_once, again

    with caplog.at_level(logging.WARNING):
        outcome, served_at_once, again = _run(main())
    assert outcome.status == "created" and outcome.version == 1 and outcome.class_id is None
    assert not served_at_once and "refreshing this replica's table failed" in caplog.text
    assert again.status == "exists"  # and the client's retry succeeds too


# ---- derived data ----------------------------------------------------------------------------------------


def test_a_bundle_derives_what_it_lacks_once_and_caches_it_in_the_store(tmp_path, trained, encoder, bundle):
    path = tmp_path / "c.jsonl"

    async def main():
        a = await _started(_registry(trained, encoder.encode_texts, FileClassStore(path), bundle_id="bundle-a"))
        await a.add_classes([NewClassText(f"class {i} added", (f"description {i}", f"more {i}")) for i in range(30)])
        await a.close()
        counting = CountingEncoder(encoder)
        b = await _started(_registry(trained, counting, FileClassStore(path), bundle_id="bundle-b", derive_batch=8))
        derived_by_b, served_b = counting.sentences, len(b.current.added)
        await b.close()
        again = CountingEncoder(encoder)
        b2 = await _started(_registry(trained, again, FileClassStore(path), bundle_id="bundle-b"))
        await b2.close()
        return derived_by_b, served_b, again.sentences

    derived_by_b, served_b, second_start = _run(main())
    assert served_b == 30 and derived_by_b == 60  # two descriptions each, in batches, before it was ready
    assert second_start == 0  # the next replica on bundle-b reads what the first one cached


# ---- cheap adds ------------------------------------------------------------------------------------------


def test_adding_extends_the_table_in_place_instead_of_copying_it(tmp_path, trained, encoder, bundle):
    async def main():
        reg = await _started(_registry(trained, encoder.encode_texts, FileClassStore(tmp_path / "c.jsonl")))
        await reg.add_classes([NewClassText(f"base {i}", (f"base class {i}",)) for i in range(20)])
        before = reg.current
        await reg.add_class("one more", ["a single new class"])
        after = reg.current
        await reg.close()
        return before, after

    before, after = _run(main())
    c = before.num_classes
    assert after.num_classes == c + 1
    # The new table's arrays are longer views of the same buffers: the add wrote only its own rows, and the
    # older table (still held by batches in flight) sees exactly what it saw.
    for name in ("keys", "anchors", "gram", "mask", "prototypes"):
        old, new = getattr(before.table, name), getattr(after.table, name)
        assert np.shares_memory(old, new), name
        np.testing.assert_array_equal(new[: old.shape[0]], old)
    assert np.shares_memory(before.embeddings, after.embeddings) and before.embeddings.shape[0] == c
