"""The code style, checked (issue 20): every Python file is as ``ruff format`` writes it (no
formatter escapes) and passes ``ruff check`` with the project's rules (pyproject.toml). Ruff is a
dev dependency pinned to one minor version, so its formatting does not drift under the suite."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff() -> list[str]:
    exe = Path(sys.executable).with_name("ruff")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("ruff")
    if not found:
        pytest.skip("ruff is not installed (it is in the dev extra: pip install -e .[dev])")
    return [found]


def _python_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return out.stdout.split()


def test_every_file_is_formatted():
    files = _python_files()
    r = subprocess.run([*_ruff(), "format", "--check", *files], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, f"run `ruff format` on:\n{r.stdout}{r.stderr}"


def test_no_fmt_skip_escapes():
    marker = "# fmt: " + "skip"  # spelled in two parts, so this file does not hold it
    escaped = [f for f in _python_files() if marker in (ROOT / f).read_text()]
    assert not escaped, f"{marker!r} in {escaped}: let ruff format the line"


def test_lint_rules_pass():
    r = subprocess.run([*_ruff(), "check", *_python_files()], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
