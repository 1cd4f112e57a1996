"""Build the Dockerfile's images with podman, on a machine with no Docker engine and no registry access.

    python deploy/tools/podman_image.py build [--target serve-cpu] [--tag TAG] [--torch-index-url URL]
    python deploy/tools/podman_image.py base               # only the Python base image
    python deploy/tools/podman_image.py podman ARGS...     # podman on the same storage, e.g. `images`, `run`

`.ci/run` builds the `serve-cpu` image with this and tests/e2e/test_image.py runs it (building it first
unless told which image to run).

What a build here needs, all applied by this script:

- a Python base image: registry images cannot be pulled, so the base (`PYTHON_IMAGE`) is Debian bookworm made
  from Debian packages with mmdebstrap and imported once as `BASE_IMAGE` (Python 3.11);
- podman's global options (`podman_options`): a storage of this project's own (`STORAGE_ROOT`), on the overlay
  driver where the kernel allows it and on vfs (a full copy of the file system per layer: slow and large)
  where not, and `--runtime runc` (crun cannot set up cgroups inside a container). `VLLTR_PODMAN_OPTIONS`
  replaces them all;
- explicit ulimits (the default ones are refused) and the host network for the build;
- the host's CA certificates for pip inside the build, mounted (never copied into an image) with a pip config
  naming them, because pip trusts its own certificate bundle, not the system's;
- a torch index that answers: the Dockerfile's `TORCH_INDEX_URL` (PyTorch's CPU wheels) when it is reachable,
  else none, so that torch comes from PyPI. Only the `demo` stage installs torch, into a throwaway venv.

After a build the dangling images that earlier builds of this project left behind (untagged, childless,
descended from `BASE_IMAGE`) are removed, except the ones this build used: those include the last layer of
each stage the target copies from, which is what keeps those stages cached.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import os
import re
import shlex
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import IO

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dockerfile  # noqa: E402  (deploy/tools is not a package)

ROOT = Path(__file__).resolve().parents[2]
BASE_IMAGE = "localhost/vlltr-python:bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "python-is-python3", "ca-certificates")
DEFAULT_TARGET = "serve-cpu"
DEFAULT_TAGS = {"serve-cpu": "localhost/vlltr-serve-cpu:dev", "serve-gpu": "localhost/vlltr-serve-gpu:dev"}
# buildah's line for each step's resulting image: "--> 1a2b3c4d5e6" or "--> Using cache <full id>".
STEP_IMAGE = re.compile(r"^--> (?:Using cache )?([0-9a-f]{11,64})$")
# This project's own podman storage, so that its storage driver never clashes with another user's.
STORAGE_ROOT = Path("/var/lib/containers/vlltr") if os.geteuid() == 0 else Path.home() / ".local/share/vlltr-containers"
RUN_ROOT = (
    Path("/run/containers/vlltr")
    if os.geteuid() == 0
    else Path(tempfile.gettempdir()) / f"vlltr-containers-{os.getuid()}"
)
STORAGE_DRIVERS = ("overlay", "vfs")
ULIMITS = ("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096")
HOST_CA_DIR = Path("/etc/ssl/certs")
HOST_CA_BUNDLE = HOST_CA_DIR / "ca-certificates.crt"
LOCK = Path(tempfile.gettempdir()) / "vlltr-podman-image.lock"


class BuildError(RuntimeError):
    """A podman or mmdebstrap step failed; the message names it."""


@functools.cache
def podman_options() -> tuple[str, ...]:
    """The global podman options: `VLLTR_PODMAN_OPTIONS` if set, else this project's storage on the first
    driver of `STORAGE_DRIVERS` that podman can use here (a storage keeps the driver it was created with)."""
    if "VLLTR_PODMAN_OPTIONS" in os.environ:
        return tuple(shlex.split(os.environ["VLLTR_PODMAN_OPTIONS"]))
    common = ("--root", str(STORAGE_ROOT), "--runroot", str(RUN_ROOT), "--runtime", "runc")
    errors = []
    for driver in STORAGE_DRIVERS:
        options = (*common, "--storage-driver", driver)
        proc = subprocess.run(["podman", *options, "info"], capture_output=True, text=True)
        if proc.returncode == 0:
            return options
        errors.append(f"{driver}: {proc.stderr.strip()}")
    raise BuildError("podman can use none of the storage drivers here:\n" + "\n".join(errors))


def podman_argv(*args: str) -> list[str]:
    """`podman` with the global options this machine needs, then `args`."""
    return ["podman", *podman_options(), *args]


def podman(*args: str, timeout: float | None = None) -> str:
    """Run podman and return its stdout; BuildError with its stderr when it fails."""
    proc = subprocess.run(podman_argv(*args), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise BuildError(f"{shlex.join(podman_argv(*args))} exited with {proc.returncode}:\n{proc.stderr.strip()}")
    return proc.stdout


def image_exists(ref: str) -> bool:
    """Whether the local storage holds an image named (or with the id) `ref`."""
    return subprocess.run(podman_argv("image", "exists", ref), capture_output=True).returncode == 0


def image_id(ref: str) -> str:
    """The full id of a local image."""
    return podman("image", "inspect", "--format", "{{.Id}}", ref).strip()


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    # Two builds at once (two checkouts, or CI and a test run) would race on the tags and the pruning.
    with open(LOCK, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def ensure_base(tag: str = BASE_IMAGE, log: IO[str] | None = None) -> str:
    """Make the Debian bookworm Python base with mmdebstrap and import it as `tag`, unless it exists."""
    if image_exists(tag):
        return tag
    with tempfile.TemporaryDirectory(prefix="vlltr-base-") as tmp:
        tarball = Path(tmp) / "base.tar"
        argv = ["mmdebstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", "bookworm", str(tarball)]
        proc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT if log else None)
        if proc.returncode != 0:
            raise BuildError(f"{shlex.join(argv)} exited with {proc.returncode}")
        podman("import", str(tarball), tag)
    return tag


def reachable(url: str, timeout: float = 10.0) -> bool:
    """Whether an HTTP(S) URL answers at all (any status below 500)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return bool(resp.status < 500)
    except urllib.error.HTTPError as exc:
        return exc.code < 500
    except (urllib.error.URLError, OSError):
        return False


