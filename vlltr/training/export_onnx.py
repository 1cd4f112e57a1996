"""ONNX export of a CLIP's image and text towers, their check against PyTorch, and fp16 conversion.

Graphs are written by the TorchScript exporter (`dynamo=False`, opset 17): one self-contained file per tower
with a dynamic batch axis.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import open_clip
import torch
from torch import nn

from vlltr.model.runtime.sessions import create_session

log = logging.getLogger(__name__)

OPSET = 17
# Ops kept in float32 inside an fp16 graph (casts around them are inserted by the converter): the
# converter's defaults (ops without fp16 kernels) plus the normalisations whose fp16 reductions drift.
FP16_OP_BLOCK_LIST = ("LayerNormalization", "Softmax")


class ImageTower(nn.Module):
    """`pixels [N, 3, S, S]` -> raw projected image features `[N, D]`."""

    def __init__(self, clip: open_clip.CLIP) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        features: torch.Tensor = self.clip.encode_image(pixels)  # open_clip is untyped
        return features


class TextTower(nn.Module):
    """`tokens [N, L]` (L = the context length) -> raw projected text features `[N, D]`."""

    def __init__(self, clip: open_clip.CLIP) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        features: torch.Tensor = self.clip.encode_text(tokens)  # open_clip is untyped
        return features


def _export(module: nn.Module, example: torch.Tensor, path: Path, input_name: str, dynamic: dict[int, str]) -> None:
    module.eval()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    # nn.MultiheadAttention's inference fast path is a fused op the ONNX exporter cannot translate.
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The TorchScript exporter warns about traced shape arithmetic it handles correctly.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (example,),
                str(path),
                input_names=[input_name],
                output_names=["features"],
                dynamic_axes={input_name: dynamic, "features": {0: "batch"}},
                opset_version=OPSET,
                dynamo=False,
                do_constant_folding=True,
            )
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    onnx.checker.check_model(str(path))


def export_image_encoder(clip: open_clip.CLIP, path: Path, image_size: int) -> None:
    """Write `image_encoder.onnx` (input `pixels`, output `features`, dynamic batch)."""
    example = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    _export(ImageTower(clip), example, path, "pixels", {0: "batch"})


def export_text_encoder(clip: open_clip.CLIP, path: Path, example_tokens: torch.Tensor) -> None:
    """Write `text_encoder.onnx` (input `tokens` int64 `[N, L]`, output `features`, dynamic batch).

    The sequence length stays the model's context length: traced through nn.MultiheadAttention, a shorter
    length would be baked into the graph's reshapes as a constant.
    """
    _export(TextTower(clip), example_tokens.long(), path, "tokens", {0: "batch"})


def max_relative_diff(reference: np.ndarray, other: np.ndarray) -> float:
    """`max |a - b| / max(1, max |a|)`: absolute for small features, relative for large ones."""
    scale = max(1.0, float(np.max(np.abs(reference)))) if reference.size else 1.0
    return float(np.max(np.abs(reference - other)) / scale) if reference.size else 0.0


@torch.no_grad()
def compare_image_encoder(clip: open_clip.CLIP, path: Path, pixels: np.ndarray) -> float:
    """Largest relative difference between onnxruntime (CPU) and PyTorch image features on `pixels`."""
    session, _ = create_session(path, "cpu")
    onnx_out = session.run(["features"], {"pixels": pixels.astype(np.float32)})[0]
    torch_out = clip.encode_image(torch.from_numpy(pixels)).numpy()
    return max_relative_diff(torch_out, onnx_out)


@torch.no_grad()
def compare_text_encoder(clip: open_clip.CLIP, path: Path, tokens: np.ndarray) -> float:
    """Largest relative difference between onnxruntime (CPU) and `clip.encode_text` on `tokens [N, L]`."""
    session, _ = create_session(path, "cpu")
    tokens = np.ascontiguousarray(tokens, dtype=np.int64)
    onnx_out = session.run(["features"], {"tokens": tokens})[0]
    torch_out = clip.encode_text(torch.from_numpy(tokens)).numpy()
    return max_relative_diff(torch_out, onnx_out)


def convert_to_fp16(src: Path, dst: Path, op_block_list: Sequence[str] = FP16_OP_BLOCK_LIST) -> None:
    """Write an fp16 copy of `src` with float32 inputs/outputs and `op_block_list` ops kept in float32.

    Uses onnxruntime's maintained fork of the onnxconverter-common converter: onnxconverter-common 1.16
    writes graphs onnxruntime rejects for open_clip towers (Cast-to-float nodes left casting to float32
    inside float16 regions, Identity nodes over deduplicated weights typed float32, and a clean-up pass that
    crashes when one Cast feeds several nodes).
    """
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.load(str(src))
    blocked = list(DEFAULT_OP_BLOCK_LIST) + [op for op in op_block_list if op not in DEFAULT_OP_BLOCK_LIST]
    # Its info log dumps every weight shared between fp32 and fp16 nodes (hundreds of lines for a ViT).
    converter_log = logging.getLogger("onnxruntime.transformers.float16")
    level = converter_log.level
    converter_log.setLevel(logging.WARNING)
    try:
        converted = convert_float_to_float16(model, keep_io_types=True, op_block_list=blocked)
    finally:
        converter_log.setLevel(level)
    buffer = io.BytesIO()
    onnx.save(converted, buffer)
    dst.write_bytes(buffer.getvalue())
