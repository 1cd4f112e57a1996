"""The `serve-cpu` image as users run it, built from this tree and started with podman.

The image is built first (deploy/tools/podman_image.py, the same recipe `.ci/run` uses; podman's layer cache
makes it a few seconds when nothing changed). Three containers then run the image's own entrypoint:

* `plain`: nothing mounted, nothing but the admin token set (`docker run` / compose with no bundle): it serves
  the demo bundle baked into the image, classifies, adds a class by text with the admin token, runs as
  uid 10001, holds no torch, and its HEALTHCHECK passes;
* `read_only`: the demo again, on a read-only root file system with writable /var/lib/vlltr and /tmp only
  (empty folders, like the Kubernetes pods' emptyDir volumes), as those pods run it;
* `mounted`: a bundle directory mounted read-only and named by VLLTR_BUNDLE, on a read-only root: that
  bundle, not the demo, is served.

Predictions are compared with the torch-free predictor run in this process on the same bundle, so the image
is shown to serve exactly what the code computes.
"""

from __future__ import annotations

import io
import json
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from support.deploy import load_tool
from support.programs import program
from vlltr.model.runtime.bundle import load_bundle
from vlltr.model.runtime.predictor import BundlePredictor

podman_image = load_tool("podman_image")
dockerfile = load_tool("dockerfile")

# The first build of a fresh checkout installs torch to train the demo bundle: several minutes.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

TARGET = "serve-cpu"
TAG = podman_image.DEFAULT_TAGS[TARGET]
TOKEN = secrets.token_urlsafe(24)
AUTH = {"Authorization": f"Bearer {TOKEN}"}
READY_TIMEOUT_S = 120.0
SERVICE_UID = 10001
MOUNTED_AT = "/bundles/test"
# Writable places of a read-only container, as the Kubernetes Deployment mounts them (emptyDir volumes).
WRITABLE = ("/var/lib/vlltr", "/tmp")


