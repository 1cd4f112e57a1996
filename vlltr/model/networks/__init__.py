"""The networks: an open_clip backbone factory, the stage-1 CVLP wrapper and the LGR head.

Imports torch and open_clip; never `vlltr.training` or `vlltr.service`.
"""

from vlltr.errors import UnknownArchitectureError
from vlltr.model.networks.classifier import VLLTRClassifier
from vlltr.model.networks.factory import (
    clip_dims,
    create_clip,
    get_tokenizer,
    list_architectures,
)
from vlltr.model.networks.head import LGRHead, calibrated_probabilities, fuse_probabilities
from vlltr.model.networks.stage1 import CVLP

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
