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


def plan(env_extra: dict) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "L2C_VENV", "PYTHON")}
    env |= env_extra | {"L2C_SETUP_PLAN": "1"}
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "setup_env.sh")], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_setup_keeps_a_torch_that_is_already_there(tmp_path):
    pytest.importorskip("torch")
    import torch

    version = torch.__version__.split("+")[0]
    # an interpreter inside a virtualenv that has torch: install into that environment, pin its torch
    assert plan({"PYTHON": sys.executable}) == f"venv={sys.prefix} torch=torch=={version} venv_args=none"
    # asked for another folder: a venv that sees the interpreter's packages, torch pinned
    assert plan({"PYTHON": sys.executable, "L2C_VENV": str(tmp_path / "v")}) == (
        f"venv={tmp_path / 'v'} torch=torch=={version} venv_args=--system-site-packages"
    )


def test_setup_pins_the_cpu_torch_when_there_is_none(tmp_path):
    base = os.path.join(sys.base_prefix, "bin", "python3")
    has_torch = subprocess.run([base, "-c", "import torch"], capture_output=True).returncode == 0
    if has_torch:
        pytest.skip("the base interpreter has torch on this machine")
    assert (
        plan({"PYTHON": base, "L2C_VENV": str(tmp_path / "v")})
        == f"venv={tmp_path / 'v'} torch=torch==2.13.0 venv_args=none"
    )
