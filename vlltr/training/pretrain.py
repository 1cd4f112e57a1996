"""The pretraining stage: a broad, class-balanced image–caption set and contrastive CLIP training on it.

VL-LTR starts from a CLIP pretrained on web data; that model initialises both stages, is the stage-1
distillation teacher and is the zero-shot baseline. No such weights can be downloaded here, so the benchmarks
mirror the setting: the same image generator that makes the benchmark draws a separate, broad, balanced set of
images with free-form captions (varied wording, random subsets of the attributes mentioned, filler phrases),
and a tiny CLIP is trained on it once.

What pretraining never sees:
- the benchmark's class names, class text files or held-out classes' descriptions (captions come from this
  module's own vocabulary);
- the benchmark's images (shapes: freshly drawn with a separate random stream; digits: only the scikit-learn
  images whose pixels appear in none of the benchmark's train/val/test files).

The result is cached under `cache_dir` by a content hash of the recipe, this file and the generator's source,
so it runs once. The checkpoint is a plain `state_dict` file, usable as `model.pretrained`.

`vlltr pretrain --benchmark DIR --out FILE` builds the recipe of :data:`PRETRAIN_RECIPES` that fits a written
benchmark (:func:`recipe_for_benchmark`) and writes it to FILE, for `vlltr train --set model.pretrained=FILE`;
the long-tail benchmark's arms start from the same build.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vlltr.errors import ConfigError, DataError, MissingFileError
from vlltr.model.networks.factory import clip_dims, create_clip, get_tokenizer
from vlltr.training.environment import describe_environment
from vlltr.training.features import encode_text
from vlltr.training.losses import classwise_contrastive_loss, contrastive_logits
from vlltr.training.runtime import adamw, decay_groups

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PRETRAIN_SOURCES = ("shapes", "digits")


@dataclass(frozen=True)
class PretrainCfg:
    """The pretraining recipe; every field enters the cache key."""

    source: str = "shapes"  # shapes | digits
    arch: str = "vlltr-tiny-vit"
    num_images: int = 12000  # shapes only; digits uses every image outside the benchmark
    captions_per_image: int = 4
    epochs: int = 2
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_frac: float = 0.05
    smoothing: float = 0.0
    seed: int = 20240  # separate from every benchmark seed: the images are a fresh draw
    mention_prob: float = 0.75  # chance that a caption names each attribute (noisy, partial captions)
    # shapes only: share of black-and-white pictures, whose captions never name a colour (the web has old photos
    # too; used when the benchmark's training sessions can be black and white)
    monochrome_prob: float = 0.0


# The pretraining builds the long-tail benchmark's arms start from, per bundled benchmark. Shapes-LT classes are
# shape x colour x pattern: the tower must resolve a rotated outline and its fill pattern; the ViT (patch 8 on
# 32 px) learned colour only, while the small ResNet on the 64-px drawings keeps a 16x16 map after its stem.
# With black-and-white training sessions 16 pretraining epochs leave the text unable to say a colour and 32
# are needed (docs/benchmarks/shapes-lt.md).
PRETRAIN_RECIPES: dict[str, PretrainCfg] = {
    "shapes-lt": PretrainCfg(source="shapes", arch="vlltr-tiny-rn64", epochs=32),
    "digits-lt": PretrainCfg(source="digits", arch="vlltr-tiny-vit", epochs=40, batch_size=64, lr=1e-3),
}
# Black-and-white share of the shapes pretraining set when the benchmark has black-and-white training sessions.
PRETRAIN_MONOCHROME = 0.2


def recipe_for_benchmark(meta: dict[str, Any]) -> PretrainCfg:
    """The recipe of :data:`PRETRAIN_RECIPES` for a written benchmark (its `meta.json`): by its generator, with
    black-and-white pictures in the pretraining set when its training sessions can be black and white."""
    generator = str(meta.get("generator", ""))
    if generator not in PRETRAIN_RECIPES:
        raise DataError(
            f"no pretraining recipe for a benchmark written by {generator or 'an unknown generator'!r}; "
            f"known: {sorted(PRETRAIN_RECIPES)}"
        )
    cfg = PRETRAIN_RECIPES[generator]
    if float(meta.get("sessions", {}).get("monochrome_prob") or 0.0) > 0:
        cfg = replace(cfg, monochrome_prob=PRETRAIN_MONOCHROME)
    return cfg


@dataclass
class CaptionSet:
    """Preprocessed images (float `[N, 3, S, S]`) with several free-form captions each."""

    images: torch.Tensor
    captions: list[list[str]]
    provenance: dict[str, Any]  # recorded in the checkpoint's .json


# ---------------------------------------------------------------- captions


_FILLERS = (
    "",
    "",
    "",
    "a picture of ",
    "an image showing ",
    "here is ",
    "look at ",
    "i drew ",
    "clip art of ",
    "a tiny icon of ",
    "a sketch with ",
    "a drawing of ",
)
_SUFFIXES = (
    "",
    "",
    "",
    " on a noisy background",
    " in the middle",
    " somewhere in the frame",
    ", nothing else",
    " drawn quickly",
    " as a small icon",
)


def _word(options: tuple[str, ...] | list[str], rng: np.random.Generator) -> str:
    return options[int(rng.integers(len(options)))]


def compose_caption(parts: list[str], rng: np.random.Generator) -> str:
    """Join attribute phrases in a random order and wording into one caption."""
    order = list(parts)
    rng.shuffle(order) if rng.random() < 0.3 else None
    body = " ".join(p for p in order if p).strip()
    if not body:
        body = _word(("a shape", "something", "an object", "a figure"), rng)
    return f"{_word(_FILLERS, rng)}{body}{_word(_SUFFIXES, rng)}".strip()


# ---------------------------------------------------------------- sources


_SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "round shape", "dot-like disc", "circular shape"),
    "square": ("square", "box", "four-sided shape", "block", "squared shape"),
    "triangle": ("triangle", "three-cornered shape", "wedge", "triangular shape", "pyramid outline"),
    "cross": ("cross", "plus sign", "plus shape", "crossed bars", "cruciform shape"),
    "star": ("star", "five-pointed star", "starry shape", "pointy star", "star shape"),
    "ring": ("ring", "hoop", "donut", "annulus", "hollow circle"),
}
_COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("red", "crimson", "scarlet", "cherry red", "reddish"),
    "green": ("green", "grass green", "emerald", "leafy green", "greenish"),
    "blue": ("blue", "royal blue", "deep blue", "cobalt", "bluish"),
    "yellow": ("yellow", "lemon", "golden", "sunny yellow", "yellowish"),
    "magenta": ("magenta", "fuchsia", "hot pink", "purple-pink", "pinkish purple"),
    "cyan": ("cyan", "turquoise", "aqua", "light blue-green", "teal"),
}
_PATTERN_WORDS: dict[str, tuple[str, ...]] = {
    "solid": ("solid", "plain", "filled", "uniformly coloured", "unpatterned"),
    "striped": ("striped", "with stripes", "banded", "lined", "with parallel bands"),
    "dotted": ("dotted", "spotted", "polka-dot", "with dots", "speckled with round spots"),
}


_MONOCHROME_WORDS = ("black and white", "greyscale", "grey", "monochrome", "black-and-white")


def shapes_caption(
    attrs: dict[str, str], rng: np.random.Generator, mention_prob: float, monochrome: bool = False
) -> str:
    """A free-form caption of a shapes image: each attribute is named with probability `mention_prob`, in
    a random synonym and order (so captions are partial and varied, like alt text). A black-and-white picture's
    caption may say so, and never names the colour it does not show."""
    colour_words = _MONOCHROME_WORDS if monochrome else _COLOUR_WORDS[attrs["colour"]]
    colour = _word(colour_words, rng) if rng.random() < mention_prob else ""
    pattern = _word(_PATTERN_WORDS[attrs["pattern"]], rng) if rng.random() < mention_prob else ""
    shape = (
        _word(_SHAPE_WORDS[attrs["shape"]], rng)
        if rng.random() < mention_prob
        else _word(("shape", "figure", "object", "thing"), rng)
    )
    if pattern.startswith("with"):
        parts = [colour, shape, pattern]
    else:
        parts = [pattern, colour, shape] if rng.random() < 0.5 else [colour, pattern, shape]
    return compose_caption(parts, rng)


def _shapes_generator_source() -> str:
    from vlltr.training.benchmarks import render_shapes

    return inspect.getsource(render_shapes)


def shapes_caption_set(cfg: PretrainCfg, image_size: int, input_size: int, progress: bool = True) -> CaptionSet:
    """Broad shapes set: shape, colour and pattern drawn uniformly and independently for every image (so it
    is balanced over all attribute combinations), drawn by the benchmark's renderer from this recipe's own
    random stream, with free-form captions."""
    from vlltr.training.benchmarks.render_shapes import COLOURS, PATTERNS, SHAPES, render

    rng = np.random.default_rng(cfg.seed)
    colours = sorted(COLOURS)
    images = np.empty((cfg.num_images, image_size, image_size, 3), dtype=np.uint8)
    caps: list[list[str]] = []
    for i in range(cfg.num_images):
        attrs = {"shape": _word(SHAPES, rng), "colour": _word(colours, rng), "pattern": _word(PATTERNS, rng)}
        mono = cfg.monochrome_prob > 0 and bool(rng.random() < cfg.monochrome_prob)  # 0: the colour-only stream
        images[i] = render(attrs["shape"], attrs["colour"], attrs["pattern"], rng, size=image_size, monochrome=mono)
        caps.append([shapes_caption(attrs, rng, cfg.mention_prob, mono) for _ in range(cfg.captions_per_image)])
    return CaptionSet(
        preprocess_array(images, input_size),
        caps,
        {"source": "shapes", "num_images": cfg.num_images, "render_size": image_size},
    )


_DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_DIGIT_NOUNS = ("digit", "number", "numeral", "figure", "character")
_DIGIT_STYLES = (
    "handwritten",
    "hand-drawn",
    "scribbled",
    "pen-written",
    "small",
    "blurry",
    "low resolution",
    "grey",
    "pixelated",
)


def digit_caption(digit: int, rng: np.random.Generator, mention_prob: float) -> str:
    """A free-form caption of a handwritten digit (its name said in varied ways)."""
    name = _word((_DIGIT_WORDS[digit], str(digit), f"the {_DIGIT_WORDS[digit]}"), rng)
    parts = []
    if rng.random() < mention_prob:
        parts.append(_word(_DIGIT_STYLES, rng))
    parts.append(_word(_DIGIT_NOUNS, rng) + " " + name if rng.random() < 0.6 else name)
    return compose_caption(parts, rng)


def digits_outside_benchmark(benchmark_dir: str | Path) -> tuple[np.ndarray, np.ndarray, int]:
    """scikit-learn digits drawn as the benchmark draws them, minus every image whose pixels equal an image
    of the benchmark's train/val/test files. Returns `(uint8 [N, 32, 32, 3], labels [N], excluded count)`."""
    from PIL import Image
    from sklearn.datasets import load_digits

    from vlltr.training.benchmarks.digits import digit_png

    root = Path(benchmark_dir)
    used: set[bytes] = set()
    for split in ("train", "val", "test"):
        for line in (root / f"{split}.txt").read_text(encoding="utf-8").splitlines():
            if line.strip():
                rel = line.rsplit(maxsplit=1)[0]
                used.add(hashlib.sha256(np.asarray(Image.open(root / rel).convert("L")).tobytes()).digest())
    digits = load_digits()
    keep_imgs, keep_labels, excluded = [], [], 0
    for image, label in zip(digits.images, digits.target):
        arr = digit_png(image)
        if hashlib.sha256(arr.tobytes()).digest() in used:
            excluded += 1
            continue
        keep_imgs.append(np.repeat(arr[:, :, None], 3, axis=2))
        keep_labels.append(int(label))
    return np.stack(keep_imgs), np.asarray(keep_labels), excluded


