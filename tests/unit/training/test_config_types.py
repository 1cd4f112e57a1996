"""Config values are checked against their declared types when the config loads, naming the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from vlltr.errors import ConfigError
from vlltr.training.config import BUNDLED_CONFIG_DIR, Config, config_from_dict, load_config, save_config


@pytest.mark.parametrize(
    "override, message",
    [
        ("stage1.epochs=ten", "stage1.epochs: expected an integer, got 'ten'"),
        ("stage1.epochs=2.5", "stage1.epochs: expected an integer, got 2.5"),
        # YAML's true is a bool, and a bool is an int in Python: refused, `epochs: true` is a mistake.
        ("stage1.epochs=true", "stage1.epochs: expected an integer, got True"),
        ("stage2.lr=fast", "stage2.lr: expected a number, got 'fast'"),
        ("stage2.lr=false", "stage2.lr: expected a number, got False"),
        ("stage2.amp=1", "stage2.amp: expected true or false, got 1"),
        ("stage2.amp=maybe", "stage2.amp: expected true or false, got 'maybe'"),
        ("model.arch=[a, b]", "model.arch: expected a string, got ['a', 'b']"),
        ("data.name=2018", "data.name: expected a string, got 2018 (quote it to keep it as text: '2018')"),
        ("data.val=7", "data.val: expected a string or null, got 7 (quote it to keep it as text: '7')"),
        ("model.pretrained={a: 1}", "model.pretrained: expected a string or null, got {'a': 1}"),
        ("data.mean=0.5", "data.mean: expected a list of numbers, got 0.5"),
        ("data.mean=[0.5, x, 0.5]", "data.mean[1]: expected a number, got 'x'"),
        (
            "data.drop_sections=[References, 3]",
            "data.drop_sections[1]: expected a string, got 3 (quote it to keep it as text: '3')",
        ),
        ("stage1=5", "stage1: expected a mapping, got int"),
        ("stage2.loss=la", "stage2.loss: 'la' is not one of ['ce', 'logit_adjusted']"),
    ],
)
def test_a_value_of_the_wrong_type_is_refused_with_its_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_config("digits-lt-tiny", [override])
    assert str(info.value) == message


def test_ints_are_accepted_where_a_float_is_declared_and_become_floats():
    # YAML reads `lr: 1` and `min_lr: 0` as ints.
    cfg = load_config("digits-lt-tiny", ["stage2.lr=1", "stage1.min_lr=0", "data.mean=[0, 1, 0.5]"])
    assert cfg.stage2.lr == 1.0 and isinstance(cfg.stage2.lr, float)
    assert isinstance(cfg.stage1.min_lr, float)
    assert cfg.data.mean == [0.0, 1.0, 0.5] and all(isinstance(v, float) for v in cfg.data.mean)


def test_null_is_accepted_where_the_key_allows_it():
    cfg = load_config("digits-lt-tiny", ["data.val=null", "model.pretrained=~", "data.heldout=null"])
    assert cfg.data.val is None and cfg.model.pretrained is None and cfg.data.heldout is None
    with pytest.raises(ConfigError, match="data.train: expected a string, got None"):
        load_config("digits-lt-tiny", ["data.train=null"])


def test_the_error_names_the_key_in_a_config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("stage1:\n  epochs: 3\n  batch_size: big\n")
    with pytest.raises(ConfigError, match=r"^stage1\.batch_size: expected an integer, got 'big'$"):
        load_config(path)
    path.write_text("stage1: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"^stage1: expected a mapping, got list$"):
        load_config(path)


def test_malformed_yaml_is_a_config_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("stage1:\n  epochs: [1,\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"override 'data.text_pattern=\{id\}.txt': the value is not valid YAML"):
        load_config("digits-lt-tiny", ["data.text_pattern={id}.txt"])
    # Quoted, the same value is a string.
    assert load_config("digits-lt-tiny", ["data.text_pattern='{id}.txt'"]).data.text_pattern == "{id}.txt"


def test_defaults_and_every_bundled_config_pass_their_own_types(tmp_path):
    assert config_from_dict(Config().to_dict()) == Config()
    for path in sorted(BUNDLED_CONFIG_DIR.glob("*.yaml")):
        cfg = load_config(path)
        # A saved config loads back to the same values (a resumed run compares them).
        save_config(cfg, tmp_path / "saved.yaml")
        assert load_config(tmp_path / "saved.yaml") == cfg, path.name


def test_every_declared_type_is_one_the_checker_knows():
    # A new field of a type the checker does not handle must fail here, not when a user sets it.
    def walk(cls: type) -> None:
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default):
                walk(type(default))
            else:
                config_from_dict(_nested(cls, f.name, default))

    def _nested(cls: type, name: str, value: object) -> dict:
        for section in dataclasses.fields(Config):
            if section.default_factory is not dataclasses.MISSING and type(section.default_factory()) is cls:
                return {section.name: {name: value}}
        raise AssertionError(cls)

    walk(Config)


def test_a_saved_run_config_with_int_floats_still_resumes(tmp_path):
    # config.yaml files written before values were typed may hold `lr: 1`; they load, with the same value.
    values = Config().to_dict()
    values["stage2"]["lr"] = 1
    Path(tmp_path / "config.yaml").write_text(yaml.safe_dump(values))
    assert load_config(tmp_path / "config.yaml").stage2.lr == 1.0
