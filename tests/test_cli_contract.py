"""The command's contract (issue 20): one override syntax for every command that reads a config (bare
KEY=VALUE words and --set KEY=VALUE, in any mix), every user-facing error derives from L2CError and
exits 2 with its message, and a plain bug is not reported as bad input."""

from __future__ import annotations

from dataclasses import replace

import pytest

import l2c_llava.cli as cli
from l2c_llava.cli import build_parser, main, parse_args
from l2c_llava.cli.help import subcommands, walk
from l2c_llava.errors import InputError, L2CError

# every command that reads a config, with a shipped config of its recipe
CONFIG_COMMANDS = {
    "stage1 train": "stage1/quick",
    "stage1 eval": "stage1/quick",
    "stage2 cache": "stage2/quick",
    "stage2 train": "stage2/quick",
    "stage2 eval": "stage2/quick",
    "clip pretrain": "stage2/clip_quick",
    "mllm pretrain": "mllm/quick_pretrain",
    "mllm finetune": "mllm/quick_finetune",
    "pipeline": "pipeline/quick",
}


def test_the_table_names_every_command_that_takes_a_config():
    taking = {
        path
        for path, p in walk(build_parser())
        if not subcommands(p) and any(a.dest == "config" for a in p._actions)
    }
    assert taking == set(CONFIG_COMMANDS)


@pytest.mark.parametrize("path", sorted(CONFIG_COMMANDS))
def test_every_config_command_takes_both_override_forms(path):
    words = [*path.split(), "--config", CONFIG_COMMANDS[path]]
    assert parse_args([*words, "a.b=1", "c=2"]).overrides == ["a.b=1", "c=2"]
    assert parse_args([*words, "--set", "a.b=1", "--set", "c=2"]).overrides == ["a.b=1", "c=2"]
    assert parse_args([*words, "a.b=1", "--set", "c=2", "d=3"]).overrides == ["a.b=1", "c=2", "d=3"]
    assert parse_args(["--verbose", *words, "--set", "c=2"]).overrides == ["c=2"]


def test_validate_takes_both_override_forms():
    args = parse_args(["validate", "stage2/quick", "train.lr=1e-4", "--set", "train.epochs=2", "--print"])
    assert args.configs == ["stage2/quick"] and args.overrides == ["train.lr=1e-4", "train.epochs=2"]
    args = parse_args(["validate", "stage2/quick", "stage1/quick", "--set", "run.seed=3"])
    assert args.configs == ["stage2/quick", "stage1/quick"] and args.overrides == ["run.seed=3"]


def test_an_override_of_a_command_without_a_config_is_refused(capsys):
    for argv in (["ls", "a=1"], ["ls", "--set", "a=1"], ["stage2", "train", "--config", "q", "--bogus"]):
        with pytest.raises(SystemExit) as e:
            parse_args(argv)
        assert e.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted(CONFIG_COMMANDS))
def test_an_override_reaches_the_config_before_anything_loads(path, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a config's run.root moves the command there
    bad = "train.lr=-3" if path != "pipeline" else "eval.limit=-1"
    for form in ([bad], ["--set", bad]):
        code = main([*path.split(), "--config", CONFIG_COMMANDS[path], *form])
        err = capsys.readouterr().err
        assert code == 2, err
        assert err.startswith(f"l2c {path}: ") and bad.split("=")[0] in err, err


def test_an_l2c_error_exits_2_with_its_message_and_a_bug_keeps_its_traceback(monkeypatch, capsys):
    monkeypatch.setitem(
        cli.COMMANDS,
        "ls",
        replace(cli.COMMANDS["ls"], run=lambda args: (_ for _ in ()).throw(InputError("file X: do Y"))),
    )
    assert main(["ls"]) == 2
    assert capsys.readouterr().err.strip() == "l2c ls: file X: do Y"
    for bug in (ValueError("a bug"), RuntimeError("a bug"), FileExistsError("a bug"), TypeError("a bug")):
        assert not isinstance(bug, L2CError)
        monkeypatch.setitem(
            cli.COMMANDS,
            "ls",
            replace(cli.COMMANDS["ls"], run=lambda args, bug=bug: (_ for _ in ()).throw(bug)),
        )
        with pytest.raises(type(bug)):
            main(["ls"])


def test_every_error_class_of_the_package_derives_from_l2c_error():
    import importlib
    import inspect
    import pkgutil

    import l2c_llava

    skip = {"l2c_llava.webdemo", "l2c_llava.mllm.lmms_entry"}  # optional extras (gradio, lmms-eval)
    found = []
    for m in pkgutil.walk_packages(l2c_llava.__path__, "l2c_llava."):
        if m.name in skip:
            continue
        mod = importlib.import_module(m.name)
        for name, obj in vars(mod).items():
            if inspect.isclass(obj) and issubclass(obj, Exception) and obj.__module__ == m.name:
                found.append(obj)
                assert issubclass(obj, L2CError), f"{m.name}.{name} does not derive from L2CError"
    # the generic errors of errors.py and the classes a caller tells apart (tests/test_import_rules.py)
    names = {c.__name__ for c in found}
    assert {"L2CError", "InputError", "MissingFileError", "OutputError", "CannotRunError"} <= names
    assert {"ConfigError", "DataError", "ImageError", "BuildError", "SearchError"} <= names
    assert len(found) >= 15


def test_the_command_table_is_the_parser():
    leaves = {path for path, p in walk(build_parser()) if path and not subcommands(p)}
    assert leaves == set(cli.COMMANDS)
    assert {path for path, c in cli.COMMANDS.items() if c.config} == set(CONFIG_COMMANDS)
