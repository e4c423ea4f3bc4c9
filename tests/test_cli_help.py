"""The command documents itself (issue 19): help on every option, an example per command that parses
and names configs that exist, ``--version``, and ``python -m l2c_llava``."""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys

import pytest

from l2c_llava.cli import build_parser, main, parse_args
from l2c_llava.cli.help import EXAMPLES, subcommands, walk


def test_every_option_of_every_command_has_help_and_every_command_an_example():
    missing, no_example = [], []
    for path, p in walk(build_parser()):
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                continue
            if not (a.help and a.help.strip()):
                missing.append(f"l2c {path}: {a.option_strings or a.dest}")
        if not (p.epilog and "examples:\n  l2c" in p.epilog):
            no_example.append(f"l2c {path}".strip())
    assert not missing, missing
    assert not no_example, no_example


def test_every_leaf_command_has_its_own_examples_and_they_parse():
    from l2c_llava.config_names import resolve_config

    parser = build_parser()
    leaves = {path for path, p in walk(parser) if path and not subcommands(p)}
    assert leaves <= set(EXAMPLES), sorted(leaves - set(EXAMPLES))
    assert set(EXAMPLES) - {""} <= {path for path, _ in walk(parser)}  # no example of a command that is gone
    for path, lines in EXAMPLES.items():
        for line in lines:
            words = shlex.split(line.split("  #")[0])
            assert words[0] == "l2c"
            args = parse_args(words[1:], parser)  # SystemExit (a failure) if it does not parse
            chosen = " ".join(
                str(v) for k, v in sorted(vars(args).items()) if k == "command" or k.endswith("_command")
            )
            assert path == "" or path.split()[0] == args.command, (line, chosen)
            config = getattr(args, "config", None)
            if config is not None:  # a config an example names is one the checkout ships
                resolve_config(config, args.command)  # MissingFileError (a failure) if not


def test_version_and_python_dash_m(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("l2c-llava ")
    r = subprocess.run([sys.executable, "-m", "l2c_llava", "ls"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "quick" in r.stdout, r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "l2c_llava", "data", "filter", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and "examples:\n  l2c data filter" in r.stdout