# Where the image keeps its demo bundle: the default VLLTR_BUNDLE of the serving stage.
DEMO_BUNDLE = dockerfile.stages()[TARGET].env()["VLLTR_BUNDLE"]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The id of the serve-cpu image built from this tree (a test failure with the build's log when it cannot
    be). The id, as the tag may be moved by a build in another checkout meanwhile."""
    for name in ("podman", "runc", "mmdebstrap"):
        program(name, name)
    log_path = tmp_path_factory.mktemp("image-build") / "build.log"
    with open(log_path, "w", encoding="utf-8") as log:
        try:
            return str(podman_image.build(TARGET, TAG, log=log))
        except podman_image.BuildError as exc:
            tail = log_path.read_text(encoding="utf-8", errors="replace")[-6000:]
            pytest.fail(f"building {TARGET} failed: {exc}\n{tail}")


@dataclass
class Container:
    """A detached container of the image, published on 127.0.0.1:`port`."""

    name: str
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def logs(self) -> str:
        proc = subprocess.run(podman_image.podman_argv("logs", self.name), capture_output=True, text=True)
        return (proc.stdout + proc.stderr)[-6000:]

    def exec(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """Run a command inside the running container, as its user."""
        return subprocess.run(
            podman_image.podman_argv("exec", self.name, *argv), capture_output=True, text=True, timeout=120
        )

    def running(self) -> bool:
        state = subprocess.run(
            podman_image.podman_argv("inspect", "--format", "{{.State.Running}}", self.name),
            capture_output=True,
            text=True,
        )
        return state.stdout.strip() == "true"

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> Container:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running():
                raise AssertionError(f"container {self.name} exited:\n{self.logs()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise AssertionError(f"container {self.name} was not ready after {timeout} s:\n{self.logs()}")

    def remove(self) -> None:
        subprocess.run(podman_image.podman_argv("rm", "--force", "--time", "10", self.name), capture_output=True)


@pytest.fixture(scope="module")
def start_container(image: str, free_port: Callable[[], int]) -> Iterator[Callable[..., Container]]:
    """`start(*podman_run_options)` -> a started (not yet ready) container of the image; all removed after."""
    started: list[Container] = []

    def start(*options: str) -> Container:
        container = Container(f"vlltr-test-{secrets.token_hex(4)}", free_port())
        argv = podman_image.podman_argv(
            "run",
            "--detach",
            "--name",
            container.name,
            *podman_image.ULIMITS,
            "--publish",
            f"127.0.0.1:{container.port}:8000",
            "--env",
            f"VLLTR_ADMIN_TOKEN={TOKEN}",
            *options,
            image,
        )
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"podman run failed: {proc.stderr}"
        started.append(container)
        return container

    yield start
    for container in started:
        container.remove()


def _read_only(workdir: Path) -> list[str]:
    """A read-only root with the pod's writable places, each an empty world-writable folder like an emptyDir
    (podman's --tmpfs would copy the image's folder in, owned by root)."""
    options = ["--read-only"]
    for path in WRITABLE:
        host = workdir / path.strip("/").replace("/", "-")
        host.mkdir(parents=True)
        host.chmod(0o777)
        options += ["--volume", f"{host}:{path}"]
    return options


@pytest.fixture(scope="module")
def mounted_bundle(service_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the test suite's bundle that the container's user can read (pytest's tmp dirs are 0700)."""
    target = tmp_path_factory.mktemp("mounted") / "bundle"
    shutil.copytree(service_bundle, target)
    for path in [target, *target.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return target


@pytest.fixture(scope="module")
def containers(
    start_container: Callable[..., Container], mounted_bundle: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Container]:
    """The three containers, started together (they warm up in parallel) and waited for."""
    started = {
        "plain": start_container(),
        "read_only": start_container(*_read_only(tmp_path_factory.mktemp("read-only"))),
        "mounted": start_container(
            *_read_only(tmp_path_factory.mktemp("mounted-read-only")),
            "--volume",
            f"{mounted_bundle}:{MOUNTED_AT}:ro",
            "--env",
            f"VLLTR_BUNDLE={MOUNTED_AT}",
        ),
    }
    return {name: container.wait_ready() for name, container in started.items()}


@pytest.fixture(scope="module")
def demo_bundle(image: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo bundle copied out of the image."""
    target = tmp_path_factory.mktemp("demo-from-image") / "bundle"
    name = f"vlltr-test-cp-{secrets.token_hex(4)}"
    subprocess.run(podman_image.podman_argv("create", "--name", name, image), check=True, capture_output=True)
    try:
        subprocess.run(
            podman_image.podman_argv("cp", f"{name}:{DEMO_BUNDLE}", str(target)), check=True, capture_output=True
        )
    finally:
        subprocess.run(podman_image.podman_argv("rm", "--force", name), capture_output=True)
    return target


def _digit_pngs(per_digit: int = 1) -> list[tuple[int, bytes]]:
    """`per_digit` PNGs of each digit, drawn as Digits-LT draws them from scikit-learn's handwritten digits
    (the demo may have trained on some of them)."""
    from sklearn.datasets import load_digits

    from vlltr.training.benchmarks.digits import digit_png

    digits = load_digits()
    out = []
    for digit in range(10):
        for index in np.flatnonzero(digits.target == digit)[-per_digit:]:
            buf = io.BytesIO()
            Image.fromarray(digit_png(digits.images[int(index)]), "L").save(buf, format="PNG")
            out.append((digit, buf.getvalue()))
    return out


def _service_bundle_images(bundle: Path, n: int) -> list[bytes]:
    data = bundle.parent / "run" / "data"
    lines = [line for line in (data / "test.txt").read_text().splitlines() if line][:n]
    return [(data / line.split()[0]).read_bytes() for line in lines]


def _classify(container: Container, data: bytes, top_k: int) -> dict[str, Any]:
    r = httpx.post(f"{container.url}/v1/classify", params={"top_k": top_k}, files={"file": ("x.png", data)}, timeout=30)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def _assert_same_as_offline(container: Container, bundle_dir: Path, images: list[bytes]) -> list[int]:
    """Every image's scores from the container equal the in-process predictor's; returns the top-1 ids."""
    predictor = BundlePredictor(load_bundle(bundle_dir), provider="cpu")
    k = predictor.bundle.num_classes
    top1 = []
    for data in images:
        body = _classify(container, data, top_k=k)
        assert body["bundle_id"] == predictor.bundle.bundle_id
        expected = predictor.top_k([Image.open(io.BytesIO(data))], k=k)[0]
        got = {p["class_id"]: p["score"] for p in body["predictions"]}
        assert set(got) == {p.class_id for p in expected}
        for p in expected:
            assert got[p.class_id] == pytest.approx(p.score, abs=1e-5)
        assert body["predictions"][0]["label"] == expected[0].label
        top1.append(body["predictions"][0]["class_id"])
    return top1


# --- nothing mounted: the demo ---------------------------------------------------------------------------


def test_image_serves_the_demo_bundle_with_nothing_mounted(containers: dict[str, Container], demo_bundle: Path) -> None:
    manifest = json.loads((demo_bundle / "manifest.json").read_text(encoding="utf-8"))
    for name in ("plain", "read_only"):
        container = containers[name]
        ready = httpx.get(f"{container.url}/readyz", timeout=5)
        assert ready.status_code == 200 and ready.json()["ready"] is True
        info = httpx.get(f"{container.url}/v1/model", timeout=5).json()
        assert info["bundle_id"] == manifest["bundle_id"], name
        assert info["dataset"] == "digits-lt", name
        assert info["provider"] == "cpu" and info["classes"]["trained"] == 10, name


def test_image_healthcheck_passes(containers: dict[str, Container]) -> None:
    """The Dockerfile's HEALTHCHECK command, run by podman in the container, reports healthy."""
    proc = subprocess.run(
        podman_image.podman_argv("healthcheck", "run", containers["plain"].name),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, f"healthcheck failed: {proc.stdout}{proc.stderr}"


def test_demo_in_the_image_classifies_digits(containers: dict[str, Container], demo_bundle: Path) -> None:
    digits = _digit_pngs(per_digit=5)
    top1 = _assert_same_as_offline(containers["plain"], demo_bundle, [data for _, data in digits])
    # The demo is a trained model, not a random one: chance is one digit in ten (it gets about 80%).
    correct = sum(int(got == digit) for got, (digit, _) in zip(top1, digits))
    assert correct >= len(digits) // 2, f"the demo got {correct}/{len(digits)} digits right: {top1}"
    # The read-only container serves the same model.
    assert _assert_same_as_offline(containers["read_only"], demo_bundle, [digits[0][1]]) == top1[:1]


@pytest.mark.parametrize("name", ["plain", "read_only"])
def test_image_adds_a_class_by_text_with_the_admin_token(containers: dict[str, Container], name: str) -> None:
    container = containers[name]
    body = {"name": "eleven", "descriptions": ["Two straight vertical strokes side by side.", "It looks like ll."]}
    refused = httpx.post(f"{container.url}/v1/classes", json=body, timeout=30)
    assert refused.status_code == 401, refused.text
    created = httpx.post(f"{container.url}/v1/classes", json=body, headers=AUTH, timeout=60)
    assert created.status_code == 201, created.text
    info = httpx.get(f"{container.url}/v1/model", timeout=5).json()
    assert info["classes"] == {"trained": 10, "added": 1, "total": 11}
    listed = httpx.get(f"{container.url}/v1/classes", timeout=5).json()
    assert [c["name"] for c in listed["classes"] if c["source"] == "added"] == ["eleven"]
    _, data = _digit_pngs()[1]
    answer = _classify(container, data, top_k=11)
    assert "eleven" in [p["label"] for p in answer["predictions"]]
    assert answer["class_table_version"] == created.json()["class_table_version"]
    # Removed again, so the other tests see the trained classes only.
    deleted = httpx.delete(f"{container.url}/v1/classes/eleven", headers=AUTH, timeout=30)
    assert deleted.status_code == 200, deleted.text
    assert httpx.get(f"{container.url}/v1/model", timeout=5).json()["classes"]["added"] == 0


def test_image_runs_as_the_service_user_without_torch(containers: dict[str, Container]) -> None:
    container = containers["plain"]
    uid = container.exec("id", "-u")
    assert uid.returncode == 0 and uid.stdout.strip() == str(SERVICE_UID), uid.stdout + uid.stderr
    imported = container.exec("python", "-c", "import torch")
    assert imported.returncode != 0 and "No module named 'torch'" in imported.stderr, imported.stderr
    found = container.exec(
        "python",
        "-c",
        "import importlib.util, sys; print([m for m in ('torch', 'torchvision', 'open_clip') "
        "if importlib.util.find_spec(m)]); print(sys.prefix)",
    )
    assert found.returncode == 0 and found.stdout.split("\n")[0] == "[]", found.stdout + found.stderr
    listing = container.exec("sh", "-c", "ls /opt/venv/lib/python3*/site-packages")
    assert listing.returncode == 0 and "onnxruntime" in listing.stdout
    assert not [n for n in listing.stdout.split() if "torch" in n.lower()], listing.stdout
    # The demo bundle is part of the image, not the service user's to change.
    write = container.exec("sh", "-c", f"touch {DEMO_BUNDLE}/manifest.json")
    assert write.returncode != 0


# --- a bundle mounted read-only ---------------------------------------------------------------------------


def test_a_mounted_bundle_named_by_vlltr_bundle_replaces_the_demo(
    containers: dict[str, Container], mounted_bundle: Path, service_bundle: Path, demo_bundle: Path
) -> None:
    container = containers["mounted"]
    manifest = json.loads((mounted_bundle / "manifest.json").read_text(encoding="utf-8"))
    demo_id = json.loads((demo_bundle / "manifest.json").read_text(encoding="utf-8"))["bundle_id"]
    info = httpx.get(f"{container.url}/v1/model", timeout=5).json()
    assert info["bundle_id"] == manifest["bundle_id"] != demo_id
    _assert_same_as_offline(container, mounted_bundle, _service_bundle_images(service_bundle, 6))
