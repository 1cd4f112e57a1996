"""The networks: an open_clip backbone factory, the stage-1 CVLP wrapper and the LGR head.

`model/` imports torch and open_clip only; it never imports `training/` or `service/`.
"""

from model.factory import (
    UnknownArchitectureError,
    clip_dims,
    create_clip,
    get_tokenizer,
    list_architectures,
)
from model.head import LGRHead, calibrated_probabilities, fuse_probabilities
from model.stage1 import CVLP
from model.classifier import VLLTRClassifier

__all__ = [
    "CVLP",
    "LGRHead",
    "UnknownArchitectureError",
    "VLLTRClassifier",
    "calibrated_probabilities",
    "clip_dims",
    "create_clip",
    "fuse_probabilities",
    "get_tokenizer",
    "list_architectures",
]
