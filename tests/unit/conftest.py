"""Fixtures of the unit tests (no processes, no Redis)."""

from __future__ import annotations

import pytest
from PIL import Image

from support.images import sample_photos


@pytest.fixture(scope="session")
def photos() -> list[Image.Image]:
    """china.jpg and flower.jpg (640x427), the photos the preprocessing tests decode."""
    return sample_photos()
