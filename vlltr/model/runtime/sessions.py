"""ONNX Runtime sessions for the bundle's image and text encoders, on CUDA only when CUDA is really active.

onnxruntime-gpu on a machine without a usable GPU logs an error and quietly runs on CPU, so the provider
in use is read back from the session (`get_providers()[0]`) after creation:
- `cuda`: the session must run on CUDAExecutionProvider (small shape computations may still run on CPU, as
  ONNX Runtime places them there on purpose); otherwise `ProviderError` says what was active;
- `auto`: CUDA when the build offers it and a session really gets it, otherwise CPU, logged either way;
- `cpu`: CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort

from vlltr.errors import BundleError, ProviderError
from vlltr.model.runtime.tokenizer import ClipTokenizer

log = logging.getLogger(__name__)

ProviderName = Literal["auto", "cuda", "cpu"]
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
CUDA_OPTIONS = {"cudnn_conv_algo_search": "HEURISTIC", "do_copy_in_default_stream": "1"}


def _options(threads: int | None, *, cpu_fp16: bool = False, spinning: bool = False) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    # onnxruntime 1.31's CPU session crashes (segfault) optimising float16 graphs at ORT_ENABLE_ALL; the
    # layout level below it is fine and already includes the fusions that matter for these graphs.
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_LAYOUT if cpu_fp16 else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    )
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    # ONNX Runtime's intra-op threads spin between runs by default. In a server they share the cores with
    # the decode pool, the event loop and the clients, and the spinning takes CPU the decoders need; the
    # serving benchmark measures both (docs/benchmarks/serving.md).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return opts


def create_session(
    path: str | Path,
    provider: ProviderName = "auto",
    threads: int | None = None,
    *,
    fp16: bool = False,
    spinning: bool = False,
) -> tuple[ort.InferenceSession, str]:
    """An inference session for `path` and the provider it really runs on (`"cuda"` or `"cpu"`).

    Args:
        path: ONNX file.
        provider: `auto`, `cuda` or `cpu` (see the module docstring).
        threads: intra-op threads; None or 0 lets onnxruntime choose.
        fp16: the graph computes in float16 (a bundle with precision fp16); changes CPU optimisation level.
        spinning: let the intra-op threads spin between runs (off: they sleep, leaving the cores to others).

    Raises:
        ProviderError: `cuda` requested but unavailable or not active.
        BundleError: onnxruntime cannot load the graph (on CPU).
        ValueError: unknown provider name.
    """
    if provider not in ("auto", "cuda", "cpu"):
        raise ValueError(f"provider must be auto, cuda or cpu, got {provider!r}")
    path = str(path)
    available = ort.get_available_providers()
    if provider in ("auto", "cuda") and CUDA in available:
        strict = provider == "cuda"
        # No "session.disable_cpu_ep_fallback" for strict mode: ONNX Runtime refuses it with the CPU provider
        # listed ("Conflicting session configuration"), and without it whenever a node lands on CPU, which the
        # CUDA provider does on purpose for the small shape computations of dynamic-batch graphs. Strict mode
        # checks below that CUDA is the session's first provider instead.
        try:
            session = ort.InferenceSession(
                path, _options(threads, spinning=spinning), providers=[(CUDA, CUDA_OPTIONS), CPU]
            )
        except Exception as exc:
            if strict:
                raise ProviderError(f"cuda requested but the CUDA session failed to start: {exc}") from exc
            log.warning("CUDA session for %s failed (%s); running on CPU", path, exc)
        else:
            active = session.get_providers()
            if active and active[0] == CUDA:
                log.info("%s runs on CUDA", Path(path).name)
                return session, "cuda"
            if strict:
                raise ProviderError(
                    f"cuda requested but CUDAExecutionProvider is not active; active providers: {active}"
                )
            log.warning("CUDA is installed but not active for %s (active providers: %s); running on CPU", path, active)
    elif provider == "cuda":
        raise ProviderError(
            f"cuda requested but this onnxruntime build has no CUDAExecutionProvider (available: {available}); "
            f"install onnxruntime-gpu instead of onnxruntime"
        )
    elif provider == "auto":
        log.info("no CUDAExecutionProvider in this onnxruntime build (available: %s); running on CPU", available)
    try:
        session = ort.InferenceSession(path, _options(threads, cpu_fp16=fp16, spinning=spinning), providers=[CPU])
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable or invalid graphs
        raise BundleError(f"{Path(path).name}: onnxruntime cannot load it ({exc})") from exc
    return session, "cpu"


class _Encoder:
    input_name: str

    def __init__(
        self,
        path: str | Path,
        provider: ProviderName,
        threads: int | None,
        input_name: str,
        fp16: bool,
        spinning: bool = False,
    ) -> None:
        self.session, self.provider = create_session(path, provider, threads, fp16=fp16, spinning=spinning)
        self.threads = int(threads) if threads else None  # intra-op threads asked for (None: onnxruntime's choice)
        inputs = {i.name: i for i in self.session.get_inputs()}
        if input_name not in inputs:
            raise BundleError(f"{Path(path).name}: expected input {input_name!r}, the graph has {sorted(inputs)}")
        outputs = [o.name for o in self.session.get_outputs()]
        if "features" not in outputs:
            raise BundleError(f"{Path(path).name}: expected output 'features', the graph has {outputs}")
        self.input_name = input_name
        self._input = inputs[input_name]

    def _run(self, x: np.ndarray) -> np.ndarray:
        # onnxruntime is untyped: its outputs come back as Any.
        features: np.ndarray = self.session.run(["features"], {self.input_name: x})[0].astype(np.float32, copy=False)
        return features


class ImageEncoder(_Encoder):
    """`pixels` float32 `[N, 3, S, S]` (preprocessed) -> raw image features `[N, D]`."""

    def __init__(
        self,
        path: str | Path,
        provider: ProviderName = "auto",
        threads: int | None = None,
        *,
        fp16: bool = False,
        spinning: bool = False,
    ) -> None:
        super().__init__(path, provider, threads, "pixels", fp16, spinning)
        shape = self._input.shape
        self.image_size = shape[-1] if len(shape) == 4 and isinstance(shape[-1], int) else None

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """Features of a preprocessed batch; a wrong shape raises ValueError before running."""
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        if pixels.ndim != 4 or pixels.shape[1] != 3 or (self.image_size and pixels.shape[2:] != (self.image_size,) * 2):
            raise ValueError(f"pixels must be [N, 3, {self.image_size}, {self.image_size}], got {pixels.shape}")
        if pixels.shape[0] == 0:
            return np.zeros((0, self.session.get_outputs()[0].shape[-1]), dtype=np.float32)
        return self._run(pixels)


class TextEncoder(_Encoder):
    """Texts -> raw text features `[N, D]`, tokenised exactly as open_clip does."""

    def __init__(
        self,
        path: str | Path,
        tokenizer: ClipTokenizer,
        provider: ProviderName = "auto",
        threads: int | None = None,
        *,
        batch_size: int = 64,
        fp16: bool = False,
        spinning: bool = False,
    ) -> None:
        super().__init__(path, provider, threads, "tokens", fp16, spinning)
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        length = self._input.shape[1] if len(self._input.shape) == 2 else None
        if isinstance(length, int) and length != tokenizer.context_length:
            raise BundleError(
                f"{Path(path).name} takes {length} tokens, the tokenizer makes {tokenizer.context_length}"
            )

    def encode_tokens(self, tokens: np.ndarray) -> np.ndarray:
        """Features of token rows `[N, L]` int64."""
        tokens = np.ascontiguousarray(tokens, dtype=np.int64)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [N, L], got {tokens.shape}")
        if tokens.shape[0] == 0:
            return np.zeros((0, self.session.get_outputs()[0].shape[-1]), dtype=np.float32)
        return self._run(tokens)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Features of texts, `[N, D]`, run in batches of `batch_size`."""
        tokens = self.tokenizer(list(texts))
        if tokens.shape[0] == 0:
            return np.zeros((0, self.session.get_outputs()[0].shape[-1]), dtype=np.float32)
        return np.concatenate(
            [self.encode_tokens(tokens[i : i + self.batch_size]) for i in range(0, tokens.shape[0], self.batch_size)]
        )
