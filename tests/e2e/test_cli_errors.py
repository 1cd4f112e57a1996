"""The console command prints a user's mistake as one line with exit status 2 (in-process checks of every
command: tests/unit/training/test_cli_errors.py)."""

from __future__ import annotations

import subprocess
import sys

from support.paths import REPO


def test_the_console_command_prints_one_line(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "vlltr.cli", "train", "--config", str(tmp_path / "missing.yaml"), "--out", "x"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2
    assert out.stderr.startswith(f"vlltr train: config '{tmp_path / 'missing.yaml'}' not found")
    assert out.stderr.count("\n") == 1 and out.stdout == ""
