"""`python -m bench.serving`: the serving benchmark, every table in one run.

    python -m bench.serving                 # full run (~25 min on 2 CPU cores): docs/benchmarks/serving.{md,json,png}
    python -m bench.serving --quick         # same tables, short cells and the demo model only (a few minutes)
    python -m bench.serving --smoke --demo-bundle B --demo-run R --out DIR   # seconds-long cells (tests)
    python -m bench.serving --report-only   # rewrite serving.md/.png from serving.json (no measuring)

On the same bundles and machine, in one run: the in-process ceilings (ONNX Runtime on preprocessed tensors at
every batch size; and end to end, the same JPEGs decoded, preprocessed, encoded and scored by the service's
code in 1 and 2 worker processes), the service over HTTP at concurrency 1/32/64 with `--workers 1`, then
`--workers 2`, then `--workers 1` again (the run-to-run noise), the service with batching off, a hand-written
FastAPI + PyTorch server, LitServe hosting the same ONNX model with its own batching, cache hits, latency at
100 to 50,000 classes and the effect of adding classes under load. Load comes from wrk (closed loop,
distinct 640x480 JPEG files, a LuaJIT script), and one cell measures Locust against it. Nothing is
installed at run time: a missing wrk or peer framework stops the run with the install hint.
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
from bench.serving.load import GENERATORS, describe_generator
from bench.serving.machine import describe, load_average
from bench.serving.report import write_json, write_markdown, write_plot
from bench.serving.servers import MissingPeerError, require, service_supports_workers
from bench.serving.suite import run_model
from bench.serving.targets import compute_targets
from bench.serving.wrk import wrk_path
from vlltr.service.settings import default_cache_dir

log = logging.getLogger("bench.serving")
REPO = Path(__file__).resolve().parents[2]


def plan(args: argparse.Namespace) -> dict[str, Any]:
    """Durations and sweeps for the chosen mode."""
    if args.smoke:
        return {
            "small": cells.Timing(1.0, 1.0),  # wrk runs whole seconds
            "realistic": cells.Timing(1.0, 3.0),
            "concurrencies": [1, 4],
            "target_c": 4,
            "images": 16,
            "class_sizes": [100, 1000],
            "growth_c": [1],
            "ceiling_s": 0.3,
            "e2e_s": 0.5,
            "e2e_warmup_s": 0.2,
            "cache_c": [1],
            "add_c": 4,
        }
    if args.quick:
        return {
            "small": cells.Timing(2.0, 6.0),
            "realistic": cells.Timing(8.0, 15.0),
            "concurrencies": [1, 32, 64],
            "target_c": 32,
            "images": 128,
            "class_sizes": [100, 1000, 10000, 50000],
            "growth_c": [1],
            "ceiling_s": 1.0,
            "e2e_s": 4.0,
            "cache_c": [1, 32],
            "add_c": 8,
        }
    return {
        "small": cells.Timing(3.0, 12.0),
        "realistic": cells.Timing(10.0, 40.0),
        "concurrencies": [1, 32, 64],
        "target_c": 32,
        "images": 256,
        "class_sizes": [100, 1000, 10000, 50000],
        "growth_c": [1, 32],
        "ceiling_s": 1.5,
        "e2e_s": 10.0,  # twice that for the realistic model
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
    parser.add_argument(
        "--load-generator",
        choices=GENERATORS,
        default="wrk",
        help="what drives every load cell (default wrk; locust is what earlier reports used)",
    )
    parser.add_argument(
        "--workers",
        default="1,2",
        help="comma list of `vlltr serve --workers` counts swept at every concurrency (default 1,2)",
    )
    parser.add_argument(
        "--variant-workers",
        type=int,
        default=1,
        help="front-end processes of the other service tables (batching off, cache, classes, ...; default 1)",
    )
    parser.add_argument("--name", default="serving", help="basename of the output files")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="measure nothing: rewrite the .md and .png from the existing .json in --out",
    )
    parser.add_argument(
        "--only-explain",
        action="store_true",
        help="measure only the explanations table on the small model and merge it into the existing .json",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.only_explain:
        return _only_explain(args)
    if args.report_only:
        results = json.loads((args.out / f"{args.name}.json").read_text())
        write_markdown(results, args.out / f"{args.name}.md", write_plot(results, args.out, args.name))
        return 0
    try:
        require("locust", "Locust (the load-generator comparison)")
        require("litserve", "LitServe")
    except MissingPeerError as exc:
        print(f"python -m bench.serving: {exc}", file=sys.stderr)
        return 2
    if args.load_generator == "wrk" and wrk_path() is None:
        print("python -m bench.serving: wrk is not installed (Debian/Ubuntu: apt-get install wrk)", file=sys.stderr)
        return 2
    worker_counts = sorted({int(w) for w in args.workers.split(",")} | {1})
    if args.variant_workers != 1 and not service_supports_workers():
        print(
            "python -m bench.serving: vlltr serve has no --workers flag here "
            f"(--variant-workers {args.variant_workers})",
            file=sys.stderr,
        )
        return 2
    models = (args.models or ("demo" if args.quick or args.smoke else "demo,vit")).split(",")
    p = dict(plan(args), worker_counts=worker_counts, e2e_workers=[1, 2], variant_workers=args.variant_workers)
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
        "load_generator": describe_generator(args.load_generator)["text"],
        "workers_flag": service_supports_workers(),
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
        ctx = cells.Context(work=work, images=images, timing=timing, service_flags=flags, generator=args.load_generator)
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
            "not measured" if t["met"] is None else "met" if t["met"] else "MISSED",
        )
    return 0


def _only_explain(args: argparse.Namespace) -> int:
    """The explanations table alone, merged into the existing report (it says when and under which load)."""
    if wrk_path() is None:
        print("python -m bench.serving: wrk is not installed (Debian/Ubuntu: apt-get install wrk)", file=sys.stderr)
        return 2
    results = json.loads((args.out / f"{args.name}.json").read_text())
    p = plan(args)
    work = args.work.expanduser()
    work.mkdir(parents=True, exist_ok=True)
    images = work / "images"
    write_jpegs(images, p["images"])
    if args.demo_bundle is not None:
        small = BenchBundle("demo", args.demo_bundle, args.demo_run or args.demo_bundle)
    else:
        small = demo_bundle(work)
    ctx = cells.Context(
        work=work, images=images, timing=p["small"], service_flags=("--provider", args.provider), generator="wrk"
    )
    before = load_average()
    explain = cells.explain_cost(small, ctx, p["cache_c"])
    explain["note"] = (
        f"Measured apart from the rest of this page (`{' '.join(['python -m bench.serving', *(argv_of(args))])}`), "
        f"load average {before} at start and {load_average()} at end: compare the two columns, not the numbers "
        "with the tables above."
    )
    results["models"].setdefault(small.label, {})["explain"] = explain
    write_json(results, args.out / f"{args.name}.json")
    write_markdown(results, args.out / f"{args.name}.md", write_plot(results, args.out, args.name))
    return 0


def argv_of(args: argparse.Namespace) -> list[str]:
    """The flags of an `--only-explain` run, as typed."""
    out = ["--only-explain"]
    if args.quick:
        out.append("--quick")
    if args.demo_bundle is not None:
        out += ["--demo-bundle", str(args.demo_bundle)]
    return out


if __name__ == "__main__":
    raise SystemExit(main())
