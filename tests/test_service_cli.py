"""`vlltr serve`: flags derived from the settings, environment variables, start-up failures that must be
loud, and the embedded default (demo bundle under the cache dir, local class store)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import httpx
import pytest
from PIL import Image
from pydantic import SecretStr

from vlltr.service import demo
from vlltr.service.cli import build_parser, flag_name, settings_from_args
from vlltr.service.settings import Settings, env_name

REPO = Path(__file__).resolve().parents[1]


def _sample(name: str) -> tuple[str, object]:
    """A valid non-default value for a field, as text and as the parsed value."""
    field = Settings.model_fields[name]
    ann = field.annotation
    args = [a for a in typing.get_args(ann) if a is not type(None)]
    base = args[0] if args and typing.get_origin(ann) is not typing.Literal else ann
    if typing.get_origin(ann) is typing.Literal:
        choice = next(c for c in typing.get_args(ann) if c != field.default)
        return str(choice), choice
    special = {
        "redis_url": ("redis://h:1/0", "redis://h:1/0"),
        "duplicate_threshold": ("0.5", 0.5),
        "sync_interval_s": ("0.25", 0.25),
    }
    if name in special:
        return special[name]
    if base is bool:
        return ("false", False) if field.default else ("true", True)
    if base is int:
        return "7", 7
    if base is float:
        return "1.5", 1.5
    if base is Path:
        return "/tmp/vlltr-x", Path("/tmp/vlltr-x")
    if base is SecretStr:
        return "tok", "tok"
    return "x.example", "x.example"


def _value(settings: Settings, name: str) -> object:
    value = getattr(settings, name)
    return value.get_secret_value() if isinstance(value, SecretStr) else value


def test_every_setting_has_an_env_var_a_flag_and_a_help_line(monkeypatch):
    parser = build_parser()
    actions = {a.dest: a for a in parser._actions}
    help_text = parser.format_help()
    for name, field in Settings.model_fields.items():
        assert field.description, f"{name} has no description"
        action = actions[name]
        assert flag_name(name) in action.option_strings
        assert field.description in action.help and env_name(name) in action.help
        assert flag_name(name) in help_text
        text, parsed = _sample(name)
        for other in os.environ:
            if other.startswith("VLLTR_"):
                monkeypatch.delenv(other)
        monkeypatch.setenv(env_name(name), text)
        assert _value(Settings(), name) == parsed, f"{env_name(name)} is not read"
        monkeypatch.delenv(env_name(name))
        flag = (
            [flag_name(name)]
            if isinstance(parsed, bool) and parsed
            else ([f"--no-{flag_name(name)[2:]}"] if isinstance(parsed, bool) else [flag_name(name), text])
        )
        assert _value(settings_from_args(flag), name) == parsed, f"{flag} is not read"


def test_flags_win_over_the_environment(monkeypatch):
    monkeypatch.setenv("VLLTR_PORT", "9001")
    monkeypatch.setenv("VLLTR_MAX_WAIT_MS", "7")
    settings = settings_from_args(["--port", "9002"])
    assert settings.port == 9002 and settings.max_wait_ms == 7


def test_invalid_values_name_the_flag_or_variable(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exc:
        settings_from_args(["--max-batch-size", "0"])
    assert exc.value.code == 2
    assert "--max-batch-size" in capsys.readouterr().err
    monkeypatch.setenv("VLLTR_REDIS_URL", "http://nope")
    with pytest.raises(SystemExit):
        settings_from_args([])
    assert "VLLTR_REDIS_URL" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        settings_from_args(["--provider", "tpu"])


def test_buckets_are_powers_of_two_up_to_the_max():
    assert Settings(max_batch_size=32).buckets == (1, 2, 4, 8, 16, 32)
    assert Settings(max_batch_size=48).buckets == (1, 2, 4, 8, 16, 32, 48)
    assert Settings(max_batch_size=1).buckets == (1,)


def test_console_script_help_lists_every_flag():
    out = subprocess.run(
        [sys.executable, "-m", "vlltr.cli", "serve", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    for name in Settings.model_fields:
        assert flag_name(name) in out.stdout and env_name(name) in out.stdout


def test_admin_token_never_appears_in_help_or_logs(monkeypatch, capsys):
    monkeypatch.setenv("VLLTR_ADMIN_TOKEN", "very-secret-value")
    assert "very-secret-value" not in build_parser().format_help()
    assert "very-secret-value" not in repr(Settings())


def _serve_and_fail(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLTR_")}
    env["VLLTR_CACHE_DIR"] = str(tmp_path / "cache")
    return subprocess.run(
        [sys.executable, "-m", "vlltr.cli", "serve", "--port", "0", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_provider_cuda_without_cuda_fails_loudly_at_start(service_bundle, tmp_path):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine's onnxruntime offers CUDA")
    out = _serve_and_fail(["--bundle", str(service_bundle), "--provider", "cuda"], tmp_path)
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


def test_demo_bundle_is_reused_when_built(service_bundle, tmp_path):
    target = tmp_path / demo.DEMO_DIRNAME
    shutil.copytree(service_bundle, target)
    # `/bin/false` as the interpreter: any build attempt would fail, so success means it was reused.
    assert demo.ensure_demo_bundle(tmp_path, python="/bin/false") == target


def test_failed_demo_build_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "training_available", lambda: True)
    with pytest.raises(demo.DemoBundleError, match="exited with 1"):
        demo.ensure_demo_bundle(tmp_path, python="/bin/false")
    assert not (tmp_path / demo.DEMO_DIRNAME).exists()
    assert not list(tmp_path.glob(f"{demo.DEMO_DIRNAME}.partial-*"))


def test_missing_training_stack_gives_a_clear_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "training_available", lambda: False)
    for key in [k for k in os.environ if k.startswith("VLLTR_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("VLLTR_CACHE_DIR", str(tmp_path))
    from vlltr.service.cli import main

    assert main([]) == 2
    err = capsys.readouterr().err
    assert "pip install .[train]" in err and "--bundle" in err


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
        stored = json.loads((tmp_path / "cache" / "classes.json").read_text())
        assert "local" in stored["bundles"][manifest["bundle_id"]]["classes"]
        metrics = httpx.get(f"{server.url}/metrics").text
        assert "vlltr_redis_up" not in metrics
    finally:
        server.stop()


@pytest.mark.slow
def test_first_start_builds_the_demo_bundle_and_later_starts_reuse_it(server_factory, tmp_path):
    if not demo.training_available():
        pytest.skip("the training extra is not installed")
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
