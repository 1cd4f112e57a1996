"""`vlltr export`: turn a finished run into a verified model bundle (docs/bundle.md).

Steps, all inside a temporary directory next to the destination (renamed into place only at the end, so a
failed export never leaves a half-written bundle):
1. load the run (`vlltr.training.checkpoint.load_final_model`);
2. write the image and text encoders as ONNX and check each against PyTorch (`EXPORT_TOLERANCE`);
3. write the tokenizer (built from open_clip's own BPE vocabulary), the head arrays, anchors, classes;
4. with `fp16`, convert the encoders and compare them with fp32 on the run's evaluation images: the smallest
   feature cosine and the top-1 agreement of the served prediction must reach `FP16_THRESHOLDS`, otherwise
   the export fails saying by how much;
5. write the manifest (a typed `vlltr.model.runtime.manifest.Manifest`) with every file's sha256, load the
   bundle back with `vlltr.model.runtime.bundle.load_bundle` and compare its predictions (onnxruntime + numpy)
   with the PyTorch model's on a few images.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import open_clip
import torch
from PIL import Image

from vlltr.errors import DataError, ExportError
from vlltr.model.networks.factory import clip_dims, get_tokenizer
from vlltr.model.networks.head import calibrated_probabilities, served_head_arrays
from vlltr.model.runtime import bundle as B
from vlltr.model.runtime.head import HEAD_ARRAYS, ClassTable, HeadParams, log_prior_from_counts
from vlltr.model.runtime.manifest import (
    Calibration,
    ExportCheck,
    FileEntry,
    Fp16Check,
    HeadInfo,
    Manifest,
    ModelInfo,
    ShotThresholds,
    TrainingInfo,
    Verification,
    write_manifest,
)
from vlltr.model.runtime.predictor import BundlePredictor, probabilities
from vlltr.model.runtime.preprocess import PreprocessSpec, preprocess_batch
from vlltr.model.runtime.sessions import create_session
from vlltr.model.runtime.tokenizer import ClipTokenizer, TextSpec, build_tokenizer_json
from vlltr.training.checkpoint import METRICS_FILE, PROTOTYPES_FILE, TrainedRun, load_final_model
from vlltr.training.data.datasets import build_split
from vlltr.training.data.transforms import preprocess_spec
from vlltr.training.environment import software_versions
from vlltr.training.export_onnx import (
    FP16_OP_BLOCK_LIST,
    compare_image_encoder,
    compare_text_encoder,
    convert_to_fp16,
    export_image_encoder,
    export_text_encoder,
)

log = logging.getLogger(__name__)

# ONNX vs PyTorch, max |diff| / max(1, max |feature|), fp32 on CPU.
EXPORT_TOLERANCE = 1e-4
# Bundle (onnxruntime + numpy) vs PyTorch, fp32: max abs probability difference and top-1 agreement.
VERIFY_MAX_PROB_DIFF = 1e-4
VERIFY_MIN_AGREEMENT = 0.999
FP16_THRESHOLDS = {"min_cosine": 0.999, "top1_agreement": 0.99}


class _Agreement(TypedDict):
    """The bundle against PyTorch (`Verification`'s fields)."""

    inputs: str
    max_abs_prob_diff: float
    top1_agreement: float


class _Fp16Drift(TypedDict):
    """fp16 encoders against fp32."""

    min_cosine: float
    min_cosine_image: float
    min_cosine_text: float
    top1_agreement: float
    max_abs_prob_diff: float
    thresholds: dict[str, float]
    op_block_list: list[str]


def export_bundle(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    *,
    fp16: bool = False,
    verify_images: int = 32,
    fp16_images: int = 1000,
) -> Path:
    """Write and verify a bundle for the run in `checkpoint_dir`; returns the bundle directory.

    Args:
        checkpoint_dir: a finished `vlltr train` run.
        out_dir: the bundle directory. An existing bundle there is replaced; any other non-empty directory
            is refused.
        fp16: fp16 encoders, kept only if they agree with fp32 on the evaluation images.
        verify_images: images compared between the bundle and PyTorch after writing.
        fp16_images: evaluation images used for the fp16 check (evenly spaced over the split).

    Raises:
        ExportError: the run is not exportable, an encoder or the bundle disagrees with PyTorch, or the fp16
            check fails (the message gives the measured numbers and the thresholds).
    """
    out = Path(out_dir)
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / B.MANIFEST).is_file())):
        raise ExportError(f"{out} exists and is not a bundle directory; choose another --out")
    run = load_final_model(checkpoint_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a bundle is read by the service user too
    try:
        _write_bundle(run, tmp, fp16=fp16, verify_images=verify_images, fp16_images=fp16_images)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("bundle written to %s", out)
    return out


def _replace_dir(src: Path, dst: Path) -> None:
    # rename is atomic; an old bundle is moved aside first and removed only once the new one is in place.
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_bundle(run: TrainedRun, tmp: Path, *, fp16: bool, verify_images: int, fp16_images: int) -> None:
    clip = run.classifier.clip.eval()
    head = run.classifier.head
    dims = clip_dims(clip)
    cfg = run.config
    classes = _bundle_classes(run)
    spec = preprocess_spec(cfg.data, dims.image_size)  # the run's evaluation preprocessing, drafting included

    tokenizer = get_tokenizer(run.arch)
    text_spec = _write_tokenizer(tokenizer, tmp / B.TOKENIZER, dims.context_length)
    sentences = [s for c in classes for s in c["anchors"]][:16] or ["a photo of a thing."]
    sentences = sentences + ["a long sentence " * 40]  # exercises truncation
    tokens = tokenizer(sentences, context_length=dims.context_length).numpy()
    _check_tokenizer(tmp / B.TOKENIZER, text_spec, sentences, tokens)

    image_path, text_path = tmp / B.IMAGE_ENCODER, tmp / B.TEXT_ENCODER
    export_image_encoder(clip, image_path, dims.image_size)
    export_text_encoder(clip, text_path, torch.from_numpy(tokens[:2]))
    eval_images, eval_source = _evaluation_images(run, max(verify_images, fp16_images if fp16 else 0))
    check_pixels = preprocess_batch(eval_images[:8], spec) if eval_images else _synthetic_pixels(dims.image_size)
    export_check = {
        "image_max_rel_diff": compare_image_encoder(clip, image_path, check_pixels),
        "text_max_rel_diff": compare_text_encoder(clip, text_path, tokens),
        "tolerance": EXPORT_TOLERANCE,
    }
    for key in ("image_max_rel_diff", "text_max_rel_diff"):
        if not export_check[key] <= EXPORT_TOLERANCE:
            raise ExportError(
                f"ONNX {key.split('_')[0]} encoder differs from PyTorch by {export_check[key]:.3g} "
                f"(relative), over the tolerance {EXPORT_TOLERANCE}"
            )
    log.info(
        "ONNX encoders match PyTorch: image %.2g, text %.2g (max relative difference)",
        export_check["image_max_rel_diff"],
        export_check["text_max_rel_diff"],
    )

    arrays = served_head_arrays(head)
    missing = [k for k in HEAD_ARRAYS if k not in arrays]
    if missing:
        raise ExportError(f"the run's head lacks {missing}")
    np.savez(tmp / B.HEAD, **arrays)  # type: ignore[arg-type]  # numpy's stub: a **dict might bind allow_pickle
    np.save(tmp / B.ANCHORS, head.anchors.detach().float().cpu().numpy())
    np.save(tmp / B.ANCHOR_MASK, head.anchor_mask.detach().cpu().numpy().astype(bool))
    (tmp / B.CLASSES).write_text(json.dumps(classes, indent=1, ensure_ascii=False), encoding="utf-8")
    prototypes = run.run_dir / PROTOTYPES_FILE
    if prototypes.is_file():  # the run's unknown rule uses the mahalanobis score
        shutil.copyfile(prototypes, tmp / B.PROTOTYPES)

    fp16_check: Fp16Check | None = None
    if fp16:
        if not eval_images:
            raise ExportError(
                f"--fp16 needs evaluation images to compare fp16 with fp32, and none were found ({eval_source})"
            )
        fp16_check = _convert_and_check_fp16(
            run, tmp, spec, eval_images[:fp16_images], tokens, classes, source=eval_source
        )

    written = (*B.REQUIRED_FILES, *((B.PROTOTYPES,) if (tmp / B.PROTOTYPES).is_file() else ()))
    files = {name: FileEntry.of(tmp / name) for name in written}
    manifest = Manifest(
        bundle_id=_bundle_id(run.arch, files),
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        model=ModelInfo(
            arch=run.arch,
            embed_dim=dims.embed_dim,
            image_size=dims.image_size,
            context_length=dims.context_length,
            quick_gelu=bool(cfg.model.quick_gelu),
        ),
        text=text_spec,
        preprocess=spec,
        head=HeadInfo(
            num_anchors=int(head.anchors.shape[1]),
            alpha=float(run.alpha),
            logit_scale=float(head.logit_scale),
            num_classes=head.num_classes,
            ln_eps=float(head.ln_q.eps),
            v_detach=bool(head.v_detach),
        ),
        calibration=_served_calibration(run.calibration),
        precision="fp16" if fp16 else "fp32",
        fp16_check=fp16_check,
        export_check=ExportCheck(**{k: float(v) for k, v in export_check.items()}),
        training=TrainingInfo(
            dataset=cfg.data.name,
            run_dir=str(run.run_dir),
            config=cfg.to_dict(),
            metrics=_read_json(run.run_dir / METRICS_FILE),
            calibration=dict(run.calibration),
            shot_thresholds=ShotThresholds(cfg.data.many_threshold, cfg.data.few_threshold),
        ),
        # What decoded, resized and computed the export's checks: the service warns when its Pillow is of another
        # major.
        software=software_versions(),
        files=files,
    )
    write_manifest(tmp, manifest)  # _verify loads the bundle as the service will
    verification = _verify(run, tmp, eval_images[:verify_images], spec, fp16=fp16, source=eval_source)
    write_manifest(tmp, replace(manifest, verification=verification))


def _served_calibration(calibration: dict[str, Any]) -> Calibration:
    """The manifest's calibration from the run's `calibration.json`."""
    try:
        return Calibration.from_dict(calibration)
    except (ValueError, TypeError) as exc:
        raise ExportError(f"the run's calibration.json cannot be served: {exc}") from exc


def _bundle_id(arch: str, files: dict[str, FileEntry]) -> str:
    digest = hashlib.sha256("".join(f"{n}:{e.sha256};" for n, e in sorted(files.items())).encode()).hexdigest()
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '-', arch)}-{digest[:12]}-{stamp}"


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _bundle_classes(run: TrainedRun) -> list[dict[str, Any]]:
    """classes.json entries with a positive train count each (from the run's classes or its calibration)."""
    head = run.classifier.head
    if len(run.classes) != head.num_classes:
        raise ExportError(f"classes.json lists {len(run.classes)} classes, the model has {head.num_classes}")
    counts = run.calibration.get("train_counts")
    out = []
    for i, entry in enumerate(run.classes):
        count = entry.get("train_count", counts[i] if counts is not None and i < len(counts) else None)
        if count is None or int(count) < 1:
            raise ExportError(
                f"class {i} ({entry.get('name')!r}) has no positive train_count; the served prior "
                f"needs one per trained class"
            )
        item = {
            "name": str(entry["name"]),
            "train_count": int(count),
            "source": "trained",
            "anchors": list(entry.get("anchors", [])),
        }
        if "dataset_id" in entry:
            item["dataset_id"] = entry["dataset_id"]
        out.append(item)
    if counts is not None and [c["train_count"] for c in out] != [int(c) for c in counts]:
        raise ExportError("classes.json train counts differ from calibration.json train_counts")
    return out