def digits_caption_set(
    cfg: PretrainCfg, benchmark_dir: str | Path, input_size: int, progress: bool = True
) -> CaptionSet:
    """scikit-learn digits that appear in none of the benchmark's split files (compared by pixel content),
    with free-form captions."""
    rng = np.random.default_rng(cfg.seed)
    images, labels, excluded = digits_outside_benchmark(benchmark_dir)
    caps = [[digit_caption(int(y), rng, cfg.mention_prob) for _ in range(cfg.captions_per_image)] for y in labels]
    return CaptionSet(
        preprocess_array(images, input_size),
        caps,
        {
            "source": "digits",
            "num_images": len(images),
            "excluded_benchmark_images": excluded,
            "per_digit": np.bincount(labels, minlength=10).tolist(),
        },
    )


# ---------------------------------------------------------------- training


def preprocess_array(images: np.ndarray, image_size: int) -> torch.Tensor:
    """uint8 `[N, H, W, 3]` -> float `[N, 3, S, S]` through the service's evaluation preprocessing (the pixels
    the benchmark harness and the service see)."""
    from PIL import Image

    from vlltr.training.config import DataCfg
    from vlltr.training.data.transforms import eval_transform

    transform = eval_transform(DataCfg(), image_size)
    return torch.stack([transform(Image.fromarray(a)) for a in images])


