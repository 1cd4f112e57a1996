"""The same ONNX model hosted by LitServe with its own dynamic batching, configured as its documentation shows.

    python -m bench.serving.litserve_peer --bundle BUNDLE_DIR --port 8200 [--max-batch-size 32] [--provider cuda]

Requests are JSON `{"image": base64 JPEG}`, the request format of LitServe's image-classification recipe
(LitServe 0.2.19 cannot pass a multipart upload from its API process to its worker: pickling the form fails
with "Pickling an AuthenticationString object is disallowed"). `decode_request` decodes and preprocesses (the
service's preprocessing, so both see the same pixels), `batch` stacks, `predict` runs the bundle's image encoder
and head, `unbatch`/`encode_response` return the top-k. Everything runs in LitServe's inference worker, which is
how LitServe's documented examples do it.
"""

from __future__ import annotations

import argparse
import base64
from typing import Any

import numpy as np
import onnxruntime as ort

from vlltr.model.runtime.bundle import load_bundle
from vlltr.model.runtime.predictor import probabilities
from vlltr.model.runtime.preprocess import decode_image, preprocess_image
from vlltr.service.core import top_k

try:
    import litserve as ls
except ImportError as exc:  # pragma: no cover - exercised only without the bench extra
    raise SystemExit("LitServe is not installed: pip install -e '.[bench]'") from exc

MAX_PIXELS = 40_000_000


class BundleAPI(ls.LitAPI):
    """The bundle's image encoder + head as a LitServe API (`POST /predict`, JSON `{"image": base64}`)."""

    def __init__(self, bundle_dir: str, provider: str = "cpu", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.bundle_dir = bundle_dir
        self.provider = provider

    def setup(self, device: str) -> None:
        """Load the bundle and create the encoder session (in LitServe's worker)."""
        self.bundle = load_bundle(self.bundle_dir)
        providers = (
            ["CUDAExecutionProvider", "CPUExecutionProvider"] if self.provider == "cuda" else ["CPUExecutionProvider"]
        )
        self.session = ort.InferenceSession(str(self.bundle.image_encoder_path), providers=providers)
        self.table = self.bundle.class_table()

    def decode_request(self, request: dict) -> np.ndarray:
        """Base64 JPEG -> preprocessed pixels `[3, S, S]`."""
        data = base64.b64decode(request["image"])
        return preprocess_image(decode_image(data, max_pixels=MAX_PIXELS), self.bundle.preprocess)

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        """Stack decoded images into one batch."""
        return np.stack(inputs)

    def predict(self, x: np.ndarray) -> list[list[dict[str, Any]]]:
        """Encoder, head and top-5 for a batch (or a single image)."""
        if x.ndim == 3:  # max_batch_size=1: LitServe passes one item, not a batch
            x = x[None]
        feats = self.session.run(["features"], {"pixels": np.ascontiguousarray(x, dtype=np.float32)})[0]
        b = self.bundle
        probs = probabilities(feats, b.head, self.table, b.log_prior, b.calibration, b.alpha)
        idx, vals = top_k(probs, 5)
        names = self.table.names
        return [
            [{"label": names[i], "score": float(s), "class_id": int(i)} for i, s in zip(r_i, r_v)]
            for r_i, r_v in zip(idx.tolist(), vals.tolist())
        ]

    def unbatch(self, output: list) -> list:
        """One result per request."""
        return output

    def encode_response(self, output: Any) -> dict[str, Any]:
        """The JSON answer."""
        if output and isinstance(output[0], list):  # unbatched single item (max_batch_size=1)
            output = output[0]
        return {"predictions": output}


def main() -> None:
    """Run the LitServe server."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--port", type=int, default=8200)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-timeout", type=float, default=0.005)
    parser.add_argument("--provider", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    api = BundleAPI(args.bundle, args.provider, max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout)
    server = ls.LitServer(api, accelerator=args.provider, workers_per_device=1, timeout=600)
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
