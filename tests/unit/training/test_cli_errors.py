"""A user's mistake on the command line is one line `vlltr <command>: <message>` and exit status 2; `-v` adds
the traceback; a fault of the program keeps its traceback. In-process; tests/e2e/test_cli_errors.py runs the
console command."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from vlltr import cli
from vlltr.cli import main


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run `vlltr argv`, expect status 2, return stderr (which must be one line)."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.rstrip("\n")


@pytest.mark.parametrize(
    "argv, line",
    [
        (
            ["data", "shapes-lt", "--monochrome-sessions", "2", "--out", "{tmp}/x"],
            "vlltr data shapes-lt: monochrome_prob must be in [0, 1], got 2.0",
        ),
        (
            ["data", "shapes-lt", "--imbalance", "0", "--out", "{tmp}/x"],
            "vlltr data shapes-lt: imbalance must be >= 1 (n_max / n_min), got 0.0",
        ),
        (
            ["train", "--config", "digits-lt-tiny", "--out", "{tmp}/run", "--set", "stage1.epochs=ten"],
            "vlltr train: stage1.epochs: expected an integer, got 'ten'",
        ),
        (
            ["export", "--checkpoint", "{tmp}/nowhere", "--out", "{tmp}/bundle"],
            "vlltr export: {tmp}/nowhere/model.pt is missing: is {tmp}/nowhere a finished `vlltr train` run?",
        ),
        (
            ["eval", "--checkpoint", "{tmp}/nowhere"],
            "vlltr eval: {tmp}/nowhere/model.pt is missing: is {tmp}/nowhere a finished `vlltr train` run?",
        ),
    ],
)
def test_a_users_mistake_is_one_line_and_status_2(argv, line, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert _fails(argv, capsys) == line.format(tmp=tmp_path)
    assert not (tmp_path / "x").exists() and not (tmp_path / "bundle").exists()


def test_an_unknown_config_names_the_bundled_ones(tmp_path, capsys):
    err = _fails(["train", "--config", "nonexistent", "--out", str(tmp_path / "run")], capsys)
    assert err.startswith("vlltr train: config 'nonexistent' not found (bundled configs: [") and "digits-lt-tiny" in err


def test_an_unknown_architecture_is_one_line(tmp_path, capsys):
    argv = ["train", "--config", "digits-lt-tiny", "--out", str(tmp_path / "r"), "--set", "model.arch=ViT-Q-99"]
    assert _fails(argv, capsys).startswith("vlltr train: unknown architecture 'ViT-Q-99' (model.arch)")


def _folder_dataset(root: Path) -> Path:
    for split in ("train", "val", "test"):
        for name in ("owl", "fox"):
            path = root / split / name / "a.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (16, 16), (10, 200, 30)).save(path)
    (root / "text").mkdir()
    (root / "text" / "owl.txt").write_text("An owl hunts at night.\n")  # the fox has no text
    return root


def test_a_folder_dataset_without_classes_txt_gets_past_the_class_names(tmp_path, capsys):
    # It used to stop on the missing classes.txt with a traceback; the classes are now its folders, and the
    # next problem (a class without text) is one line naming the class by its folder.
    root = _folder_dataset(tmp_path / "data")
    folder = [
        f"data.root={root}",
        "data.format=folder",
        "data.train=train",
        "data.val=val",
        "data.test=test",
        "data.templates=none",
        "data.text_pattern='{name}.txt'",
    ]
    argv = ["train", "--config", "digits-lt-tiny", "--out", str(tmp_path / "run")]
    for item in folder:
        argv += ["--set", item]
    err = _fails(argv, capsys)
    assert err.startswith("vlltr train: class 0 ('fox') has no description file") and "fox.txt" in err
    argv[4] = str(tmp_path / "run2")
    assert _fails([*argv, "--set", "data.class_names=names.txt"], capsys) == (
        f"vlltr train: class names file '{root / 'names.txt'}' does not exist"
    )


def test_verbose_shows_the_traceback_too(tmp_path, capsys):
    for argv in (
        ["data", "shapes-lt", "--imbalance", "0", "--out", str(tmp_path / "x"), "-v"],
        ["-v", "data", "shapes-lt", "--imbalance", "0", "--out", str(tmp_path / "x")],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("Traceback") and "vlltr.errors.DataError: imbalance must be >= 1" in err
        assert (
            err.rstrip("\n").splitlines()[-1] == "vlltr data shapes-lt: imbalance must be >= 1 (n_max / n_min), got 0.0"
        )


def test_a_programming_error_keeps_its_traceback(monkeypatch, tmp_path):
    def broken(args):
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "_dispatch", broken)
    with pytest.raises(KeyError, match="a bug"):
        main(["data", "digits-lt", "--out", str(tmp_path / "x")])


def test_a_message_over_several_lines_is_printed_on_one(monkeypatch, capsys):
    from vlltr.errors import ExportError

    def fails(args):
        raise ExportError("first part\n  second part")

    monkeypatch.setattr(cli, "_dispatch", fails)
    assert _fails(["export", "--checkpoint", "r", "--out", "b"], capsys) == "vlltr export: first part second part"
