"""Exporting standard open_clip architectures (random init): RN50 and ViT-B-16, fp32 and fp16 (acceptance 5).

One `--fp16` export per architecture covers both precisions: it writes and checks the fp32 encoders against
PyTorch first, then converts them and keeps the fp16 ones only if they agree with fp32 on the run's test
images; on refusal the message must carry the measured numbers and an fp32 export must still work.
"""

from __future__ import annotations

import json
import re

import pytest

from support.runs import make_run
from vlltr.model.runtime.bundle import load_bundle
from vlltr.training.export import ExportError, export_bundle

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("arch", ["RN50", "ViT-B-16"])
def test_standard_architecture_exports(arch, tmp_path):
    run = make_run(tmp_path / "run", arch=arch, num_classes=5, n_test=12)
    out = tmp_path / "bundle"
    try:
        export_bundle(run, out, fp16=True, verify_images=4, fp16_images=12)
    except ExportError as exc:
        message = str(exc)
        assert "--fp16 refused" in message and re.search(r"\d\.\d{4}", message), message
        assert not out.exists()
        export_bundle(run, out, verify_images=4)
        expected_precision = "fp32"
    else:
        expected_precision = "fp16"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"] == expected_precision
    assert manifest["model"]["arch"] == arch and manifest["model"]["image_size"] == 224
    assert manifest["preprocess"]["resize_size"] == 256
    assert manifest["export_check"]["image_max_rel_diff"] <= 1e-4
    assert manifest["export_check"]["text_max_rel_diff"] <= 1e-4
    if expected_precision == "fp16":
        check = manifest["fp16_check"]
        assert check["min_cosine"] >= 0.999 and check["top1_agreement"] >= 0.99
    else:
        assert manifest["verification"]["max_abs_prob_diff"] <= 1e-4
    assert manifest["verification"]["top1_agreement"] >= (0.99 if expected_precision == "fp16" else 0.999)
    bundle = load_bundle(out)
    assert bundle.embed_dim == (1024 if arch == "RN50" else 512)
    assert bundle.num_classes == 5
