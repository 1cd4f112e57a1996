"""`python -m bench.serving.gpu`: the serving tables on one NVIDIA GPU, fp32 and fp16, in about 6 minutes.

    python -m bench.serving.gpu [--out docs/benchmarks] [--work DIR]

Writes `serving-gpu.json` and `serving-gpu.md` (named with the card) next to the CPU report. With
`onnxruntime-gpu` installed (the `gpu` extra instead of `cpu`), the ceiling, the service (`--provider cuda`)
and LitServe run on ONNX Runtime's CUDA provider, and the hand-written server runs PyTorch on the GPU. Without
it, only the PyTorch numbers can be measured on the GPU: the script then measures the encoder through
PyTorch (fp32 and fp16) and the hand-written server, and the report says so in its first lines.

The JSON is rewritten after each model (fp32, then the demo model, then fp16), so a run stopped early (a
machine rented by the minute) still leaves the models measured so far and, once the demo model is in, the
targets.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.findings import read_findings
from bench.serving import cells
from bench.serving.bundles import BenchBundle, demo_bundle, random_init_bundle
from bench.serving.images import write_jpegs
from bench.serving.load import describe_generator
from bench.serving.machine import describe, load_average
from bench.serving.report import GPU_NAME, write_json, write_markdown, write_plot
from bench.serving.servers import MissingPeerError, require
from bench.serving.suite import run_model
from bench.serving.targets import compute_targets
from bench.serving.wrk import wrk_path
from vlltr.service.settings import default_cache_dir

log = logging.getLogger("bench.serving.gpu")
REPO = Path(__file__).resolve().parents[2]
# Sized so that building the three bundles (about 2 minutes on 16 cores) and measuring them fit in 6.5
# minutes, a short slot on a rented GPU machine: 18 server starts and 23 load cells, so the
# cells are short (a GPU answers hundreds of requests per second, so 3 s still holds hundreds of them) and
# the sweep keeps 1 and the target concurrency. The --workers sweeps (2 and 1 again), the end-to-end
# ceiling (4 points) and the load-generator comparison came later: per model they add 2 server starts,
# 4 load cells and 4 short worker-process runs (2 more cells for the demo model), not yet timed on a GPU.
PLAN: dict[str, Any] = {
    "small": cells.Timing(1.0, 3.0),
    "realistic": cells.Timing(1.0, 3.0),
    "concurrencies": [1, 32],
    "target_c": 32,
    "images": 256,
    "ceiling_batches": [1, 8, 32, 128],
    "ceiling_s": 0.5,
    "e2e_s": 2.0,
    "e2e_workers": [1, 2],
    "worker_counts": [1, 2],
}


def gpu_name() -> str | None:
    """The first CUDA device's name, or None without one."""
    try:
        import torch

        if torch.cuda.is_available():
            return str(torch.cuda.get_device_name(0))
    except ImportError:
        pass
    return None


