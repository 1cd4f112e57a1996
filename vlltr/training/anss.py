"""AnSS: anchor sentence selection.

Every sentence `s` of class `c` is scored against a labelled reference image set (N images, features `g_i`,
labels `y_i`) with the stage-1 scale `s_1 = exp(logit_scale)`, all features L2-normalised:

    score(s) = -(1 / |R_c|) * sum_{i: y_i = c} log softmax_i(s_1 * <u_s, g_i>)   (softmax over all N images)

i.e. the text-anchored class-wise soft-target CE on a fixed image set; lower is better. The M lowest-scoring
sentences of each class become its anchors (zero padded and masked when a class has fewer than M).
The ablation modes `rand` (M random sentences) and `first` (the first M in corpus order) skip scoring.

The original loops over sentences in Python; here the scores come in chunks of sentences per matmul, with the
chunk shrunk so one `[chunk, N]` logit block stays under a memory cap.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Subset
from tqdm.auto import tqdm

from vlltr.training.checkpoint import atomic_torch_save, atomic_write_json
from vlltr.training.distributed import barrier
from vlltr.training.features import encode_images
from vlltr.training.runtime import derive_seed, eval_loader

if TYPE_CHECKING:
    import open_clip

    from vlltr.training.config import Config
    from vlltr.training.data.datasets import ImageListDataset
    from vlltr.training.distributed import DistEnv
    from vlltr.training.inputs import PreparedInputs
    from vlltr.training.stage1 import Stage1Result

log = logging.getLogger(__name__)

ANSS_MODES = ("anss", "rand", "first")
_MAX_BLOCK_ELEMENTS = 1 << 27  # 128 M floats (512 MB) per [chunk, N] logit block


def sentence_labels(offsets: np.ndarray) -> torch.Tensor:
    """Class index of every sentence from the `[C + 1]` offsets of the flattened sentence table."""
    counts: np.ndarray = np.diff(np.asarray(offsets, dtype=np.int64))  # numpy's stub says timedelta64 here
    return torch.from_numpy(np.repeat(np.arange(len(counts)), counts)).long()


def check_sentence_counts(offsets: np.ndarray, class_names: list[str]) -> None:
    """Raise naming the first classes that have no sentence at all (AnSS and the head need at least one)."""
    counts = np.diff(np.asarray(offsets, dtype=np.int64))
    empty = [f"{i} ({class_names[i]!r})" for i in np.flatnonzero(counts == 0)[:10]]
    if empty:
        raise ValueError(f"classes with no text sentence: {', '.join(empty)}; every class needs at least one")


@torch.no_grad()
def score_sentences(
    text_features: torch.Tensor,
    text_labels: torch.Tensor,
    image_features: torch.Tensor,
    image_labels: torch.Tensor,
    logit_scale: float,
    *,
    chunk_size: int = 4096,
    progress: bool = False,
) -> torch.Tensor:
    """AnSS score of every sentence, `[S]` (lower is better); NaN for classes without reference images."""
    num_classes = int(max(text_labels.max().item(), image_labels.max().item())) + 1
    u = F.normalize(text_features.float(), dim=-1)
    g = F.normalize(image_features.float(), dim=-1)
    counts = torch.bincount(image_labels, minlength=num_classes).float()
    # Column c averages the log-probabilities of class c's images: [N, C] with 1/|R_c| entries.
    own = F.one_hot(image_labels, num_classes).float() / counts.clamp_min(1.0)
    chunk = max(1, min(chunk_size, _MAX_BLOCK_ELEMENTS // max(1, g.shape[0])))
    scores = torch.empty(u.shape[0])
    for start in tqdm(range(0, u.shape[0], chunk), desc="AnSS scoring", disable=not progress, leave=False):
        block = slice(start, start + chunk)
        logp = F.log_softmax(logit_scale * u[block] @ g.t(), dim=1)
        per_class = logp @ own
        scores[block] = -per_class.gather(1, text_labels[block].view(-1, 1)).squeeze(1)
    scores[counts[text_labels] == 0] = float("nan")
    return scores


@dataclass
class AnchorSelection:
    """Chosen sentence indices `[C, M]` (global sentence index, -1 where padded) and the mask `[C, M]`."""

    indices: torch.Tensor
    mask: torch.Tensor
    mode: str
    fallback_classes: list[int]


class SavedSelection(TypedDict):
    """What `save_selection` writes to `anchors.pt` and `load_selection` reads back."""

    anchors: torch.Tensor
    mask: torch.Tensor
    indices: torch.Tensor
    mode: str
    scores: torch.Tensor | None
    fallback_classes: list[int]


def select_anchors(
    offsets: np.ndarray,
    num_anchors: int,
    *,
    mode: str = "anss",
    scores: torch.Tensor | None = None,
    seed: int = 0,
) -> AnchorSelection:
    """Pick up to `num_anchors` sentences per class.

    `anss` keeps the lowest scores (a class whose scores are NaN, i.e. it had no reference image, falls back
    to corpus order and is reported in `fallback_classes`); `rand` draws without replacement; `first` takes
    corpus order.
    """
    if mode not in ANSS_MODES:
        raise ValueError(f"anss.mode must be one of {ANSS_MODES}, got {mode!r}")
    if mode == "anss" and scores is None:
        raise ValueError("anss mode needs sentence scores")
    offsets = np.asarray(offsets, dtype=np.int64)
    num_classes = len(offsets) - 1
    indices = torch.full((num_classes, num_anchors), -1, dtype=torch.long)
    rng = np.random.default_rng(seed)
    fallback: list[int] = []
    for c in range(num_classes):
        lo, hi = int(offsets[c]), int(offsets[c + 1])
        order = np.arange(lo, hi)
        if mode == "rand":
            order = rng.permutation(order)
        elif mode == "anss":
            assert scores is not None  # checked above
            class_scores = scores[lo:hi].numpy()
            if np.isnan(class_scores).all():
                fallback.append(c)
            else:
                order = lo + np.argsort(class_scores, kind="stable")
        keep = order[:num_anchors]
        indices[c, : len(keep)] = torch.from_numpy(keep)
    return AnchorSelection(indices, indices >= 0, mode, fallback)


def gather_anchors(text_features: torch.Tensor, selection: AnchorSelection) -> torch.Tensor:
    """The `[C, M, D]` anchor tensor of raw text features, zero where padded."""
    safe = selection.indices.clamp_min(0)
    anchors = text_features.float()[safe]
    return anchors * selection.mask.unsqueeze(-1).float()


def save_selection(
    out_dir: str | Path,
    selection: AnchorSelection,
    anchors: torch.Tensor,
    sentences: list[str],
    class_names: list[str],
    scores: torch.Tensor | None,
) -> None:
    """Write `anchors.pt` (tensors) and `anchors.json` (chosen sentences and scores per class)."""
    out_dir = Path(out_dir)
    atomic_torch_save(
        {
            "anchors": anchors,
            "mask": selection.mask,
            "indices": selection.indices,
            "mode": selection.mode,
            "scores": scores,
            "fallback_classes": selection.fallback_classes,
        },
        out_dir / "anchors.pt",
    )
    report = []
    for c, name in enumerate(class_names):
        chosen = [int(i) for i in selection.indices[c] if i >= 0]
        report.append(
            {
                "class": c,
                "name": name,
                "anchors": [sentences[i] for i in chosen],
                "scores": None if scores is None else [_finite(scores[i]) for i in chosen],
            }
        )
    atomic_write_json(
        {
            "mode": selection.mode,
            "num_anchors": int(selection.indices.shape[1]),
            "fallback_classes": selection.fallback_classes,
            "classes": report,
        },
        out_dir / "anchors.json",
    )


def _finite(value: torch.Tensor) -> float | None:
    v = float(value)
    return v if np.isfinite(v) else None


def load_selection(out_dir: str | Path) -> SavedSelection:
    """Read back what :func:`save_selection` wrote (`anchors`, `mask`, `indices`, `mode`, `scores`)."""
    path = Path(out_dir) / "anchors.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: AnSS has not finished")
    selection: SavedSelection = torch.load(path, map_location="cpu", weights_only=True)
    return selection


def benchmark_sentence_kinds(
    data_root: str | Path, class_ids: list[int], sentences: list[list[str]]
) -> list[str | None] | None:
    """Per flat sentence, `descriptive` / `distractor` from a bundled benchmark's meta.json (None for
    sentences it does not list, e.g. templates); None when the dataset has no such labels."""
    meta_path = Path(data_root) / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        by_id = {int(c["id"]): {s["text"]: s["kind"] for s in c["sentences"]} for c in meta["classes"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    kinds: list[str | None] = []
    for cid, pool in zip(class_ids, sentences):
        known = by_id.get(int(cid), {})
        kinds.extend(known.get(s) for s in pool)
    return kinds if any(k is not None for k in kinds) else None


def anss_precision(selection: AnchorSelection, kinds: list[str | None]) -> dict[str, float]:
    """Fraction of chosen anchors that are descriptive, among anchors whose kind is known, against the
    fraction in the whole corpus (what a random pick would get)."""
    chosen = [kinds[i] for i in selection.indices[selection.mask].tolist() if kinds[i] is not None]
    known = [k for k in kinds if k is not None]
    return {
        "precision": sum(k == "descriptive" for k in chosen) / max(1, len(chosen)),
        "corpus_descriptive_fraction": sum(k == "descriptive" for k in known) / max(1, len(known)),
        "anchors_with_known_kind": len(chosen),
    }


def describe(selection: AnchorSelection, offsets: np.ndarray) -> str:
    """One log line: how many classes are padded."""
    counts = np.diff(np.asarray(offsets))
    padded = int((counts < selection.indices.shape[1]).sum())
    return (
        f"AnSS ({selection.mode}): {selection.indices.shape[0]} classes x M={selection.indices.shape[1]}, "
        f"{padded} classes padded (fewer sentences than M), {len(selection.fallback_classes)} fell back to "
        f"corpus order (no reference images)"
    )


def reference_subset(dataset: ImageListDataset, max_per_class: int) -> Subset[tuple[Any, int]]:
    """The first `max_per_class` images of every class, in dataset order (deterministic)."""
    taken: dict[int, int] = {}
    keep = []
    for i, y in enumerate(dataset.labels.tolist()):
        if max_per_class <= 0 or taken.get(y, 0) < max_per_class:
            taken[y] = taken.get(y, 0) + 1
            keep.append(i)
    return Subset(dataset, keep)


def reference_features(
    clip: open_clip.CLIP, dataset: ImageListDataset, cfg: Config, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw image features and labels of the AnSS reference set (eval preprocessing).

    The original's iNat variant fed train images through the sampler with train-time augmentation; a fixed,
    unaugmented set makes the scores reproducible and is used for every dataset here.
    """
    subset = reference_subset(dataset, cfg.anss.max_images_per_class)
    loader = eval_loader(subset, cfg.eval.batch_size, cfg.data.num_workers)
    clip.eval()
    return encode_images(clip.encode_image, loader, device=device, desc="AnSS reference images", total=len(loader))