def torch_index_url(choice: str) -> str:
    """`choice`, or for "auto" the Dockerfile's TORCH_INDEX_URL when it answers, else "" (torch from PyPI)."""
    if choice != "auto":
        return choice
    default = dockerfile.build_args()["TORCH_INDEX_URL"]
    return default if reachable(default) else ""


def _build_argv(target: str, tag: str, torch_index: str, pip_conf: Path | None, iidfile: Path) -> list[str]:
    # Docker's image format: an OCI image config has no HEALTHCHECK, and buildah would drop it.
    argv = podman_argv("build", "--format", "docker", "--layers", "--network", "host", *ULIMITS)
    if pip_conf is not None:
        argv += ["--volume", f"{HOST_CA_DIR}:{HOST_CA_DIR}:ro", "--volume", f"{pip_conf}:/etc/pip.conf:ro"]
    argv += ["--build-arg", f"PYTHON_IMAGE={BASE_IMAGE}", "--build-arg", f"TORCH_INDEX_URL={torch_index}"]
    argv += ["--target", target, "--tag", tag, "--iidfile", str(iidfile), "--file", str(ROOT / "Dockerfile"), str(ROOT)]
    return argv


def prune_dangling(keep: Collection[str] = (), base: str = BASE_IMAGE) -> list[str]:
    """Remove untagged, childless images descended from `base`, except those whose id starts with one in
    `keep`; returns their ids.

    Removing one can leave its parent childless and untagged in turn, so this repeats until none is left. An
    image a container still uses (a test of another checkout running an earlier build) is left for a later
    prune: cleaning up must never fail a build.
    """
    removed: list[str] = []
    in_use: set[str] = set()
    base_id = _bare(image_id(base))
    while True:
        listed = podman("images", "--all", "--quiet", "--no-trunc", "--filter", "dangling=true").split()
        parents = _parents()
        ours = [
            i
            for i in map(_bare, listed)
            if base_id in _ancestors(i, parents) and not any(i.startswith(k) for k in keep) and i not in in_use
        ]
        if not ours:
            return removed
        for image in ours:
            try:
                podman("rmi", image)
            except BuildError as exc:
                if "in use" not in str(exc):
                    raise
                in_use.add(image)
            else:
                removed.append(image)


