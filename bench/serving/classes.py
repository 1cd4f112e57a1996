"""Classes added programmatically: a class-store file holding thousands of added classes (written in one
go through the service's own `FileClassStore`, with the bundle's derived data so the service starts without
encoding them), and text for classes added over HTTP during a load cell."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path

import numpy as np

from vlltr.model.runtime.bundle import load_bundle
from vlltr.service.store import ClassRecord, Derived, NewClass
from vlltr.service.store_file import FileClassStore


def write_class_store(
    path: Path, bundle_dir: Path, total_classes: int, *, anchors_per_class: int = 4, seed: int = 0
) -> int:
    """Write a class store under which the bundle serves `total_classes` classes (trained + added); returns
    the number of added classes. Added anchors are trained anchors plus noise, so their scale and direction
    are those of real text features."""
    bundle = load_bundle(bundle_dir)
    trained = bundle.class_table()
    added = max(0, total_classes - trained.num_classes)
    rng = np.random.default_rng(seed)
    m, d = trained.num_anchors, trained.embed_dim
    base = trained.anchors.reshape(trained.num_classes, m, d)[:, 0, :]  # first anchor of every trained class
    scale = float(np.linalg.norm(base, axis=1).mean())
    items = []
    for i in range(added):
        k = min(anchors_per_class, m)
        origin = base[i % base.shape[0]]
        feats = origin + rng.standard_normal((k, d)).astype(np.float32) * scale / np.sqrt(d)
        emb = feats.mean(axis=0)
        emb = emb / max(float(np.linalg.norm(emb)), 1e-6)
        record = ClassRecord(
            name=f"bench class {i}",
            descriptions=tuple(f"bench class {i}, view {j}" for j in range(k)),
            added_at="2026-01-01T00:00:00+00:00",
        )
        derived = Derived(record.fingerprint, tuple(range(k)), feats.astype(np.float32), emb.astype(np.float32))
        items.append(NewClass(record, bundle.bundle_id, derived))
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in (path, path.with_name(path.name + ".lock")):
        stale.unlink(missing_ok=True)
    asyncio.run(FileClassStore(path).add_many(items))
    return added


def add_class(base_url: str, name: str, *, descriptions: int = 6, timeout: float = 60.0) -> float:
    """POST one class by text; returns the seconds the call took. Raises on a non-201 answer."""
    import time

    body = json.dumps(
        {
            "name": name,
            "descriptions": [f"{name}: a kind of object, description number {j}" for j in range(descriptions)],
        }
    ).encode()
    req = urllib.request.Request(
        base_url + "/v1/classes", data=body, method="POST", headers={"content-type": "application/json"}
    )
    started = time.perf_counter()
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        if resp.status != 201:
            raise RuntimeError(f"adding class {name!r} answered {resp.status}")
        resp.read()
    return time.perf_counter() - started
