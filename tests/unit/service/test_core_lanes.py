"""The service core with two inference lanes: batches run side by side, and each lane fills its own batch
arrays, so no image is scored on another's pixels; and when the core times its encoder's threads (no torch: the
committed bundle)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np

from vlltr.service.core import ServingCore
from vlltr.service.metrics import Metrics
from vlltr.service.settings import Settings


class SlowEncoder:
    """The real image encoder, started 20 ms late (as a larger model would take): a lane that shared its batch
    array with the other would have it overwritten before the encoder reads it."""

    def __init__(self, encoder) -> None:
        self.encoder = encoder
        self.provider = encoder.provider
        self.concurrent = 0
        self.most_concurrent = 0

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        self.concurrent += 1
        self.most_concurrent = max(self.most_concurrent, self.concurrent)
        try:
            time.sleep(0.02)
            return self.encoder.encode(pixels)
        finally:
            self.concurrent -= 1


def _images(bundle: Path, n: int) -> list[bytes]:
    data = bundle.parent / "run" / "data"
    lines = [ln for ln in (data / "test.txt").read_text().splitlines() if ln.strip()][:n]
    return [(data / ln.split()[0]).read_bytes() for ln in lines]


def _answers(core: ServingCore, images: list[bytes], *, at_once: bool) -> list[list[tuple[int, float]]]:
    async def main() -> list[list[tuple[int, float]]]:
        await core.start()
        try:
            if at_once:
                scored = await asyncio.gather(*(core.classify(data, 3) for data in images))
            else:
                scored = [await core.classify(data, 3) for data in images]
            return [list(zip(s.class_ids.tolist(), s.scores.tolist())) for s in scored]
        finally:
            await core.stop()

    return asyncio.run(main())


def test_two_lanes_score_every_image_on_its_own_pixels(bundle_v1, tmp_path):
    images = _images(bundle_v1, 32)

    def core(lanes: int, name: str) -> tuple[ServingCore, SlowEncoder]:
        settings = Settings(
            bundle=bundle_v1,
            class_store=tmp_path / f"{name}.jsonl",
            inference_lanes=lanes,
            max_batch_size=4,
            cache_size=0,
        )
        c = ServingCore.load(settings, Metrics(redis_enabled=False))
        slow = SlowEncoder(c.image_encoder)
        c.image_encoder = slow  # type: ignore[assignment]
        return c, slow

    alone, _ = core(1, "alone")
    expected = _answers(alone, images, at_once=False)
    lanes, slow = core(2, "lanes")
    assert lanes.batcher.lanes == 2
    got = _answers(lanes, images, at_once=True)
    assert slow.most_concurrent == 2  # the two lanes really ran batches at the same time
    for i, (g, e) in enumerate(zip(got, expected)):
        assert [c for c, _ in g] == [c for c, _ in e], i
        np.testing.assert_allclose([s for _, s in g], [s for _, s in e], atol=1e-5, err_msg=str(i))


def test_the_service_times_only_when_the_threads_are_its_to_choose(bundle_v1, tmp_path, monkeypatch):
    timed: list[int] = []
    from vlltr.model.runtime import encoder_threads

    real = encoder_threads.keep_one_thread_unless_slower

    def counting(*args, **kwargs):
        timed.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(encoder_threads, "keep_one_thread_unless_slower", counting)
    monkeypatch.setattr(encoder_threads, "usable_cpus", lambda: 2)

    def load(**kw) -> ServingCore:
        settings = Settings(bundle=bundle_v1, class_store=tmp_path / "classes.jsonl", cache_size=0, **kw)
        return ServingCore.load(settings, Metrics(redis_enabled=False))

    assert load(intra_op_threads=3).image_encoder.threads == 3 and not timed  # a set count is kept as set
    split = Settings(inference_lanes=2).encoder_threads(2)
    assert load(inference_lanes=2).image_encoder.threads == split and not timed  # lanes split the cores
    assert load(ort_spinning=True).image_encoder.threads is None and not timed  # onnxruntime's own threading
    core = load()
    assert timed == [1] and core.image_encoder.threads in (None, 1)
