"""`vlltr export`: the bundle predicts like the PyTorch model in a process that never imports torch
(acceptance 1), the text path matches, and the serving modules import without torch."""

from __future__ import annotations

from support.export_check import check_bundle_matches_torch
from support.runs import run_without_torch


def test_bundle_matches_torch_without_torch(exported, tmp_path):
    run, bundle = exported
    numbers = check_bundle_matches_torch(run, bundle, run / "data" / "test.txt", run / "data", tmp_path)
    assert numbers["images"] == 300


def test_service_modules_never_import_torch(exported):
    proc = run_without_torch("""
import importlib
for name in ("vlltr.errors", "vlltr.model.runtime.preprocess", "vlltr.model.runtime.tokenizer",
             "vlltr.model.runtime.head", "vlltr.model.runtime.bundle", "vlltr.model.runtime.sessions",
             "vlltr.model.runtime.predictor", "vlltr.service.app"):
    importlib.import_module(name)
""")
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_manifest_records_the_exporting_software(exported):
    """The service compares its Pillow with the exporter's (`pillow_mismatch`): the export must record it."""
    import importlib.metadata

    from vlltr.model.runtime.manifest import read_manifest

    software = read_manifest(exported[1]).software
    assert software is not None
    for name in ("pillow", "numpy", "onnxruntime", "torch", "open_clip_torch"):
        assert software[name] == importlib.metadata.version(name), name