def _write_tokenizer(tokenizer: Any, path: Path, context_length: int) -> TextSpec:
    if not isinstance(tokenizer, open_clip.tokenizer.SimpleTokenizer) or tokenizer.reduction_fn is not None:
        raise ExportError(
            f"only open_clip's CLIP BPE tokenizer (SimpleTokenizer) can be exported, this model uses "
            f"{type(tokenizer).__name__}"
        )
    if tokenizer.clean_fn is not open_clip.tokenizer._clean_lower:
        raise ExportError("only the CLIP tokenizer's default 'lower' text cleaning can be exported")
    ids = build_tokenizer_json(open_clip.tokenizer.default_bpe(), path)
    if (ids["sot_id"], ids["eot_id"]) != (tokenizer.sot_token_id, tokenizer.eot_token_id):
        raise ExportError(
            f"tokenizer special ids {ids} differ from open_clip's ({tokenizer.sot_token_id}, {tokenizer.eot_token_id})"
        )
    return TextSpec(context_length=context_length, sot_id=ids["sot_id"], eot_id=ids["eot_id"])


def _check_tokenizer(path: Path, spec: TextSpec, sentences: list[str], expected: np.ndarray) -> None:
    got = ClipTokenizer(path, spec)(sentences)
    bad = [s for s, g, e in zip(sentences, got, expected) if not np.array_equal(g, e)]
    if bad:
        raise ExportError(f"exported tokenizer differs from open_clip on {len(bad)} sentence(s), e.g. {bad[0]!r}")


