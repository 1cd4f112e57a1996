"""Typed errors of the serving path's leaf modules (no imports beyond the standard library).

The HTTP layer maps them to statuses: `ImageDecodeError` -> 400, `ImageTooLargeError` -> 413,
`UnsupportedImageTypeError` -> 415, `BundleError` -> refuse to start.
"""

from __future__ import annotations


class ImageDecodeError(ValueError):
    """The bytes are not a decodable image (truncated, corrupt, empty)."""


class UnsupportedImageTypeError(ImageDecodeError):
    """The bytes are an image format or pixel mode the service does not read."""


class ImageTooLargeError(ValueError):
    """The image has more pixels (or bytes) than the configured limit; raised before the pixels are decoded."""

    def __init__(self, message: str, *, pixels: int | None = None, limit: int | None = None) -> None:
        super().__init__(message)
        self.pixels = pixels
        self.limit = limit


class BundleError(ValueError):
    """A model bundle is unusable; the message names the file and the reason."""
