"""The data layer's error type, `DataError`, defined with every other domain error in `vlltr.errors`."""

from __future__ import annotations

from vlltr.errors import DataError

__all__ = ["DataError"]