def _evaluation_images(run: TrainedRun, limit: int) -> tuple[list[Image.Image], str]:
    """Up to `limit` images of the run's evaluation split (evenly spaced), and where they came from."""
    if limit <= 0:
        return [], "none requested"
    cfg = run.config
    split = cfg.eval.split or "test"
    try:
        dataset = build_split(cfg.data, split, None)
    except (DataError, OSError) as exc:  # data moved or never present: the caller decides whether that matters
        log.warning("no evaluation images for the export checks (%s split: %s)", split, exc)
        return [], f"{split} split unavailable: {exc}"
    n = len(dataset.samples)
    idx: np.ndarray | list[int] = np.unique(np.linspace(0, n - 1, num=min(limit, n)).round().astype(int)) if n else []
    images = []
    for i in idx:
        with Image.open(dataset.samples[int(i)][0]) as img:
            img.load()
            images.append(img.copy())
    return images, f"the {split} split of {cfg.data.name} ({n} images)"


def _synthetic_pixels(size: int, n: int = 4) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, 3, size, size)).astype(np.float32)


@torch.no_grad()
def _torch_probabilities(run: TrainedRun, pixels: np.ndarray, log_prior: np.ndarray) -> np.ndarray:
    options = Calibration.from_dict(run.calibration).scoring_options()
    z_vis, z_lin = run.classifier(torch.from_numpy(pixels))
    return calibrated_probabilities(z_vis, z_lin, torch.from_numpy(log_prior), alpha=run.alpha, **options).numpy()


