"""The pretraining stage: captions, the cache, the checkpoint as `model.pretrained`, and what it never sees."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from vlltr.model.networks.factory import create_clip
from vlltr.training.benchmarks.digits import generate_digits_lt
from vlltr.training.benchmarks.render_shapes import COLOURS, PATTERNS, SHAPES
from vlltr.training.benchmarks.shapes_text import class_name
from vlltr.training.pretrain import (
    CLIP_MEAN,
    CLIP_STD,
    PretrainCfg,
    digits_outside_benchmark,
    pretrained_checkpoint,
    shapes_caption,
    shapes_caption_set,
)

TINY = PretrainCfg(source="shapes", num_images=48, epochs=1, batch_size=16, captions_per_image=2)


def test_shapes_captions_are_varied_and_not_the_class_names():
    rng = np.random.default_rng(0)
    names = {class_name(s, c, p) for s in SHAPES for c in COLOURS for p in PATTERNS}
    attrs = {"shape": "star", "colour": "cyan", "pattern": "dotted"}
    caps = [shapes_caption(attrs, rng, 0.75) for _ in range(400)]
    assert len(set(caps)) > 150  # free-form: many wordings of one attribute combination
    assert sum(c in names for c in caps) / len(caps) < 0.02
    # Partial captions: some captions leave the colour out entirely.
    colour_words = ("cyan", "turquoise", "aqua", "light blue-green", "teal")
    assert any(not any(w in c for w in colour_words) for c in caps)


def test_black_and_white_pictures_never_have_their_colour_named():
    from vlltr.training.pretrain import _COLOUR_WORDS, _MONOCHROME_WORDS

    rng = np.random.default_rng(1)
    attrs = {"shape": "ring", "colour": "red", "pattern": "solid"}
    caps = [shapes_caption(attrs, rng, 0.75, monochrome=True) for _ in range(300)]
    assert not any(re.search(rf"\b{w}\b", c) for c in caps for w in _COLOUR_WORDS["red"])
    assert sum(any(w in c for w in _MONOCHROME_WORDS) for c in caps) > 150

    def grey_images(cfg: PretrainCfg) -> int:
        data = shapes_caption_set(cfg, 64, 32, progress=False)
        diff = data.images[:, 0] * CLIP_STD[0] + CLIP_MEAN[0] - (data.images[:, 1] * CLIP_STD[1] + CLIP_MEAN[1])
        return int((diff.abs().flatten(1).amax(1) < 0.02).sum())

    assert grey_images(TINY) == 0  # the default: the colour-only set
    assert 0 < grey_images(replace(TINY, monochrome_prob=0.2)) < TINY.num_images


def test_shapes_caption_set_is_deterministic_and_preprocessed():
    a = shapes_caption_set(TINY, 64, 32, progress=False)
    b = shapes_caption_set(TINY, 64, 32, progress=False)
    assert a.images.shape == (48, 3, 32, 32) and a.images.dtype == torch.float32
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert len(a.captions[0]) == 2


def test_checkpoint_is_cached_and_loads_as_model_pretrained(tmp_path):
    path = pretrained_checkpoint(TINY, tmp_path, progress=False)
    assert path.is_file() and path.with_suffix(".json").is_file()
    assert json.loads(path.with_suffix(".json").read_text())["seconds"] > 0  # what a build costs, kept with it
    mtime = path.stat().st_mtime_ns
    assert pretrained_checkpoint(TINY, tmp_path, progress=False) == path  # cached: no second training
    assert path.stat().st_mtime_ns == mtime
    clip = create_clip(TINY.arch, str(path))  # the `model.pretrained: <file>` route
    state = torch.load(path, weights_only=True)
    assert torch.equal(clip.state_dict()["logit_scale"], state["logit_scale"])
    other = PretrainCfg(**{**TINY.__dict__, "seed": TINY.seed + 1})
    assert pretrained_checkpoint(other, tmp_path, progress=False) != path  # the recipe is in the key


def test_digits_pretraining_excludes_every_benchmark_image(tmp_path):
    bench = tmp_path / "digits"
    meta = generate_digits_lt(bench, seed=0)
    images, labels, excluded = digits_outside_benchmark(bench)
    used = {
        hashlib.sha256(np.asarray(Image.open(bench / line.split()[0]).convert("L")).tobytes()).digest()
        for split in ("train", "val", "test")
        for line in (bench / f"{split}.txt").read_text().splitlines()
    }
    assert excluded >= sum(meta["splits"].values())  # every benchmark image (and any pixel-identical twin)
    assert all(hashlib.sha256(img[:, :, 0].tobytes()).digest() not in used for img in images)
    assert len(images) == len(labels) > 500 and set(labels.tolist()) == set(range(10))


def test_unknown_source_and_missing_benchmark_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown pretraining source"):
        pretrained_checkpoint(PretrainCfg(source="imagenet"), tmp_path)
    with pytest.raises(ValueError, match="benchmark_dir"):
        pretrained_checkpoint(PretrainCfg(source="digits"), tmp_path)