def _augment(x: torch.Tensor, gen: torch.Generator, shift: int = 2) -> torch.Tensor:
    n, _, s, _ = x.shape
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip.view(n, 1, 1, 1), x.flip(-1), x)
    padded = F.pad(x, (shift,) * 4, mode="replicate")
    dx, dy = torch.randint(0, 2 * shift + 1, (2,), generator=gen).tolist()
    return padded[:, :, dy : dy + s, dx : dx + s]


def train_clip(data: CaptionSet, cfg: PretrainCfg, progress: bool = True) -> torch.nn.Module:
    """Contrastive CLIP training from random init. Captions with identical text are treated as positives of
    each other (a caption-level class-wise target), so duplicate captions in a batch are not false negatives."""
    torch.manual_seed(cfg.seed)
    clip = create_clip(cfg.arch)
    tokenizer = get_tokenizer(cfg.arch)
    flat = [c for caps in data.captions for c in caps]
    uniq, inverse = np.unique(np.asarray(flat, dtype=object), return_inverse=True)
    tokens = tokenizer([str(u) for u in uniq])
    caption_ids = inverse.reshape(len(data.captions), -1)
    opt = adamw(decay_groups(clip.named_parameters(), cfg.lr, cfg.weight_decay, "clip"), cfg.lr, eps=1e-8)
    n = len(data.images)
    steps_per_epoch = n // cfg.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"{n} pretraining images is fewer than one batch of {cfg.batch_size}")
    total = cfg.epochs * steps_per_epoch
    warm = max(1, int(cfg.warmup_frac * total))
    rng = np.random.default_rng(cfg.seed + 1)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    step = 0
    clip.train()
    for epoch in range(cfg.epochs):
        order = rng.permutation(n)
        running = 0.0
        for b in range(steps_per_epoch):
            idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            lr = (
                cfg.lr * (step + 1) / warm
                if step < warm
                else 0.5 * cfg.lr * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
            )
            for g in opt.param_groups:
                g["lr"] = lr
            cap = caption_ids[idx, rng.integers(caption_ids.shape[1], size=len(idx))]
            x = _augment(data.images[idx], gen)
            img = F.normalize(clip.encode_image(x), dim=-1)
            txt = F.normalize(encode_text(clip, tokens[torch.from_numpy(cap)]), dim=-1)
            logits = contrastive_logits(img, txt, clip.logit_scale.exp())
            loss = classwise_contrastive_loss(logits, torch.from_numpy(cap), cfg.smoothing)["contrastive_loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]  # torch: unannotated
            opt.step()
            with torch.no_grad():
                clip.logit_scale.clamp_(0, math.log(100))  # CLIP's own clamp during pretraining
            running += float(loss.detach())
            step += 1
        if progress:
            log.info("pretrain epoch %d/%d: loss %.3f", epoch + 1, cfg.epochs, running / steps_per_epoch)
    trained: torch.nn.Module = clip.eval()  # open_clip is untyped
    return trained


# ---------------------------------------------------------------- cache


def _benchmark_fingerprint(benchmark_dir: str | Path) -> str:
    h = hashlib.sha256()
    for name in ("meta.json", "train.txt", "val.txt", "test.txt"):
        p = Path(benchmark_dir) / name
        if not p.is_file():
            raise MissingFileError(f"{p} is missing: is {benchmark_dir} a benchmark written by `vlltr data`?")
        h.update(p.read_bytes())
    return h.hexdigest()


def _source_fingerprint(cfg: PretrainCfg, image_size: int, benchmark_dir: str | Path | None) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(asdict(cfg), sort_keys=True).encode())
    h.update(str(image_size).encode())
    # What determines the weights: the caption and training code and the vocabularies (not docstrings elsewhere).
    for fn in (
        compose_caption,
        shapes_caption,
        digit_caption,
        shapes_caption_set,
        digits_outside_benchmark,
        preprocess_array,
        _augment,
        train_clip,
        decay_groups,
        adamw,
    ):
        h.update(inspect.getsource(fn).encode())
    h.update(
        repr(
            (
                _FILLERS,
                _SUFFIXES,
                _SHAPE_WORDS,
                _COLOUR_WORDS,
                _PATTERN_WORDS,
                _MONOCHROME_WORDS,
                _DIGIT_WORDS,
                _DIGIT_NOUNS,
                _DIGIT_STYLES,
            )
        ).encode()
    )
    if cfg.source == "shapes":
        h.update(_shapes_generator_source().encode())
    else:
        h.update(_benchmark_fingerprint(benchmark_dir).encode())  # type: ignore[arg-type]
    return h.hexdigest()


