"""System programs the tests run. A missing one fails the test with the one-step install, never a skip."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

# The README's apt line: every system package the tests need (Python packages come with the `test` extra).
APT_PACKAGES = (
    "redis-server",
    "nginx",
    "prometheus",
    "docker-compose",
    "podman",
    "runc",
    "mmdebstrap",
    "wrk",
    "chromium",
    "chromium-driver",
)
APT_LINE = "sudo apt-get install -y --no-install-recommends " + " ".join(APT_PACKAGES)
PIP_LINE = "pip install -e '.[train,cpu,test]'"
# Debian puts some daemons outside a normal user's PATH.
SBIN = ("/usr/sbin", "/sbin")


def program(name: str, package: str) -> str:
    """Absolute path of `name`, or a test failure naming the Debian `package` and the README's apt line."""
    found = shutil.which(name) or next((str(Path(d) / name) for d in SBIN if (Path(d) / name).is_file()), None)
    if found is None:
        pytest.fail(
            f"{name} not found (Debian package {package}); install the system packages: {APT_LINE}", pytrace=False
        )
    return found