def _bare(image: str) -> str:
    return image.removeprefix("sha256:")


def _parents() -> dict[str, str]:
    """Every local image's id -> its parent's id ("" for none)."""
    ids = podman("images", "--all", "--quiet", "--no-trunc").split()
    if not ids:
        return {}
    rows = podman("image", "inspect", "--format", "{{.Id}} {{.Parent}}", *ids).splitlines()
    return {_bare(row.split()[0]): _bare(row.split()[1]) if len(row.split()) > 1 else "" for row in rows if row.strip()}


def _ancestors(image: str, parents: dict[str, str]) -> set[str]:
    found: set[str] = set()
    current = parents.get(image, "")
    while current and current not in found:
        found.add(current)
        current = parents.get(current, "")
    return found


def build(
    target: str = DEFAULT_TARGET,
    tag: str | None = None,
    *,
    torch_index: str = "auto",
    log: IO[str] | None = None,
) -> str:
    """Build one Dockerfile target, tagged `tag`; returns the built image's id.

    The id, not the tag, names what this call built: another checkout may build and tag at any time.

    Args:
        target: a Dockerfile stage (serve-cpu, serve-gpu, train, ...).
        tag: image name (default: `DEFAULT_TAGS[target]`).
        torch_index: TORCH_INDEX_URL for the build, "" for PyPI only, "auto" (see `torch_index_url`).
        log: an open file for the build output (default: this process's stdout).

    Raises:
        BuildError: a step failed; the build output says which.
    """
    tag = tag or DEFAULT_TAGS.get(target) or f"localhost/vlltr-{target}:dev"
    out = log if log is not None else sys.stdout
    with _locked(), tempfile.TemporaryDirectory(prefix="vlltr-build-") as tmp:
        ensure_base(log=log)
        index = torch_index_url(torch_index)
        pip_conf = None
        if HOST_CA_BUNDLE.is_file():
            pip_conf = Path(tmp) / "pip.conf"
            pip_conf.write_text(f"[global]\ncert = {HOST_CA_BUNDLE}\n", encoding="utf-8")
        iidfile = Path(tmp) / "iid"
        argv = _build_argv(target, tag, index, pip_conf, iidfile)
        out.write(f"$ {shlex.join(argv)}\n")
        used: set[str] = set()
        with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                out.write(line)
                if match := STEP_IMAGE.match(line.strip()):
                    used.add(match.group(1))
        out.flush()
        if proc.returncode != 0:
            raise BuildError(f"podman build --target {target} exited with {proc.returncode}")
        built = _bare(iidfile.read_text(encoding="utf-8").strip())
        prune_dangling(used | {built})
    return built


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python deploy/tools/podman_image.py", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build one target")
    b.add_argument("--target", default=DEFAULT_TARGET, help=f"Dockerfile stage (default: {DEFAULT_TARGET})")
    b.add_argument("--tag", default=None, help="image name (default: localhost/vlltr-<target>:dev)")
    b.add_argument(
        "--torch-index-url",
        default="auto",
        help="TORCH_INDEX_URL build argument; '' = torch from PyPI; auto (default) = the Dockerfile's "
        "when it answers, else PyPI",
    )
    sub.add_parser("base", help=f"make the Python base image {BASE_IMAGE} if it is missing")
    passthrough = sub.add_parser("podman", help="run podman with the same global options (storage, runtime)")
    passthrough.add_argument("args", nargs=argparse.REMAINDER, help="podman's own arguments")
    args = parser.parse_args(argv)
    try:
        if args.command == "podman":
            return subprocess.run(podman_argv(*args.args)).returncode
        if args.command == "base":
            print(ensure_base())
        else:
            tag = args.tag or DEFAULT_TAGS.get(args.target) or f"localhost/vlltr-{args.target}:dev"
            print(f"{tag} {build(args.target, tag, torch_index=args.torch_index_url)}")
    except BuildError as exc:
        print(f"podman_image: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
