"""Build open_clip models by architecture name, with the project's tiny configs registered.

Any architecture open_clip knows works (`RN50`, `ViT-B-16`, ...). `pretrained` is either an open_clip tag
(`openai`, `laion2b_s34b_b88k`: downloads, so it needs network) or a path to a local checkpoint file
(a state dict saved with `torch.save`, or an open_clip / OpenAI checkpoint).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import open_clip
import torch

from vlltr.errors import MissingFileError, UnknownArchitectureError

log = logging.getLogger(__name__)

PROJECT_CONFIG_DIR = Path(__file__).parent / "configs"
_registered = False


def _register_project_configs() -> None:
    # open_clip keeps a module-level registry; adding our folder once makes the tiny configs first-class names.
    global _registered
    if not _registered:
        open_clip.add_model_config(PROJECT_CONFIG_DIR)
        _registered = True


def list_architectures() -> list[str]:
    """All architecture names usable with :func:`create_clip` (open_clip's plus the project's tiny ones)."""
    _register_project_configs()
    names: list[str] = open_clip.list_models()
    return names


def project_architectures() -> list[str]:
    """The tiny architectures shipped with the project (CPU tests and the demo)."""
    return sorted(p.stem for p in PROJECT_CONFIG_DIR.glob("*.json"))


def create_clip(
    arch: str,
    pretrained: str | None = None,
    *,
    quick_gelu: bool = False,
    device: str | torch.device = "cpu",
) -> open_clip.CLIP:
    """Create an open_clip CLIP model.

    Args:
        arch: architecture name, see :func:`list_architectures`.
        pretrained: None (random init), an open_clip pretrained tag, or a local checkpoint file path.
        quick_gelu: force QuickGELU (OpenAI weights need it; open_clip sets it itself for `openai` tags).
        device: where to put the model.

    Raises:
        UnknownArchitectureError: the name is not registered; the message lists close matches.
        MissingFileError: `pretrained` looks like a path but does not exist (a FileNotFoundError).
    """
    known = list_architectures()
    if arch not in known:
        close = [k for k in known if arch.lower().replace("/", "-") in k.lower()][:10]
        hint = f" Close matches: {close}." if close else ""
        raise UnknownArchitectureError(
            f"unknown architecture {arch!r}.{hint} Known: {len(known)} names, see `vlltr models` "
            f"or model.list_architectures()."
        )
    if pretrained and _looks_like_path(pretrained) and not os.path.isfile(pretrained):
        raise MissingFileError(f"pretrained checkpoint {pretrained!r} does not exist")
    if pretrained and not _looks_like_path(pretrained):
        tags = open_clip.list_pretrained_tags_by_model(arch)
        if pretrained not in tags:
            raise ValueError(
                f"pretrained tag {pretrained!r} is not known for {arch!r}; known tags: {tags}, "
                f"or give the path of a local checkpoint file"
            )
    model = open_clip.create_model(
        arch,
        pretrained=pretrained or None,
        force_quick_gelu=quick_gelu,
        device=device,
        pretrained_text=False,
    )
    if not pretrained:
        log.info("created %s with random initialisation", arch)
    return model


def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.endswith((".pt", ".pth", ".bin", ".safetensors")) or os.path.exists(value)


@dataclass(frozen=True)
class ClipDims:
    """The sizes of a CLIP model that the head, the exporter and the tokenizer need."""

    embed_dim: int
    image_size: int
    context_length: int
    vocab_size: int


def clip_dims(model: open_clip.CLIP) -> ClipDims:
    """Read embed dim, input size, context length and vocabulary size off a built model."""
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    embed_dim = int(model.text_projection.shape[1])
    return ClipDims(
        embed_dim=embed_dim,
        image_size=int(size),
        context_length=int(model.context_length),
        vocab_size=int(model.vocab_size),
    )


class Tokenizer(Protocol):
    """What open_clip's tokenizers have in common: texts to a `[N, context_length]` tensor of token ids."""

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor: ...


def get_tokenizer(arch: str) -> Tokenizer:
    """open_clip's tokenizer for `arch` (the CLIP BPE for all CLIP-style models)."""
    _register_project_configs()
    tokenizer: Tokenizer = open_clip.get_tokenizer(arch)
    return tokenizer