def _verify(
    run: TrainedRun, root: Path, images: list[Image.Image], spec: PreprocessSpec, *, fp16: bool, source: str
) -> Verification:
    """Load the written bundle and compare its predictions with PyTorch's; raise on disagreement (fp32)."""
    bundle = B.load_bundle(root)
    predictor = BundlePredictor(bundle, provider="cpu")
    if images:
        pixels = preprocess_batch(images, spec)
        what = f"{len(images)} images of {source}"
    else:
        pixels = _synthetic_pixels(spec.size, 8)
        what = "8 random-pixel inputs (no evaluation images found)"
    got = predictor.probabilities_from_features(predictor.image_encoder.encode(pixels))
    expected = _torch_probabilities(run, pixels, bundle.log_prior)
    result: _Agreement = {
        "inputs": what,
        "max_abs_prob_diff": float(np.max(np.abs(got - expected))),
        "top1_agreement": float(np.mean(got.argmax(1) == expected.argmax(1))),
    }
    log.info(
        "bundle vs PyTorch on %s: max |dp| %.2g, top-1 agreement %.4f",
        what,
        result["max_abs_prob_diff"],
        result["top1_agreement"],
    )
    if not fp16 and (
        result["max_abs_prob_diff"] > VERIFY_MAX_PROB_DIFF or result["top1_agreement"] < VERIFY_MIN_AGREEMENT
    ):
        raise ExportError(
            f"the written bundle disagrees with PyTorch on {what}: max probability difference "
            f"{result['max_abs_prob_diff']:.3g} (limit {VERIFY_MAX_PROB_DIFF}), top-1 agreement "
            f"{result['top1_agreement']:.4f} (limit {VERIFY_MIN_AGREEMENT})"
        )
    return Verification(**result)


