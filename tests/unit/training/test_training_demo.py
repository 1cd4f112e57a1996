"""The demo bundle builder: benchmark, training and export in one call, reused once built."""

from __future__ import annotations

import json

from vlltr.training.demo import build_demo_bundle, main

SHORT = ["stage1.epochs=1", "stage1.warmup_epochs=0", "stage2.epochs=1"]


def test_demo_bundle_is_built_then_reused(tmp_path):
    bundle = build_demo_bundle(tmp_path / "work", out=tmp_path / "bundle", overrides=SHORT)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["head"]["num_classes"] == 10
    assert (tmp_path / "work/run/metrics.json").is_file() and (tmp_path / "work/data/meta.json").is_file()
    stamp = (bundle / "manifest.json").stat().st_mtime_ns
    assert main(["--out", str(bundle), "--work", str(tmp_path / "work")]) == 0
    assert (bundle / "manifest.json").stat().st_mtime_ns == stamp