def run_anss(cfg: Config, inputs: PreparedInputs, stage1: Stage1Result, out_dir: Path, env: DistEnv) -> SavedSelection:
    """Select the anchors (or reload them when AnSS already finished); returns :func:`load_selection`'s dict."""
    out_dir = Path(out_dir)
    if (out_dir / "done.json").is_file():
        return load_selection(out_dir)
    check_sentence_counts(inputs.offsets, inputs.class_names)
    if env.is_main:
        scores = None
        if cfg.anss.mode == "anss":
            ref = inputs.split(cfg.anss.reference_split)
            img, img_labels = reference_features(stage1.clip, ref, cfg, env.device)
            scores = score_sentences(
                stage1.text_features,
                sentence_labels(inputs.offsets),
                img,
                img_labels,
                float(np.exp(stage1.logit_scale)),
                chunk_size=cfg.anss.chunk_size,
                progress=True,
            )
        selection = select_anchors(
            inputs.offsets,
            cfg.anss.num_anchors,
            mode=cfg.anss.mode,
            scores=scores,
            seed=derive_seed(cfg.run.seed, "anss-rand"),
        )
        log.info(describe(selection, inputs.offsets))
        anchors = gather_anchors(stage1.text_features, selection)
        save_selection(out_dir, selection, anchors, inputs.flat_sentences, inputs.class_names, scores)
        done: dict[str, Any] = {"mode": cfg.anss.mode, "reference_split": cfg.anss.reference_split}  # done.json
        kinds = benchmark_sentence_kinds(cfg.data.root, inputs.class_ids, inputs.sentences)
        if kinds is not None:
            done["precision"] = anss_precision(selection, kinds)
            log.info(
                "AnSS precision (descriptive anchors): %.3f (corpus: %.3f)",
                done["precision"]["precision"],
                done["precision"]["corpus_descriptive_fraction"],
            )
        atomic_write_json(done, out_dir / "done.json")
    barrier()
    return load_selection(out_dir)
