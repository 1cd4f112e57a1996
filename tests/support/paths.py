"""Where things are: the checkout, the tests folder, the committed fixtures."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"
FIXTURES = TESTS / "fixtures"
# A bundle written by the previous release's exporter, with the test images of its run (see its README.md).
BUNDLE_V1 = FIXTURES / "bundle-v1"
PYTHON = sys.executable
