"""Datasets, class names, class text, samplers and transforms for long-tailed training.

Names are imported on first use, so that `vlltr.training.data.errors` (used by the benchmark generators and
their worker processes) does not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataError": "errors",
    "load_class_names": "classes",
    "load_heldout": "classes",
    "trained_class_ids": "classes",
    "ImageListDataset": "datasets",
    "build_split": "datasets",
    "build_train_val_test": "datasets",
    "make_sampler": "samplers",
    "CLIP_TEMPLATES": "text",
    "SIMPLE_TEMPLATES": "text",
    "class_sentences": "text",
    "load_class_texts": "text",
    "parse_wiki_text": "text",
    "split_sentences": "text",
    "tokenize_class_texts": "text",
    "eval_transform": "transforms",
    "preprocess_spec": "transforms",
    "train_transform": "transforms",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
