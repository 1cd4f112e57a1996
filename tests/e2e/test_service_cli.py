"""The `vlltr serve` command as a user runs it: its help, start-up failures that must be loud (CUDA asked for where
it does not work, a corrupt bundle, a failing demo build), and the embedded default (the demo bundle under the
cache dir, built on the first start, and a local class store)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from PIL import Image

from support.paths import REPO
from support.programs import PIP_LINE
from vlltr.service import demo
from vlltr.service.cli import flag_name
from vlltr.service.settings import Settings, env_name


def test_console_script_help_lists_every_flag():
    out = subprocess.run(
        [sys.executable, "-m", "vlltr.cli", "serve", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    for name in Settings.model_fields:
        assert flag_name(name) in out.stdout and env_name(name) in out.stdout


def _serve_and_fail(args: list[str], tmp_path: Path, **extra_env: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLTR_")}
    env["VLLTR_CACHE_DIR"] = str(tmp_path / "cache")
    env.update(extra_env)
    return subprocess.run(
        [sys.executable, "-m", "vlltr.cli", "serve", "--port", "0", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_provider_cuda_without_cuda_fails_loudly_at_start(service_bundle, tmp_path):
    # No GPU visible to the process: the `cpu` extra's onnxruntime has no CUDA provider at all, the `gpu` extra's
    # cannot start one; either way `--provider cuda` must stop the start, saying why.
    out = _serve_and_fail(["--bundle", str(service_bundle), "--provider", "cuda"], tmp_path, CUDA_VISIBLE_DEVICES="")
    assert out.returncode == 2
    assert "cuda requested" in out.stderr and "Traceback" not in out.stderr


def test_a_corrupt_bundle_is_refused_naming_the_file(service_bundle, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(service_bundle, broken)
    classes = json.loads((broken / "classes.json").read_text())
    classes[0]["name"] = "tampered"
    (broken / "classes.json").write_text(json.dumps(classes))
    out = _serve_and_fail(["--bundle", str(broken)], tmp_path)
    assert out.returncode == 2
    assert "classes.json: size mismatch" in out.stderr and "Traceback" not in out.stderr


def test_failed_demo_build_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "training_available", lambda: True)
    with pytest.raises(demo.DemoBundleError, match="exited with 1"):
        demo.ensure_demo_bundle(tmp_path, python="/bin/false")
    assert not (tmp_path / demo.DEMO_DIRNAME).exists()
    assert not list(tmp_path.glob(f"{demo.DEMO_DIRNAME}.partial-*"))


def test_embedded_default_serves_the_demo_bundle_with_a_local_class_store(service_bundle, server_factory, tmp_path):
    shutil.copytree(service_bundle, tmp_path / "cache" / demo.DEMO_DIRNAME)
    server = server_factory(workdir=tmp_path)  # no bundle, no Redis, nothing set
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            info = c.get("/v1/model").json()
            manifest = json.loads((service_bundle / "manifest.json").read_text())
            assert info["bundle_id"] == manifest["bundle_id"]
            r = c.post("/v1/classes", json={"name": "local", "descriptions": ["kept in the cache dir"]})
            assert r.status_code == 201
        lines = [json.loads(line) for line in (tmp_path / "cache" / "classes.jsonl").read_text().splitlines()]
        assert lines[0]["format"] == "vlltr-class-store"
        assert [line["record"]["name"] for line in lines if line.get("op") == "add"] == ["local"]
        assert [line["bundle"] for line in lines if line.get("op") == "derived"] == [manifest["bundle_id"]]
        metrics = httpx.get(f"{server.url}/metrics").text
        assert "vlltr_redis_up" not in metrics
    finally:
        server.stop()


@pytest.mark.slow
def test_first_start_builds_the_demo_bundle_and_later_starts_reuse_it(server_factory, tmp_path):
    assert demo.training_available(), f"the first start builds the demo bundle with the training extra: {PIP_LINE}"
    server = server_factory(workdir=tmp_path, timeout=600)  # nothing set: builds the demo bundle first
    try:
        log = server.log_path.read_text(errors="replace")
        assert "building the demo bundle" in log and "demo bundle:" in log  # the progress bar
        with httpx.Client(base_url=server.url, timeout=30) as c:
            info = c.get("/v1/model").json()
            data = io.BytesIO()
            Image.new("RGB", (32, 32), (250, 250, 250)).save(data, "PNG")
            r = c.post("/v1/classify", files={"file": ("a.png", data.getvalue())})
            assert r.status_code == 200 and r.json()["bundle_id"] == info["bundle_id"]
        assert (tmp_path / "cache" / demo.DEMO_DIRNAME / "manifest.json").is_file()
        server.restart()
        assert (
            server.log_path.read_text(errors="replace").count("building the demo bundle") == 2
        )  # the log line and the stderr line, once
        with httpx.Client(base_url=server.url, timeout=30) as c:
            assert c.get("/v1/model").json()["bundle_id"] == info["bundle_id"]
    finally:
        server.stop()
