"""The one error type of the data layer."""

from __future__ import annotations


class DataError(ValueError):
    """A dataset, class list or class text is unusable; the message names the file or class and the problem."""
