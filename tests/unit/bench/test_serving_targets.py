"""The serving benchmark's targets and page from a results dict, in-process: the run-to-run noise of the two
single-process sweeps, the rule that no multi-worker cell is slower than the single process beyond it, which
sweep the end-to-end target judges, and the page's multi-worker rows. tests/e2e/test_bench_serving.py runs the
harness itself (`python -m bench.serving --smoke`)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from bench.serving.report import write_markdown
from bench.serving.targets import compute_targets, run_to_run_noise, workers_no_slower


def _cell(c: int, throughput: float) -> dict[str, Any]:
    return {
        "concurrency": c,
        "duration_s": 12.0,
        "requests": int(throughput * 12),
        "errors": 0,
        "throughput": throughput,
        "p50_ms": 1000 * c / throughput,
        "p95_ms": 1500 * c / throughput,
        "p99_ms": 2000 * c / throughput,
        "mean_ms": 1000 * c / throughput,
        "drain_s": 0.01,
        "generator": "wrk (1 thread)",
        "client_cpu_s": 0.001 * throughput * 12 * 0.1,
        "client_cpu_us_per_request": 100.0,
        "error_kinds": {},
    }


def _sweep(workers: int, tputs: dict[int, float]) -> dict[str, Any]:
    return {
        "workers": workers,
        "load": {str(c): _cell(c, t) for c, t in tputs.items()},
        "profile": {str(c): {"requests": 10.0} for c in tputs},
    }


def _model(first: dict[int, float], repeat: dict[int, float], two: dict[int, float] | None) -> dict[str, Any]:
    m: dict[str, Any] = {
        "bundle": {
            "label": "demo",
            "bundle_id": "b",
            "arch": "tiny",
            "image_size": 32,
            "precision": "fp32",
            "classes": 10,
            "image_encoder_bytes": 2_600_000,
            "jpeg_draft": True,
        },
        "max_batch_size": 32,
        "ceiling": {"points": [], "best": {"images_per_s": 10_000.0, "batch_size": 32}},
        "e2e_ceiling": {
            "points": [
                {
                    "when": "before",
                    "workers": w,
                    "decode_threads": 2 // w,
                    "encoder_threads": None if w == 1 else 1,
                    "max_batch_size": 32,
                    "max_wait_ms": 5.0,
                    "images": 10_000,
                    "seconds": 10.0,
                    "images_per_s": rate,
                    "mean_batch": 4.0,
                    "per_worker_images_per_s": [rate / w] * w,
                }
                for w, rate in ((1, 900.0), (2, 1000.0))
            ]
        },
        "service": _sweep(1, first),
        "service_repeat": _sweep(1, repeat),
        "service_workers": {"2": _sweep(2, two) if two else {"workers": 2, "skipped": "no --workers flag"}},
        "service_batching_off": {"load": _cell(32, 500.0), "profile": {}},
        "variant_workers": 1,
    }
    m["e2e_ceiling"]["best"] = m["e2e_ceiling"]["points"][1]
    m["noise"] = run_to_run_noise(m["service"]["load"], m["service_repeat"]["load"])
    return m


def _results(model: dict[str, Any]) -> dict[str, Any]:
    return {"models": {"demo": model}, "plan": {"target_c": 32}}


def test_noise_is_the_largest_relative_spread_of_the_two_single_process_sweeps() -> None:
    noise = run_to_run_noise(_sweep(1, {1: 100.0, 32: 800.0})["load"], _sweep(1, {1: 110.0, 32: 760.0})["load"])
    assert noise["per_concurrency"]["1"]["spread"] == pytest.approx(10 / 105)
    assert noise["per_concurrency"]["32"]["spread"] == pytest.approx(40 / 780)
    assert noise["max_spread"] == pytest.approx(10 / 105)


def test_a_multi_worker_cell_below_the_noise_band_misses_the_target() -> None:
    first, repeat = {1: 100.0, 32: 800.0}, {1: 100.0, 32: 840.0}  # noise 40 / 820
    inside = _model(first, repeat, {1: 99.0, 32: 1_000.0})  # c=1: 0.99 of the mean, within the 4.9 % noise
    value, goal, where = workers_no_slower(inside)
    assert goal == pytest.approx(1 - 40 / 820) and value == pytest.approx(0.99) and where == "--workers 2, c=1"
    assert compute_targets(_results(inside), "demo", None)["small_workers_no_slower"]["met"] is True
    slower = _model(first, repeat, {1: 90.0, 32: 1_000.0})  # c=1: 0.90 of the mean, beyond it
    target = compute_targets(_results(slower), "demo", None)["small_workers_no_slower"]
    assert target["met"] is False and target["value"] == pytest.approx(0.9)


def test_without_a_multi_worker_sweep_the_single_process_is_judged_and_no_slower_is_open() -> None:
    m = _model({1: 100.0, 32: 800.0}, {1: 100.0, 32: 800.0}, None)
    targets = compute_targets(_results(m), "demo", None)
    assert targets["small_workers_no_slower"]["value"] is None and targets["small_workers_no_slower"]["met"] is None
    e2e = targets["small_service_vs_e2e_ceiling"]
    assert e2e["value"] == pytest.approx(800 / 1000) and e2e["goal"] == 0.9 and e2e["met"] is False
    assert "(--workers 1)" in e2e["what"] and "(2 workers)" in e2e["what"]


def test_the_e2e_target_judges_the_largest_worker_count_against_the_best_e2e_point() -> None:
    m = _model({1: 100.0, 32: 800.0}, {1: 100.0, 32: 800.0}, {1: 100.0, 32: 950.0})
    e2e = compute_targets(_results(m), "demo", None)["small_service_vs_e2e_ceiling"]
    assert e2e["value"] == pytest.approx(0.95) and e2e["met"] is True and "(--workers 2)" in e2e["what"]
    realistic = copy.deepcopy(m)
    targets = compute_targets({"models": {"demo": m, "vit": realistic}, "plan": {}}, "demo", "vit")
    assert targets["realistic_service_vs_e2e_ceiling"]["goal"] == 0.95
    assert targets["realistic_service_vs_e2e_ceiling"]["met"] is True  # 950 / 1000 is exactly the goal


def test_the_page_shows_every_sweep_the_noise_and_a_missed_no_slower_target(tmp_path: Path) -> None:
    m = _model({1: 100.0, 32: 800.0}, {1: 100.0, 32: 840.0}, {1: 90.0, 32: 1_000.0})
    # The small model is the one with the cache table.
    m["cache"] = {
        "distinct_images": 16,
        "load": {"1": _cell(1, 1_500.0)},
        "server": {"1": {"p50_ms": 0.5, "p99_ms": 1.0, "hits": 10.0, "misses": 0.0}},
    }
    # The thread choice each server reported at start; the repeat sweep predates the record.
    m["service"]["encoder_threads"] = 1
    m["service_workers"]["2"]["encoder_threads"] = None
    results = dict(
        _results(m),
        command="python -m bench.serving",
        mode="full",
        machine={"cpu": "cpu", "cores": 2, "memory_gib": 1.0, "os": "os", "python": "3.11", "packages": {}},
        provider="cpu",
        elapsed_s=1.0,
        load_average_start=None,
        load_generator="wrk (system package, 1 thread)",
    )
    results["plan"] = {"target_c": 32, "small": {"warmup_s": 3.0, "duration_s": 12.0}}
    results["targets"] = compute_targets(results, "demo", None)
    page = tmp_path / "serving.md"
    write_markdown(results, page, [])
    text = page.read_text()
    for row in (
        "| service, `--workers 1` | 32 | 800.0 | 0.800 |",
        "| service, `--workers 2` | 32 | 1,000.0 | 1.000 |",
        "| service, `--workers 1` (repeat) | 32 | 840.0 | 0.840 |",
        "| 1 | 100.0 | 100.0 | 0.000 | 90.0 | 0.900 | 0.100 |",
    ):
        assert row in text
    assert "`--workers 2` at c=1 answered 90.0 images/s against 100.0 and 100.0 for the single process" in text
    assert "- load generator cost: wrk used 100–100 µs of CPU per request" in text
    assert (
        "intra-op threads each service row ran on (`GET /v1/model` at start): service, `--workers 1`: 1; "
        "service, `--workers 2`: onnxruntime default." in text
    )
