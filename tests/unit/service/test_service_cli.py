"""`vlltr serve` in-process: flags derived from the settings, environment variables, the demo bundle reused once
built, and the message without the training stack. tests/e2e/test_service_cli.py runs the command."""

from __future__ import annotations

import os
import shutil
import typing
from pathlib import Path

import pytest
from pydantic import SecretStr

from vlltr.service import demo
from vlltr.service.cli import build_parser, flag_name, settings_from_args
from vlltr.service.settings import Settings, env_name


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


def test_admin_token_never_appears_in_help_or_logs(monkeypatch, capsys):
    monkeypatch.setenv("VLLTR_ADMIN_TOKEN", "very-secret-value")
    assert "very-secret-value" not in build_parser().format_help()
    assert "very-secret-value" not in repr(Settings())


def test_demo_bundle_is_reused_when_built(bundle_v1, tmp_path):
    target = tmp_path / demo.DEMO_DIRNAME
    shutil.copytree(bundle_v1, target)
    # `/bin/false` as the interpreter: any build attempt would fail, so success means it was reused.
    assert demo.ensure_demo_bundle(tmp_path, python="/bin/false") == target


def test_missing_training_stack_gives_a_clear_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "training_available", lambda: False)
    for key in [k for k in os.environ if k.startswith("VLLTR_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("VLLTR_CACHE_DIR", str(tmp_path))
    from vlltr.service.cli import main

    assert main([]) == 2
    err = capsys.readouterr().err
    assert "pip install .[train]" in err and "--bundle" in err
