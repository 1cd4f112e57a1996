"""The figures of the reliability tests (tests/*/test_reliability_*.py).

Each reliability test adds what it did to one session-wide log (requests served, faults injected, hostile
inputs tried, errors, data lost). With VLLTR_RELIABILITY_SUMMARY=PATH the log and the outcome of every
reliability test are written there as JSON at the end of the run (tests/conftest.py); `python -m
bench.soak.report PATH` turns that file into docs/reliability.md, so the figures in the doc always come from a run.
"""

from __future__ import annotations

import time

RELIABILITY_SUMMARY_ENV = "VLLTR_RELIABILITY_SUMMARY"
# The file names of the reliability tests start with this; their outcomes go into the report.
RELIABILITY_PREFIX = "test_reliability_"


class ReliabilityLog:
    """Figures of the reliability tests, summed per theme, plus each reliability test's outcome."""

    FIGURES = ("requests", "faults", "inputs", "errors", "data_lost")

    def __init__(self) -> None:
        self.themes: dict[str, dict[str, float]] = {}
        self.outcomes: dict[str, str] = {}
        self.extra: dict[str, object] = {}

    def add(self, theme: str, **figures: float) -> None:
        """Add figures (any of `FIGURES`) to a theme; unknown names are refused so typos cannot hide."""
        unknown = set(figures) - set(self.FIGURES)
        if unknown:
            raise ValueError(f"unknown reliability figures {sorted(unknown)}; known: {self.FIGURES}")
        row = self.themes.setdefault(theme, dict.fromkeys(self.FIGURES, 0))
        for name, value in figures.items():
            row[name] += value

    def note(self, key: str, value: object) -> None:
        """Keep a named detail for the report (e.g. the soak's memory figures)."""
        self.extra[key] = value

    def to_json(self) -> dict:
        totals = {name: sum(row[name] for row in self.themes.values()) for name in self.FIGURES}
        return {
            "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "themes": self.themes,
            "totals": totals,
            "outcomes": self.outcomes,
            "details": self.extra,
        }
