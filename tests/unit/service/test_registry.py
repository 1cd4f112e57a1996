"""The class registry and its stores: validation, versioning, atomic swaps, duplicates and replica
synchronisation through the local file store, and a Redis store without a server. On the committed bundle the
previous version exported (no torch); tests/integration/test_registry.py races processes and real Redis."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from vlltr.errors import (
    ClassConflictError,
    ClassNotFoundError,
    ClassValidationError,
    StoreUnavailableError,
    TrainedClassError,
)
from vlltr.model.runtime.bundle import load_bundle
from vlltr.model.runtime.head import build_added_class_anchors
from vlltr.model.runtime.prompts import name_prompts
from vlltr.model.runtime.sessions import TextEncoder
from vlltr.service.core import trained_classes
from vlltr.service.redis_link import RedisLink
from vlltr.service.registry import (
    ClassRegistry,
    descriptions_from_text,
    normalize_descriptions,
    normalize_name,
)
from vlltr.service.store_file import FileClassStore
from vlltr.service.store_redis import RedisClassStore


@pytest.fixture(scope="module")
def bundle(bundle_v1):
    return load_bundle(bundle_v1)


@pytest.fixture(scope="module")
def encoder(bundle):
    return TextEncoder(bundle.text_encoder_path, bundle.tokenizer(), "cpu")


@pytest.fixture(scope="module")
def trained(bundle):
    return trained_classes(bundle)


def _registry(trained, encoder, store, bundle_id="bundle-under-test", **kw):
    return ClassRegistry(trained, encoder.encode_texts, store, bundle_id=bundle_id, sync_interval_s=0.1, **kw)


# ---- validation ------------------------------------------------------------------------------


def test_names_are_normalised_and_checked():
    assert normalize_name("  Cafe\u0301 au lait ") == "Café au lait"  # NFC: e + combining acute -> é
    assert normalize_name("x" * 100) == "x" * 100
    for bad, why in [
        ("", "empty"),
        ("   ", "empty"),
        ("x" * 101, "100"),
        ("a/b", "separator"),
        ("a\\b", "separator"),
        ("tab\there", "control"),
        ("nul\x00", "control"),
        ("zero\u200bwidth", "invisible"),
        ("rtl\u202eoverride", "invisible"),
        (5, "string"),
    ]:
        with pytest.raises(ClassValidationError, match=why):
            normalize_name(bad)


def test_descriptions_are_stripped_deduplicated_and_limited():
    assert normalize_descriptions([" a ", "b", "a", "b "], max_count=5, max_chars=10) == ["a", "b"]
    with pytest.raises(ClassValidationError, match="descriptions\\[1\\] is empty"):
        normalize_descriptions(["a", "  "], max_count=5, max_chars=10)
    with pytest.raises(ClassValidationError, match="limit is 10"):
        normalize_descriptions(["x" * 11], max_count=5, max_chars=10)
    with pytest.raises(ClassValidationError, match="3 descriptions given; the limit is 2"):
        normalize_descriptions(["a", "b", "c"], max_count=2, max_chars=10)
    with pytest.raises(ClassValidationError, match="at least one"):
        normalize_descriptions([], max_count=2, max_chars=10)
    with pytest.raises(ClassValidationError, match="control"):
        normalize_descriptions(["bell\x07"], max_count=2, max_chars=10)
    assert normalize_descriptions(["tab\tinside"], max_count=2, max_chars=20) == ["tab\tinside"]


def test_descriptions_from_a_text_file():
    data = "\ufeffline one\r\n\n  line two  \nline one\n".encode("utf-8")
    assert descriptions_from_text(data, max_count=5, max_chars=50) == ["line one", "line two"]
    with pytest.raises(ClassValidationError, match="not UTF-8"):
        descriptions_from_text(b"\xff\xfe bad", max_count=5, max_chars=50)
    with pytest.raises(ClassValidationError, match="line 1 is"):
        descriptions_from_text(b"x" * 60, max_count=5, max_chars=50)


# ---- versioning, swaps, duplicates (local file store) -----------------------------------------


def test_add_remove_bump_the_version_and_swap_the_table_atomically(tmp_path, trained, encoder, bundle):
    async def main():
        reg = _registry(trained, encoder, FileClassStore(tmp_path / "c.json"))
        await reg.start()
        try:
            v0 = reg.current
            assert v0.version == 0 and v0.table.num_classes == bundle.num_classes
            outcome = await reg.add_class("striped thing", ["a thing with stripes", "stripes everywhere"])
            v1 = reg.current
            assert v1 is not v0 and v1.version == 1 == outcome.version
            # The old table object is untouched: a batch that read it keeps a consistent view.
            assert v0.table.num_classes == bundle.num_classes and v0.version == 0
            assert v1.table.names[-1] == "striped thing" and outcome.class_id == bundle.num_classes
            assert v1.table.num_added == 1 and v1.tiers[-1] == 3
            assert set(outcome.anchors) == {"a thing with stripes", "stripes everywhere"}
            name, version = await reg.remove_class("STRIPED THING")
            assert (name, version) == ("striped thing", 2)
            assert reg.current.table.num_classes == bundle.num_classes
        finally:
            await reg.close()

    asyncio.run(main())


def test_anchors_are_chosen_by_the_name_rule_against_the_served_classes(tmp_path, trained, encoder, bundle):
    """More descriptions than anchor slots: the registry keeps the sentences closest to the class name's
    prompts and farthest from every class already served (the rule the long-tail benchmark measures)."""
    m = bundle.num_anchors
    descriptions = [
        f"sentence {i} about a {w} shape"
        for i, w in enumerate(
            ["red", "green", "spotted", "tiny", "huge", "square", "round", "blue", "striped", "dark", "pale", "odd"]
        )
    ]
    assert len(descriptions) > m

    async def main():
        reg = _registry(trained, encoder, FileClassStore(tmp_path / "c.json"))
        await reg.start()
        try:
            others = reg.current.embeddings
            outcome = await reg.add_class("spotted round thing", descriptions)
            feats = encoder.encode_texts(descriptions)
            reference = encoder.encode_texts(name_prompts("spotted round thing"))
            _, _, chosen = build_added_class_anchors(feats, m, reference=reference, others=others)
            assert list(outcome.anchors) == [descriptions[i] for i in chosen]
            _, _, centroid = build_added_class_anchors(feats, m)
            assert list(chosen) != list(centroid)  # the name and the other classes change the choice
        finally:
            await reg.close()

    asyncio.run(main())


def test_extended_tables_equal_rebuilt_ones(tmp_path, trained, encoder, bundle):
    """Adding a class extends the served table instead of rebuilding it; the result is the same table."""

    async def main():
        store = FileClassStore(tmp_path / "c.json")
        reg = _registry(trained, encoder, store)
        await reg.start()
        try:
            for i in range(3):
                await reg.add_class(f"thing {i}", [f"a thing numbered {i}", "with stripes", "round"])
            await reg.remove_class("thing 1")
            await reg.add_class("thing 3", ["a fourth thing"])
            served = reg.current
            assert [c.name for c in served.added] == ["thing 0", "thing 2", "thing 3"]
            fresh = _registry(trained, encoder, store)  # the same store read from scratch
            await fresh.start()
            full = fresh.current
            await fresh.close()
            assert served.table.names == full.table.names and served.keys == full.keys
            # Equal up to float32 rounding: BLAS blocks a 2-row product differently from a 3-row one.
            for name in ("keys", "anchors", "gram", "mask", "prototypes"):
                np.testing.assert_allclose(getattr(served.table, name), getattr(full.table, name), rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(served.embeddings, full.embeddings)
            np.testing.assert_array_equal(served.tiers, full.tiers)
        finally:
            await reg.close()

    asyncio.run(main())


def test_duplicates_trained_names_and_missing_classes(tmp_path, trained, encoder, bundle):
    async def main():
        reg = _registry(trained, encoder, FileClassStore(tmp_path / "c.json"))
        await reg.start()
        try:
            await reg.add_class("Dup", ["first"])
            with pytest.raises(ClassConflictError):
                await reg.add_class("dup", ["second"])
            with pytest.raises(ClassConflictError, match="trained"):
                await reg.add_class(bundle.class_names[0].upper(), ["x"])
            with pytest.raises(TrainedClassError):
                await reg.remove_class(bundle.class_names[0])
            with pytest.raises(ClassNotFoundError):
                await reg.remove_class("never added")
            assert reg.current.version == 1
        finally:
            await reg.close()

    asyncio.run(main())


def test_near_duplicates_are_found_by_text_direction(tmp_path, trained, encoder, bundle):
    async def main():
        reg = _registry(trained, encoder, FileClassStore(tmp_path / "c.json"), duplicate_threshold=0.999)
        await reg.start()
        try:
            # A trained class's own anchor sentences: cosine 1 with that class.
            sentences = list(trained.anchors[2])
            outcome = await reg.add_class("copy of two", sentences)
            assert outcome.near_duplicates[0].name == bundle.class_names[2]
            assert outcome.near_duplicates[0].cosine == pytest.approx(1.0, abs=1e-4)
        finally:
            await reg.close()

    asyncio.run(main())


def test_store_survives_reopening_and_keeps_order(tmp_path, trained, encoder, bundle):
    path = tmp_path / "c.json"

    async def add_three():
        reg = _registry(trained, encoder, FileClassStore(path))
        await reg.start()
        for name in ("zeta", "alpha", "mid"):
            await reg.add_class(name, [f"a {name} class"])
        await reg.remove_class("alpha")
        await reg.close()

    async def reopen():
        reg = _registry(trained, encoder, FileClassStore(path))
        await reg.start()
        table = reg.current
        await reg.close()
        return table

    asyncio.run(add_three())
    table = asyncio.run(reopen())
    assert table.version == 4
    assert table.table.names[bundle.num_classes :] == ("zeta", "mid")  # order of addition, not of name

    # Classes belong to the deployment, not to a bundle: a registry on another bundle id serves them too.
    async def on_another_bundle():
        reg = _registry(trained, encoder, FileClassStore(path), bundle_id="another-bundle")
        await reg.start()
        names = reg.current.table.names[bundle.num_classes :]
        await reg.close()
        return names

    assert asyncio.run(on_another_bundle()) == ("zeta", "mid")


async def _snapshot(store):
    return await store.snapshot()


def test_corrupt_store_file_is_reported(tmp_path, bundle):
    path = tmp_path / "c.json"
    path.write_text("{not json")
    with pytest.raises(StoreUnavailableError, match="not a class-store file"):
        asyncio.run(_snapshot(FileClassStore(path)))


def test_file_store_replicas_see_changes_by_polling(tmp_path, trained, encoder, bundle):
    async def main():
        a = _registry(trained, encoder, FileClassStore(tmp_path / "c.json"))
        b = _registry(trained, encoder, FileClassStore(tmp_path / "c.json"))
        await a.start()
        await b.start()
        try:
            await a.add_class("shared", ["a shared class"])
            for _ in range(100):
                if b.current.version == 1:
                    break
                await asyncio.sleep(0.05)
            assert b.current.version == 1 and b.current.table.names[-1] == "shared"
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


# ---- Redis store without a server --------------------------------------------------------------


def test_redis_store_unavailable_is_an_error_not_a_hang(free_port, trained, encoder, bundle):
    async def main():
        link = RedisLink(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.2, retry_s=0.2)
        store = RedisClassStore(link, prefix="p")
        with pytest.raises(StoreUnavailableError):
            await store.snapshot()
        with pytest.raises(StoreUnavailableError):
            await store.state()  # breaker open: refused without touching the network
        assert not link.available()
        await link.close()

    asyncio.run(main())
