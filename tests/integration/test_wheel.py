"""The wheel built from the project holds one top-level package, `vlltr`, with all its modules and package data,
and none of the checkout's other folders (bench/, tests/, deploy/)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.paths import REPO


def _copy_checkout(dst: Path) -> None:
    """Copy what a fresh clone has (tracked and not-ignored files) to `dst`; stale build/ output must not reach
    the build, nor the user's data and runs."""
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        capture_output=True,
        timeout=60,
    )
    if listed.returncode != 0:  # not a git checkout (an unpacked source tree): all of it but the usual output
        shutil.copytree(REPO, dst, ignore=shutil.ignore_patterns(".venv*", "build", "dist", "*.egg-info"))
        return
    for name in listed.stdout.decode().split("\0"):
        if name and (REPO / name).is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dst / name)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[zipfile.ZipFile]:
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    _copy_checkout(source)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(root / "dist"), str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (built,) = (root / "dist").glob("vlltr-*.whl")
    with zipfile.ZipFile(built) as archive:
        yield archive


def _package_files(wheel: zipfile.ZipFile) -> set[str]:
    return {n for n in wheel.namelist() if not n.split("/", 1)[0].endswith(".dist-info")}


def test_the_wheel_holds_exactly_the_vlltr_package(wheel):
    top_level = {name.split("/", 1)[0] for name in _package_files(wheel)}
    assert top_level == {"vlltr"}
    for folder in ("bench", "tests", "deploy", "model", "service", "training"):
        assert not any(n.startswith(f"{folder}/") for n in wheel.namelist()), folder
    (top_level_txt,) = [n for n in wheel.namelist() if n.endswith(".dist-info/top_level.txt")]
    assert wheel.read(top_level_txt).decode().split() == ["vlltr"]


def test_the_wheel_carries_every_module_and_the_package_data(wheel):
    files = _package_files(wheel)
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "vlltr").rglob("*.py")}
    assert modules and modules <= files, sorted(modules - files)
    data = {
        p.relative_to(REPO).as_posix()
        for pattern in (
            "vlltr/model/networks/configs/*.json",
            "vlltr/training/configs/*.yaml",
            "vlltr/service/static/*",
        )
        for p in REPO.glob(pattern)
    }
    assert any(d.endswith(".json") for d in data) and any(d.endswith(".yaml") for d in data)
    assert "vlltr/service/static/index.html" in data  # the page at /
    assert data <= files, sorted(data - files)
    assert files == modules | data, sorted(files - modules - data)