def _check_recipe(cfg: PretrainCfg, benchmark_dir: str | Path | None) -> None:
    if cfg.source not in PRETRAIN_SOURCES:
        raise ConfigError(f"unknown pretraining source {cfg.source!r}; known: {list(PRETRAIN_SOURCES)}")
    if cfg.source == "digits" and benchmark_dir is None:
        raise ConfigError("digits pretraining needs benchmark_dir, to keep the benchmark's images out")


def build_pretrained(
    cfg: PretrainCfg,
    path: str | Path,
    *,
    benchmark_dir: str | Path | None = None,
    render_size: int = 64,
    progress: bool = True,
    key: str | None = None,
) -> Path:
    """Train the recipe `cfg` and write its state dict to `path` (atomically), with a `.json` beside it that
    records the recipe, the caption set's provenance, example captions and the software and machine it ran on.

    Args:
        cfg: the recipe.
        path: the checkpoint file to write (its folder is created).
        benchmark_dir: the written digits benchmark (digits only: its images are kept out of pretraining).
        render_size: side of the drawn shapes images (the benchmark's image size) before preprocessing.
        key: the recipe's cache key, recorded in the `.json` (computed when not given).
    """
    _check_recipe(cfg, benchmark_dir)
    started = time.perf_counter()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    input_size = clip_dims(create_clip(cfg.arch)).image_size
    if cfg.source == "shapes":
        data = shapes_caption_set(cfg, render_size, input_size, progress)
    else:
        data = digits_caption_set(cfg, benchmark_dir, input_size, progress)  # type: ignore[arg-type]
    log.info("pretraining %s on %d images (%s)", cfg.arch, len(data.images), cfg.source)
    clip = train_clip(data, cfg, progress)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(clip.state_dict(), tmp)
    os.replace(tmp, path)
    meta = {
        "recipe": asdict(cfg),
        "key": key or _source_fingerprint(cfg, render_size, benchmark_dir)[:16],
        "render_size": render_size,
        "provenance": data.provenance,
        "example_captions": [data.captions[i][0] for i in range(min(12, len(data.captions)))],
        "environment": describe_environment(torch.device("cpu")),
        "seconds": round(time.perf_counter() - started, 1),  # drawing the caption set and training
    }
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    return path


