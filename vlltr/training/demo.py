"""The demo bundle the service serves when started without one: Digits-LT, the tiny config, exported.

Digits-LT is used because the whole build (benchmark, both stages, AnSS, calibration, evaluation, export)
fits in a couple of minutes on two CPU cores; Shapes-LT alone takes over a minute to draw and about five to
train. Every step is reused when already done, so an interrupted build continues and a finished bundle is
returned at once.

    python -m vlltr.training.demo --out BUNDLE_DIR [--work WORK_DIR]

The service runs this in a subprocess so that the server process never imports torch.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

log = logging.getLogger(__name__)

DEMO_BENCHMARK = "digits-lt"
DEMO_CONFIG = "digits-lt-tiny"
MANIFEST = "manifest.json"


def _benchmark(data_dir: Path) -> None:
    from vlltr.training.benchmarks import write_benchmark

    if not (data_dir / "meta.json").is_file():
        write_benchmark(DEMO_BENCHMARK, data_dir, seed=0)


def _train(data_dir: Path, run_dir: Path, overrides: list[str]) -> None:
    from vlltr.training.config import load_config
    from vlltr.training.pipeline import run_training

    cfg = load_config(DEMO_CONFIG, [f"data.root={data_dir}", *overrides])
    run_training(cfg, run_dir)


def _export(run_dir: Path, bundle_dir: Path) -> None:
    from vlltr.training.export import export_bundle

    export_bundle(run_dir, bundle_dir)


def build_demo_bundle(
    cache_dir: str | Path, *, out: str | Path | None = None, overrides: list[str] | None = None
) -> Path:
    """Build (or reuse) the demo bundle; returns its directory.

    Args:
        cache_dir: working directory for the benchmark (`data/`) and the training run (`run/`).
        out: where the bundle goes (default: `cache_dir/bundle`).
        overrides: `key=value` config overrides on top of the demo config (tests shorten the training).
    """
    cache_dir = Path(cache_dir).expanduser()
    bundle_dir = Path(out) if out is not None else cache_dir / "bundle"
    if (bundle_dir / MANIFEST).is_file():
        log.info("demo bundle already built in %s", bundle_dir)
        return bundle_dir
    data_dir, run_dir = cache_dir / "data", cache_dir / "run"
    steps: list[tuple[str, Callable[[], object]]] = [
        ("writing the Digits-LT benchmark", lambda: _benchmark(data_dir)),
        (
            "training (stage 1, AnSS, stage 2, calibration, evaluation)",
            lambda: _train(data_dir, run_dir, list(overrides or [])),
        ),
        ("exporting and verifying the bundle", lambda: _export(run_dir, bundle_dir)),
    ]
    with tqdm(total=len(steps), desc="demo bundle", unit="step", file=sys.stderr) as bar:
        for text, action in steps:
            bar.set_postfix_str(text)
            action()
            bar.update(1)
    return bundle_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="bundle directory to write")
    parser.add_argument(
        "--work",
        default=None,
        help="directory for the benchmark and the training run (default: OUT's parent/demo-work)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    work = Path(args.work) if args.work else out.parent / "demo-work"
    print(build_demo_bundle(work, out=out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
