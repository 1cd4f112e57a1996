"""`python -m bench.serving`: the serving benchmark, every table in one run.

    python -m bench.serving                 # full run (~25 min on 2 CPU cores): docs/benchmarks/serving.{md,json,png}
    python -m bench.serving --quick         # same tables, short cells and the demo model only (a few minutes)
    python -m bench.serving --smoke --demo-bundle B --demo-run R --out DIR   # seconds-long cells (tests)
    python -m bench.serving --report-only   # rewrite serving.md/.png from serving.json (no measuring)

On the same bundles and machine, in one run: the in-process ceiling (ONNX Runtime on preprocessed tensors,
every batch size), the service over HTTP at concurrency 1/8/32/64, the service with batching off, a
hand-written FastAPI + PyTorch server, LitServe hosting the same ONNX model with its own batching, cache
hits, latency at 100 to 50,000 classes and the effect of adding classes under load. Load comes from Locust
(closed loop, distinct 640x480 JPEG files). Nothing is installed at run time: a missing peer framework
stops the run with the `pip install -e '.[bench]'` hint.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from bench.serving import cells
from bench.serving.bundles import BenchBundle, demo_bundle, random_init_bundle
from bench.serving.images import write_jpegs
from bench.serving.machine import describe, load_average
from bench.serving.report import write_json, write_markdown, write_plot
from bench.serving.servers import MissingPeerError, require
from bench.serving.suite import run_model
from bench.serving.targets import compute_targets
from vlltr.service.settings import default_cache_dir

log = logging.getLogger("bench.serving")
REPO = Path(__file__).resolve().parents[2]


def plan(args: argparse.Namespace) -> dict[str, Any]:
    """Durations and sweeps for the chosen mode."""
    if args.smoke:
        return {
            "small": cells.Timing(0.5, 2.0),
            "realistic": cells.Timing(1.0, 3.0),
            "concurrencies": [1, 4],
            "target_c": 4,
            "images": 16,
            "class_sizes": [100, 1000],
            "growth_c": [1],
            "ceiling_s": 0.3,
            "cache_c": [1],
            "add_c": 4,
        }
    if args.quick:
        return {
            "small": cells.Timing(2.0, 6.0),
            "realistic": cells.Timing(8.0, 15.0),
            "concurrencies": [1, 8, 32, 64],
            "target_c": 32,
            "images": 128,
            "class_sizes": [100, 1000, 10000, 50000],
            "growth_c": [1],
            "ceiling_s": 1.0,
            "cache_c": [1, 32],
            "add_c": 8,
        }
    return {
        "small": cells.Timing(3.0, 12.0),
        "realistic": cells.Timing(10.0, 40.0),
        "concurrencies": [1, 8, 32, 64],
        "target_c": 32,
        "images": 256,
        "class_sizes": [100, 1000, 10000, 50000],
        "growth_c": [1, 32],
        "ceiling_s": 1.5,
        "cache_c": [1, 32],
        "add_c": 8,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or `--report-only`); 0 on success, 2 when the bench extra is missing."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.serving", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="short cells, demo model only (development)")
    mode.add_argument("--smoke", action="store_true", help="seconds-long cells (tests; not a result)")
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "docs" / "benchmarks",
        help="where serving.md/.json/.png go (default docs/benchmarks)",
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=default_cache_dir() / "bench-serving",
        help="bundles, images, logs and raw load records (reused between runs)",
    )
    parser.add_argument(
        "--models", default=None, help="comma list of demo,vit (default: both; --quick and --smoke: demo)"
    )
    parser.add_argument(
        "--demo-bundle",
        type=Path,
        default=None,
        help="use this bundle as the small model instead of building the demo bundle",
    )
    parser.add_argument("--demo-run", type=Path, default=None, help="the run --demo-bundle was exported from")
    parser.add_argument("--realistic-arch", default="ViT-B-16", help="open_clip architecture of the realistic model")
    parser.add_argument(
        "--provider",
        choices=("cpu", "cuda"),
        default="cpu",
        help="ONNX Runtime provider for the ceiling and the service",
    )
    parser.add_argument("--name", default="serving", help="basename of the output files")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="measure nothing: rewrite the .md and .png from the existing .json in --out",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.report_only:
        results = json.loads((args.out / f"{args.name}.json").read_text())
        write_markdown(results, args.out / f"{args.name}.md", write_plot(results, args.out, args.name))
        return 0
    try:
        require("locust", "the Locust load generator")
        require("litserve", "LitServe")
    except MissingPeerError as exc:
        print(f"python -m bench.serving: {exc}", file=sys.stderr)
        return 2
    models = (args.models or ("demo" if args.quick or args.smoke else "demo,vit")).split(",")
    p = plan(args)
    started = time.monotonic()
    work = args.work.expanduser()
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "command": " ".join(
            ["python -m bench.serving", *(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))]
        ),
        "mode": "smoke" if args.smoke else "quick" if args.quick else "full",
        "machine": describe(),
        "load_average_start": load_average(),
        "provider": args.provider,
        "plan": {k: (v.__dict__ if isinstance(v, cells.Timing) else v) for k, v in p.items()},
        "load_generator": "locust (FastHttpUser, closed loop, one process)",
        "models": {},
    }
    images = work / "images"
    write_jpegs(images, p["images"])
    flags: tuple[str, ...] = ("--provider", args.provider)
    if args.demo_bundle is not None:
        small = BenchBundle("demo", args.demo_bundle, args.demo_run or args.demo_bundle)
    else:
        small = demo_bundle(work)
    realistic: BenchBundle | None = None
    if "vit" in models:
        realistic = random_init_bundle(work, args.realistic_arch)
    for label, bb, is_small, timing in (("demo", small, True, p["small"]), ("vit", realistic, False, p["realistic"])):
        if label not in models or bb is None:
            continue
        ctx = cells.Context(work=work, images=images, timing=timing, service_flags=flags)
        results["models"][bb.label] = run_model(
            bb, ctx, p, small=is_small, ceiling_s=p["ceiling_s"] * (1 if is_small else 2), provider=args.provider
        )
    results["targets"] = compute_targets(
        results, small.label, realistic.label if realistic else None, str(p["target_c"])
    )
    results["load_average_end"] = load_average()
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(results, args.out / f"{args.name}.json")
    plots = write_plot(results, args.out, args.name)
    write_markdown(results, args.out / f"{args.name}.md", plots)
    log.info("done in %.0f s: %s", results["elapsed_s"], args.out / f"{args.name}.md")
    for name, t in results["targets"].items():
        log.info(
            "target %s: %s (goal %s %s) %s",
            name,
            t["value"],
            t["comparison"],
            t["goal"],
            "met" if t["met"] else "MISSED",
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
