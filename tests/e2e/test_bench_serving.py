"""The serving benchmark's harness runs end to end in its smoke mode and writes a complete report.

Seconds-long cells on the tiny test bundle: this proves the harness works (servers start, load is generated
and recorded, every table and the targets object are written); it asserts nothing about speed.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from support.paths import REPO
from support.programs import PIP_LINE

pytestmark = pytest.mark.slow
LOAD_KEYS = {"concurrency", "duration_s", "requests", "errors", "throughput", "p50_ms", "p95_ms", "p99_ms"}


def test_smoke_run_writes_every_table(service_bundle: Path, tmp_path: Path) -> None:
    # Checked without importing: importing Locust monkey-patches the standard library (gevent).
    missing = [m for m in ("locust", "litserve") if importlib.util.find_spec(m) is None]
    assert not missing, f"{missing} not installed (the `test` extra brings them): {PIP_LINE}"
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
    for cell in [
        *demo["service"]["load"].values(),
        demo["service_batching_off"]["load"],
        demo["service_full_decode"]["load"],
        demo["service_ort_spinning"]["load"],
        demo["handwritten"],
        demo["peers"]["litserve"],
    ]:
        assert LOAD_KEYS <= set(cell)
        assert cell["requests"] > 0 and cell["errors"] == 0
    assert set(demo["service"]["load"]) == {"1", "4"}
    assert demo["service_batching_off"]["profile"]["mean_batch_size"] == pytest.approx(1.0)
    assert demo["cache"]["server"]["1"]["hits"] > 0
    assert set(demo["classes"]) == {"100", "1000"}
    assert demo["classes"]["1000"]["added"] == 1000 - demo["bundle"]["classes"]
    assert demo["add_class"]["adds"]["count"] >= 1
    targets = results["targets"]
    assert {
        "small_service_vs_best_peer",
        "small_service_vs_handwritten",
        "small_service_vs_ceiling",
        "cache_hit_p50_ms_server",
        "add_class_p99_ratio",
    } <= set(targets)
    for t in targets.values():
        assert set(t) >= {"value", "goal", "met"}
    doc = (out / "serving.md").read_text()
    assert "## Targets" in doc and "Not run yet" in doc and "hand-written FastAPI + PyTorch" in doc
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
