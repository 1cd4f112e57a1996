"""What a user would write by hand: a plain FastAPI endpoint running the PyTorch model per request.

    python -m bench.serving.handwritten --run RUN_DIR --port 8100 [--device cuda]

The run directory is a finished `vlltr train` run (or the benchmark's random-init run). Each request is read,
decoded and preprocessed with the training evaluation transform, and classified with the PyTorch model
(batch of one) in FastAPI's thread pool, the way the FastAPI and PyTorch tutorials put it together.
"""

from __future__ import annotations

import argparse
import io

import torch
import uvicorn
from fastapi import FastAPI, File, UploadFile
from PIL import Image

from vlltr.model.networks.head import calibrated_probabilities
from vlltr.model.runtime.head import log_prior_from_counts
from vlltr.model.runtime.manifest import Calibration
from vlltr.training.checkpoint import load_final_model
from vlltr.training.data.transforms import EvalTransform, preprocess_spec


def create_app(run_dir: str, device: str = "cpu") -> FastAPI:
    """The hand-written app: `POST /predict` (multipart `file`), `GET /health`."""
    run = load_final_model(run_dir, device=device)
    model = run.classifier.eval()
    transform = EvalTransform(
        preprocess_spec(
            run.config.data,
            int(model.clip.visual.image_size[0])
            if isinstance(model.clip.visual.image_size, (tuple, list))
            else int(model.clip.visual.image_size),
        )
    )
    counts = [int(c["train_count"]) for c in run.classes]
    log_prior = torch.from_numpy(log_prior_from_counts(counts)).to(device)
    names = [str(c["name"]) for c in run.classes]
    options = Calibration.from_dict(run.calibration).scoring_options()
    app = FastAPI()

    @app.get("/health")
    def health() -> dict:
        """Liveness (the model is loaded before the server starts)."""
        return {"ok": True}

    @app.post("/predict")
    def predict(file: UploadFile = File(...), top_k: int = 5) -> dict:  # noqa: B008 (FastAPI's idiom)
        """Decode, preprocess and classify one uploaded image."""
        img = Image.open(io.BytesIO(file.file.read()))
        x = transform(img).unsqueeze(0).to(device)
        with torch.inference_mode():
            z_vis, z_lin = model(x)
            probs = calibrated_probabilities(z_vis, z_lin, log_prior, alpha=run.alpha, **options)[0]
            scores, idx = probs.topk(min(top_k, probs.numel()))
            scores, idx = scores.cpu(), idx.cpu()
        return {
            "predictions": [
                {"label": names[i], "score": float(s), "class_id": int(i)}
                for s, i in zip(scores.tolist(), idx.tolist())
            ]
        }

    return app


def main() -> None:
    """Serve the hand-written app with uvicorn (one worker)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="finished run directory (model.pt, classes.json, ...)")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    args = parser.parse_args()
    uvicorn.run(
        create_app(args.run, args.device), host="127.0.0.1", port=args.port, log_level="warning", access_log=False
    )


if __name__ == "__main__":
    main()