def _features(path: Path, name: str, x: np.ndarray, *, fp16: bool, batch: int = 64) -> np.ndarray:
    session, _ = create_session(path, "cpu", fp16=fp16)
    # onnxruntime is untyped: its outputs come back as Any.
    features: np.ndarray = np.concatenate(
        [session.run(["features"], {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    )
    return features


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    cosines: np.ndarray = np.sum(a * b, axis=1) / np.maximum(na * nb, 1e-12)
    return cosines


def _convert_and_check_fp16(
    run: TrainedRun,
    tmp: Path,
    spec: PreprocessSpec,
    images: list[Image.Image],
    tokens: np.ndarray,
    classes: list[dict[str, Any]],
    *,
    source: str,
) -> Fp16Check:
    """Replace the encoders with fp16 versions if they agree with fp32; otherwise raise with the numbers."""
    fp16_paths = {}
    for name in (B.IMAGE_ENCODER, B.TEXT_ENCODER):
        dst = tmp / f"{name}.fp16"
        convert_to_fp16(tmp / name, dst)
        fp16_paths[name] = dst
    pixels = preprocess_batch(images, spec)
    try:
        img32 = _features(tmp / B.IMAGE_ENCODER, "pixels", pixels, fp16=False)
        img16 = _features(fp16_paths[B.IMAGE_ENCODER], "pixels", pixels, fp16=True)
        txt32 = _features(tmp / B.TEXT_ENCODER, "tokens", tokens.astype(np.int64), fp16=False)
        txt16 = _features(fp16_paths[B.TEXT_ENCODER], "tokens", tokens.astype(np.int64), fp16=True)
    except Exception as exc:
        raise ExportError(
            f"--fp16: onnxruntime (CPU) cannot run the fp16 encoders, so they cannot be checked against fp32: {exc}"
        ) from exc
    with np.load(tmp / B.HEAD) as data:
        params = HeadParams.from_arrays(
            {k: data[k] for k in data.files},
            logit_scale=float(run.classifier.head.logit_scale),
            ln_eps=float(run.classifier.head.ln_q.eps),
        )
    table = ClassTable.build(
        np.load(tmp / B.ANCHORS), np.load(tmp / B.ANCHOR_MASK), params, [c["name"] for c in classes]
    )
    cal = Calibration.from_dict(run.calibration)
    log_prior = log_prior_from_counts([c["train_count"] for c in classes])
    p32 = probabilities(img32, params, table, log_prior, cal, run.alpha)
    p16 = probabilities(img16, params, table, log_prior, cal, run.alpha)
    image_cos = float(_cosines(img32, img16).min())
    text_cos = float(_cosines(txt32, txt16).min())
    result: _Fp16Drift = {
        "min_cosine": min(image_cos, text_cos),
        "min_cosine_image": image_cos,
        "min_cosine_text": text_cos,
        "top1_agreement": float(np.mean(p32.argmax(1) == p16.argmax(1))),
        "max_abs_prob_diff": float(np.max(np.abs(p32 - p16))),
        "thresholds": dict(FP16_THRESHOLDS),
        "op_block_list": list(FP16_OP_BLOCK_LIST),
    }
    misses = []
    if not result["min_cosine"] >= FP16_THRESHOLDS["min_cosine"]:
        misses.append(
            f"min feature cosine {result['min_cosine']:.6f} < {FP16_THRESHOLDS['min_cosine']} "
            f"(short by {FP16_THRESHOLDS['min_cosine'] - result['min_cosine']:.2g}; image "
            f"{image_cos:.6f}, text {text_cos:.6f})"
        )
    if not result["top1_agreement"] >= FP16_THRESHOLDS["top1_agreement"]:
        misses.append(
            f"top-1 agreement {result['top1_agreement']:.4f} < {FP16_THRESHOLDS['top1_agreement']} "
            f"(short by {FP16_THRESHOLDS['top1_agreement'] - result['top1_agreement']:.4f})"
        )
    if misses:
        raise ExportError(
            f"--fp16 refused, fp16 encoders drift from fp32 on {len(images)} evaluation images: "
            + "; ".join(misses)
            + ". Export without --fp16."
        )
    for name, path in fp16_paths.items():
        os.replace(path, tmp / name)
    log.info(
        "fp16 encoders kept: min cosine %.6f, top-1 agreement %.4f", result["min_cosine"], result["top1_agreement"]
    )
    return Fp16Check(
        min_cosine=result["min_cosine"],
        min_cosine_image=image_cos,
        min_cosine_text=text_cos,
        top1_agreement=result["top1_agreement"],
        max_abs_prob_diff=result["max_abs_prob_diff"],
        thresholds=dict(FP16_THRESHOLDS),
        op_block_list=tuple(FP16_OP_BLOCK_LIST),
        images=f"{len(images)} images of {source}",
    )
