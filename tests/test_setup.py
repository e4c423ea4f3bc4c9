"""The set-up script is idempotent and keeps torchvision out of the CPU environment."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from .conftest import ROOT


@pytest.mark.skipif(
    not (ROOT / ".venv" / ".l2c-stamp").is_file(), reason="environment not made by scripts/setup_env.sh"
)
def test_second_setup_run_installs_nothing():
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV",)}
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "setup_env.sh")], capture_output=True, text=True, env=env, timeout=600
    )
    assert out.returncode == 0, out.stderr
    assert "environment up to date" in out.stderr
    assert "installing" not in out.stderr
    assert out.stdout.strip().splitlines()[-1] == str(ROOT / ".venv" / "bin" / "python")


@pytest.mark.skipif(not sys.prefix.startswith(str(ROOT)), reason="runs inside the project's own venv only")
def test_cpu_environment_has_no_torchvision_and_the_pinned_torch():
    import torch

    base_has_torch = (ROOT / ".venv" / "pyvenv.cfg").read_text().find(
        "include-system-site-packages = true"
    ) >= 0
    if not base_has_torch:
        assert torch.__version__.startswith("2.13.0")
        assert importlib.util.find_spec("torchvision") is None
    constraints = (ROOT / ".venv" / "l2c-constraints.txt").read_text().strip()
    # the pin is the version that was there (base interpreter) or 2.13.0; the wheel reports "+cpu"
    assert constraints in (f"torch=={torch.__version__}", f"torch=={torch.__version__.split('+')[0]}")