def pretrained_checkpoint(
    cfg: PretrainCfg,
    cache_dir: str | Path,
    *,
    benchmark_dir: str | Path | None = None,
    render_size: int = 64,
    progress: bool = True,
) -> Path:
    """Path of the pretrained CLIP state dict for `cfg`, training it first if the cache lacks it.

    Args:
        cfg: the recipe.
        cache_dir: where checkpoints live (`pretrain-<source>-<hash>.pt` plus a `.json` with provenance).
        benchmark_dir: the written digits benchmark (digits only: its images are kept out of pretraining).
        render_size: side of the drawn shapes images (the benchmark's image size) before preprocessing.
    """
    _check_recipe(cfg, benchmark_dir)
    key = _source_fingerprint(cfg, render_size, benchmark_dir)[:16]
    path = Path(cache_dir) / f"pretrain-{cfg.source}-{key}.pt"
    if path.is_file():
        return path
    return build_pretrained(cfg, path, benchmark_dir=benchmark_dir, render_size=render_size, progress=progress, key=key)


def load_pretrained(path: str | Path, arch: str) -> torch.nn.Module:
    """The pretrained CLIP, through the project's factory (the same path `model.pretrained` takes)."""
    clip: torch.nn.Module = create_clip(arch, str(path)).eval()  # open_clip is untyped
    return clip


