"""The embedded demo bundle: found under the cache dir, or built there on first use.

Building needs the training stack (torch), which the service must never import, so it runs in a
subprocess (`python -m training.demo --out DIR`) whose progress output goes straight to the terminal.
The build goes to a temporary directory renamed into place when complete, under a file lock, so an
interrupted build or two servers starting at once never leave a half-written bundle behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from vlltr.errors import DemoBundleError

log = logging.getLogger(__name__)

DEMO_DIRNAME = "demo-bundle"
MANIFEST = "manifest.json"


def find_bundle_dir(root: Path) -> Path | None:
    """`root` if it holds a manifest, else the one sub-directory (at most two levels down) that does."""
    if (root / MANIFEST).is_file():
        return root
    for depth_glob in (f"*/{MANIFEST}", f"*/*/{MANIFEST}"):
        found = sorted(root.glob(depth_glob))
        if found:
            return found[0].parent
    return None


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def training_available() -> bool:
    """Whether the training stack can run here (checked without importing torch)."""
    return all(importlib.util.find_spec(name) is not None for name in ("torch", "open_clip", "vlltr.training"))


def ensure_demo_bundle(cache_dir: str | Path, *, python: str = sys.executable) -> Path:
    """The demo bundle's directory under `cache_dir`, building it first if needed.

    Raises:
        DemoBundleError: it is not built and torch is not installed, or the build failed.
    """
    cache_dir = Path(cache_dir).expanduser()
    target = cache_dir / DEMO_DIRNAME
    found = find_bundle_dir(target) if target.is_dir() else None
    if found is not None:
        return found
    with _exclusive(cache_dir / f"{DEMO_DIRNAME}.lock"):
        found = find_bundle_dir(target) if target.is_dir() else None
        if found is not None:  # another process built it while we waited for the lock
            return found
        if not training_available():
            raise DemoBundleError(
                "no bundle given and the demo bundle is not built yet; building it needs the training extra "
                "(torch). Either `pip install .[train]` and start again, or pass --bundle DIR "
                "(VLLTR_BUNDLE) with a bundle made by `vlltr export`."
            )
        partial = cache_dir / f"{DEMO_DIRNAME}.partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        log.info("building the demo bundle in %s (first start only; this takes a few minutes)", target)
        print(f"vlltr: building the demo bundle in {target} (first start only)", file=sys.stderr, flush=True)
        # The work dir (benchmark + training run) persists, so an interrupted build resumes where it was.
        rc = subprocess.call(
            [python, "-m", "vlltr.training.demo", "--out", str(partial), "--work", str(cache_dir / "demo-work")]
        )
        if rc != 0:
            shutil.rmtree(partial, ignore_errors=True)
            raise DemoBundleError(
                f"building the demo bundle failed (`{python} -m training.demo` exited with "
                f"{rc}); see its output above, or pass --bundle DIR"
            )
        if find_bundle_dir(partial) is None:
            shutil.rmtree(partial, ignore_errors=True)
            raise DemoBundleError(f"`vlltr.training.demo` finished but wrote no {MANIFEST} under {partial}")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(partial, target)
    found = find_bundle_dir(target)
    assert found is not None
    return found
