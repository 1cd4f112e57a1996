"""The serving benchmark's harness runs end to end in its smoke mode and writes a complete report.

Seconds-long cells on the tiny test bundle: this proves the harness works (servers start, wrk drives the load
and reports what it cost, the end-to-end ceiling runs in 1 and 2 worker processes, the single-process sweep is
measured twice and `--workers 2` once where `vlltr serve` has the flag, every table and the targets object are
written); it asserts nothing about speed.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from support.paths import REPO
from support.programs import PIP_LINE, program

pytestmark = pytest.mark.slow
LOAD_KEYS = {"concurrency", "duration_s", "requests", "errors", "throughput", "p50_ms", "p95_ms", "p99_ms"}


def test_smoke_run_writes_every_table(service_bundle: Path, tmp_path: Path) -> None:
    # Checked without importing: importing Locust monkey-patches the standard library (gevent).
    missing = [m for m in ("locust", "litserve") if importlib.util.find_spec(m) is None]
    assert not missing, f"{missing} not installed (the `test` extra brings them): {PIP_LINE}"
    program("wrk", "wrk")
    # Whether this checkout's `vlltr serve` runs several front-end processes (the harness measures them then).
    helped = subprocess.run(
        [sys.executable, "-m", "vlltr.cli", "serve", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert helped.returncode == 0, helped.stderr[-2000:]
    has_workers = "--workers" in helped.stdout
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.serving",
            "--smoke",
            "--demo-bundle",
            str(service_bundle),
            "--demo-run",
            str(service_bundle.parent / "run"),
            "--work",
            str(tmp_path / "work"),
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((out / "serving.json").read_text())
    demo = results["models"]["demo"]
    assert demo["ceiling"]["best"]["images_per_s"] > 0
    assert results["workers_flag"] is has_workers
    workers2 = demo["service_workers"]["2"]
    sweeps = [demo["service"], demo["service_repeat"], *([workers2] if has_workers else [])]
    wrk_cells = [
        *(cell for sweep in sweeps for cell in sweep["load"].values()),
        demo["service_batching_off"]["load"],
        demo["service_full_decode"]["load"],
        demo["service_ort_spinning"]["load"],
        demo["handwritten"],
        demo["peers"]["litserve"],
        demo["load_generators"]["wrk"],
        *demo["cache"]["load"].values(),
        *(cell[mode] for cell in demo["explain"]["load"].values() for mode in ("plain", "explain")),
        demo["add_class"]["without"],
        demo["add_class"]["with_adds"],
    ]
    for cell in [*wrk_cells, demo["load_generators"]["locust"]]:
        assert LOAD_KEYS <= set(cell)
        assert cell["requests"] > 0 and cell["errors"] == 0
        # What the load generator itself used, read from the kernel, per answered request.
        assert cell["client_cpu_s"] > 0 and cell["client_cpu_us_per_request"] > 0
    assert all(cell["generator"].startswith("wrk") for cell in wrk_cells)
    assert demo["load_generators"]["locust"]["generator"].startswith("locust")
    # The table of adds under load keeps per-request records: wrk runs a thread per connection there.
    assert demo["add_class"]["with_adds"]["generator"] == "wrk (4 threads)"
    for sweep in sweeps:
        assert set(sweep["load"]) == {"1", "4"} and set(sweep["profile"]) == {"1", "4"}
    # Each service row records the encoder threads its server chose (the `--ort-spinning` one keeps onnxruntime's).
    for row in [*sweeps, demo["service_batching_off"], demo["service_full_decode"]]:
        assert row["encoder_threads"] is None or row["encoder_threads"] >= 1
    assert demo["service_ort_spinning"]["encoder_threads"] is None
    assert demo["service"]["workers"] == demo["service_repeat"]["workers"] == 1
    if has_workers:
        assert workers2["workers"] == 2
    else:
        assert "load" not in workers2 and "--workers" in workers2["skipped"]
    # The run-to-run noise: the spread of the two single-process measurements at each concurrency.
    noise = demo["noise"]
    assert set(noise["per_concurrency"]) == {"1", "4"}
    for c, v in noise["per_concurrency"].items():
        a, b = demo["service"]["load"][c]["throughput"], demo["service_repeat"]["load"][c]["throughput"]
        assert (v["first"], v["repeat"]) == (a, b)
        assert v["spread"] == pytest.approx(abs(a - b) / ((a + b) / 2))
    assert noise["max_spread"] == max(v["spread"] for v in noise["per_concurrency"].values())
    # The end-to-end ceiling: 1 and 2 worker processes, before and after the HTTP cells, at the service's batch.
    e2e = demo["e2e_ceiling"]
    assert {(pt["workers"], pt["when"]) for pt in e2e["points"]} == {
        (w, t) for w in (1, 2) for t in ("before", "after")
    }
    for pt in e2e["points"]:
        assert pt["images"] > 0 and pt["images_per_s"] > 0 and pt["max_batch_size"] == demo["max_batch_size"]
        assert len(pt["per_worker_images_per_s"]) == pt["workers"]
    assert e2e["best"] == max(e2e["points"], key=lambda pt: pt["images_per_s"])
    assert demo["service_batching_off"]["profile"]["mean_batch_size"] == pytest.approx(1.0)
    assert demo["cache"]["server"]["1"]["hits"] > 0
    assert set(demo["classes"]) == {"100", "1000"}
    assert demo["classes"]["1000"]["added"] == 1000 - demo["bundle"]["classes"]
    assert demo["add_class"]["adds"]["count"] >= 1
    targets = results["targets"]
    assert {
        "small_service_vs_e2e_ceiling",
        "small_workers_no_slower",
        "small_service_vs_best_peer",
        "small_service_vs_handwritten",
        "small_service_vs_ceiling",
        "cache_hit_p50_ms_server",
        "add_class_p99_ratio",
    } <= set(targets)
    for t in targets.values():
        assert set(t) >= {"value", "goal", "met"}
    judged = workers2 if has_workers else demo["service"]
    assert targets["small_service_vs_e2e_ceiling"]["value"] == pytest.approx(
        judged["load"]["4"]["throughput"] / e2e["best"]["images_per_s"], rel=1e-3
    )
    assert targets["small_workers_no_slower"]["goal"] == pytest.approx(1 - noise["max_spread"], abs=1e-4)
    assert (targets["small_workers_no_slower"]["met"] is None) is not has_workers
    doc = (out / "serving.md").read_text()
    assert "## Targets" in doc and "Not run yet" in doc and "hand-written FastAPI + PyTorch" in doc
    assert "### End-to-end ceiling" in doc and "### Front-end processes against the single process" in doc
    assert "### Load generators on the same server" in doc and "- load generator cost: wrk used" in doc
    assert "### Explanations (`explain=true`) beside plain classification" in doc
    assert "service, `--workers 1` (repeat)" in doc
    assert ("service, `--workers 2`" in doc) is has_workers
    assert (out / "serving.png").stat().st_size > 0
    # Nothing a framework writes may land in the checkout (LitServe's client.py, for one).
    assert not (REPO / "client.py").exists()

    # A GPU run stopped at its time limit leaves a partial JSON; its page renders without a GPU and says so.
    gpu = dict(results, gpu={"name": "Test GPU", "onnxruntime_cuda": True}, partial=True, notes=[])
    del gpu["load_average_end"]  # written only at the end of a complete run
    (out / "serving-gpu.json").write_text(json.dumps(gpu))
    (tmp_path / "findings.txt").write_text("First finding.\n\nSecond\nfinding.\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.serving.gpu",
            "--render-only",
            "--out",
            str(out),
            "--findings",
            str(tmp_path / "findings.txt"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    page = (out / "serving-gpu.md").read_text()
    assert "stopped at its time limit" in page and "GPU: **Test GPU**" in page
    assert "- First finding." in page and "- Second finding." in page
    assert json.loads((out / "serving-gpu.json").read_text())["findings"] == ["First finding.", "Second finding."]


def test_missing_wrk_names_the_package(tmp_path: Path) -> None:
    code = "import sys; from bench.serving.__main__ import main; sys.exit(main(['--smoke', '--work', sys.argv[1]]))"
    env = {"PATH": str(tmp_path), "PYTHONPATH": str(REPO)}  # a PATH without wrk
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 2
    assert "wrk is not installed (Debian/Ubuntu: apt-get install wrk)" in proc.stderr


def test_missing_peer_framework_names_the_extra(tmp_path: Path) -> None:
    code = (
        "import sys, importlib.util as u; real = u.find_spec; "
        "u.find_spec = lambda name, *a: None if name == 'litserve' else real(name, *a); "
        "from bench.serving.__main__ import main; sys.exit(main(['--smoke', '--work', sys.argv[1]]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert "pip install -e '.[bench]'" in proc.stderr
