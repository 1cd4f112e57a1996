"""Findings a person writes after looking at a benchmark run, stored in its JSON and shown on its page."""

from __future__ import annotations

from pathlib import Path


def read_findings(path: Path) -> list[str]:
    """One finding per paragraph (blank-line separated) of a text file, each folded onto one line."""
    text = path.read_text(encoding="utf-8")
    return [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]