def ort_cuda_available() -> bool:
    """Whether this onnxruntime build can run on CUDA (checked again, per session, by the service)."""
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def torch_ceiling(bb: BenchBundle, batches: list[int], seconds: float) -> dict[str, Any]:
    """The image encoder through PyTorch on the GPU, fp32 and fp16 (autocast), per batch size."""
    import torch

    from vlltr.training.checkpoint import load_final_model

    model = load_final_model(bb.run, device="cuda").classifier.eval()
    size = int(bb.manifest()["preprocess"]["size"])
    out: dict[str, Any] = {"points": []}
    for precision in ("fp32", "fp16"):
        for bs in batches:
            x = torch.randn(bs, 3, size, size, device="cuda")
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=precision == "fp16"):
                model.image_features(x)
                torch.cuda.synchronize()
                runs, started = 0, time.perf_counter()
                while runs < 3 or time.perf_counter() - started < seconds:
                    model.image_features(x)
                    runs += 1
                torch.cuda.synchronize()
            took = time.perf_counter() - started
            out["points"].append(
                {
                    "session": f"pytorch {precision}",
                    "batch_size": bs,
                    "images_per_s": bs * runs / took,
                    "ms_per_batch": 1000 * took / runs,
                    "runs": runs,
                }
            )
    out["best"] = max(out["points"], key=lambda p: p["images_per_s"])
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the GPU tables; 2 without a CUDA device or without the bench extra."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.serving.gpu", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks")
    parser.add_argument("--work", type=Path, default=default_cache_dir() / "bench-serving-gpu")
    parser.add_argument("--arch", default="ViT-B-16", help="open_clip architecture of the realistic model")
    parser.add_argument(
        "--render-only",
        action="store_true",
        help=f"rewrite the page and plot from <out>/{GPU_NAME}.json (e.g. a run stopped early); no GPU needed",
    )
    parser.add_argument(
        "--findings",
        type=Path,
        default=None,
        help="with --render-only: a text file of findings (one per paragraph) to store and show",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.render_only:
        path = args.out / f"{GPU_NAME}.json"
        results = json.loads(path.read_text())
        if args.findings is not None:
            results["findings"] = read_findings(args.findings)
            write_json(results, path)
        render(results, args.out)
        return 0
    name = gpu_name()
    if name is None:
        print(
            "python -m bench.serving.gpu: no CUDA device visible to PyTorch; run it on a GPU machine", file=sys.stderr
        )
        return 2
    # wrk where the machine has it (a system package); a leased machine without it gets Locust, which the
    # carried wheels bring, and the results say which drove the load.
    generator = "wrk" if wrk_path() else "locust"
    try:
        require("locust", "Locust")
        require("litserve", "LitServe")
    except MissingPeerError as exc:
        print(f"python -m bench.serving.gpu: {exc}", file=sys.stderr)
        return 2
    started = time.monotonic()
    work = args.work.expanduser()
    work.mkdir(parents=True, exist_ok=True)
    ort_cuda = ort_cuda_available()
    results: dict[str, Any] = {
        "command": " ".join(["python -m bench.serving.gpu", *(shlex.quote(a) for a in (argv or sys.argv[1:]))]),
        "mode": "gpu",
        "gpu": {"name": name, "onnxruntime_cuda": ort_cuda},
        "machine": describe(),
        "load_average_start": load_average(),
        "provider": "cuda" if ort_cuda else "cpu",
        "plan": {k: (v.__dict__ if isinstance(v, cells.Timing) else v) for k, v in PLAN.items()},
        "load_generator": describe_generator(generator)["text"],
        "models": {},
    }
    images = work / "images"
    write_jpegs(images, PLAN["images"])
    fp32 = random_init_bundle(work, args.arch)
    notes: list[str] = []
    args.out.mkdir(parents=True, exist_ok=True)

    def fp16_bundle() -> BenchBundle | None:
        """The fp16 bundle, or None (the reason goes into the results) when the exporter refuses it."""
        try:
            return random_init_bundle(work, args.arch, fp16=True)
        except Exception as exc:  # the exporter refuses fp16 when it disagrees with fp32 (message has the numbers)
            results["fp16_refused"] = str(exc)
            notes.extend([f"**fp16 bundle refused by the exporter**: {exc}", ""])
            return None

    if ort_cuda:
        small = demo_bundle(work)
        # fp16 last and its bundle built only then: the fp32 and demo tables, which the targets need, come first.
        models: list[tuple[Callable[[], BenchBundle | None], bool, cells.Timing]] = [
            (lambda: fp32, False, PLAN["realistic"]),
            (lambda: small, True, PLAN["small"]),
            (fp16_bundle, False, PLAN["realistic"]),
        ]
        for make, is_small, timing in models:
            bb = make()
            if bb is None:
                continue
            ctx = cells.Context(
                work=work, images=images, timing=timing, service_flags=("--provider", "cuda"), generator=generator
            )
            plan = dict(PLAN, class_sizes=[1000, 50000], growth_c=[1], cache_c=[1], add_c=8)
            results["models"][bb.label] = run_model(
                bb, ctx, plan, small=is_small, ceiling_s=PLAN["ceiling_s"], provider="cuda"
            )
            if small.label in results["models"]:
                results["targets"] = compute_targets(results, small.label, fp32.label, str(PLAN["target_c"]))
            # Written after each model, so that a run stopped early keeps what it measured.
            write_json(
                dict(
                    results,
                    elapsed_s=round(time.monotonic() - started, 1),
                    partial=True,
                    notes=notes,
                    load_average_end=load_average(),
                ),
                args.out / f"{GPU_NAME}.json",
            )
    else:
        notes += [
            "**onnxruntime-gpu is not installed here**: the ONNX Runtime rows could not run on the GPU. "
            "Below, the image encoder runs through PyTorch on the GPU (fp32 and fp16 autocast), and the "
            "hand-written PyTorch server runs on the GPU; no service or LitServe rows.",
            "",
        ]
        for bb in (fp32,):
            ctx = cells.Context(work=work, images=images, timing=PLAN["realistic"], generator=generator)
            ceiling = torch_ceiling(bb, PLAN["ceiling_batches"], PLAN["ceiling_s"])
            results["models"][bb.label + "-pytorch"] = {
                "ceiling": ceiling,
                "handwritten": cells.handwritten(bb, ctx, 32, device="cuda"),
            }
        results["targets"] = {}
    results["load_average_end"] = load_average()
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    results["notes"] = notes
    write_json(results, args.out / f"{GPU_NAME}.json")
    render(results, args.out)
    log.info("done in %.0f s on %s", results["elapsed_s"], name)
    return 0


def render(results: dict[str, Any], out: Path) -> None:
    """Write the page (and plot) of a GPU run's results; a run stopped early (`partial`) says so first."""
    name = results["gpu"]["name"]
    notes = list(results.get("notes", []))
    if results.get("partial"):
        done = ", ".join(results["models"]) or "none"
        notes = [
            f"**This run stopped at its time limit after {results.get('elapsed_s')} s**: the models measured "
            f"completely or in part are {done}; a model's missing rows were not measured.",
            "",
            *notes,
        ]
    if results.get("findings"):
        notes = [*notes, "## Findings", "", *(f"- {f}" for f in results["findings"]), ""]
    if results["gpu"].get("onnxruntime_cuda"):
        plots = write_plot(results, out, GPU_NAME)
        write_markdown(
            results, out / f"{GPU_NAME}.md", plots, notes=[f"GPU: **{name}** (ONNX Runtime CUDA provider).", "", *notes]
        )
    else:
        (out / f"{GPU_NAME}.md").write_text(
            "\n".join(
                [
                    f"# Serving benchmark on {name}",
                    "",
                    *notes,
                    "```json",
                    json.dumps(results["models"], indent=1),
                    "```",
                    "",
                ]
            )
        )


if __name__ == "__main__":
    raise SystemExit(main())