def pretrain_to_file(
    out: str | Path,
    *,
    benchmark_dir: str | Path | None = None,
    recipe: str | None = None,
    epochs: int | None = None,
    num_images: int | None = None,
    seed: int | None = None,
    progress: bool = True,
) -> tuple[Path, PretrainCfg]:
    """`vlltr pretrain`: build a pretrained stand-in CLIP and write it to `out` (plus `out` with `.json`).

    The recipe is the one for the benchmark at `benchmark_dir` (:func:`recipe_for_benchmark`), or the named
    entry of :data:`PRETRAIN_RECIPES`; `epochs`, `num_images` and `seed` replace the recipe's values (another
    build). Digits pretraining needs the written benchmark, whose images it keeps out.

    Returns the written path and the recipe used.
    """
    meta: dict[str, Any] = {}
    if benchmark_dir is not None:
        meta_path = Path(benchmark_dir) / "meta.json"
        if not meta_path.is_file():
            raise MissingFileError(f"{meta_path} is missing: is {benchmark_dir} a benchmark written by `vlltr data`?")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if recipe is not None:
        if recipe not in PRETRAIN_RECIPES:
            raise ConfigError(f"unknown pretraining recipe {recipe!r}; known: {sorted(PRETRAIN_RECIPES)}")
        cfg = PRETRAIN_RECIPES[recipe]
        if meta and meta.get("generator") != recipe:
            raise ConfigError(f"recipe {recipe!r} does not fit {benchmark_dir}, a {meta.get('generator')!r} benchmark")
        if meta:
            cfg = recipe_for_benchmark(meta)
    elif meta:
        cfg = recipe_for_benchmark(meta)
    else:
        raise ConfigError(f"give the benchmark (--benchmark DIR) or a recipe (--recipe {'|'.join(PRETRAIN_RECIPES)})")
    for name, value, least in (("epochs", epochs, 1), ("num_images", num_images, 1), ("seed", seed, 0)):
        if value is not None and value < least:
            raise ConfigError(f"{name} must be >= {least}, got {value}")
    cfg = replace(
        cfg,
        epochs=cfg.epochs if epochs is None else epochs,
        num_images=cfg.num_images if num_images is None else num_images,
        seed=cfg.seed if seed is None else seed,
    )
    if cfg.num_images < cfg.batch_size and cfg.source == "shapes":
        raise ConfigError(f"{cfg.num_images} images is fewer than one batch of {cfg.batch_size}")
    render_size = int(meta.get("image_size", 64))
    path = build_pretrained(cfg, out, benchmark_dir=benchmark_dir, render_size=render_size, progress=progress)
    return path, cfg
