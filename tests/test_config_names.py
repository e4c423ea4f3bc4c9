"""Shipped configs by name from any folder, run paths under run.root (issue 19): everything here runs
from an empty folder outside the checkout."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from l2c_llava.cli import main
from l2c_llava.config_names import project_root, resolve_config

from .conftest import ROOT, background_test


def l2c(cwd, *args, timeout=300, environ=None):
    env = {**(os.environ if environ is None else environ), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "l2c_llava", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_names_resolve_from_any_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["ls", "--paths"]) == 0
    out = capsys.readouterr().out
    assert (
        "stage1/quick " in out
        and "pipeline/demo " in out
        and str(project_root() / "stage1/configs/quick.yaml") in out
    )
    assert resolve_config("quick", "stage1") == str(project_root() / "stage1/configs/quick.yaml")
    assert resolve_config("quick", "pipeline") == str(project_root() / "pipeline/configs/quick.yaml")
    assert resolve_config("clip_quick", "clip").endswith("stage2/configs/clip_quick.yaml")
    assert resolve_config("quick_pretrain", "mllm").endswith("mllm/configs/quick_pretrain.yaml")
    assert resolve_config("stage2/configs/quick.yaml") == str(project_root() / "stage2/configs/quick.yaml")
    (tmp_path / "mine.yaml").write_text("recipe: stage1\n")
    assert resolve_config("mine.yaml", "stage1") == "mine.yaml"  # a file of the user's comes first
    assert main(["validate", "stage1/quick", "--print"]) == 0
    assert "recipe: stage1" in capsys.readouterr().out
    assert main(["validate", "quick"]) == 2
    assert "stage1/quick, stage2/quick, pipeline/quick" in capsys.readouterr().err
    assert main(["validate", "stage1/quik"]) == 2
    assert "did you mean stage1/quick" in capsys.readouterr().err


def test_stage1_quick_from_an_empty_folder_outside_the_checkout(tmp_path):
    """The config resolves by name; its relative run paths land in the current folder (or run.root)."""
    assert not tmp_path.resolve().is_relative_to(ROOT.resolve())
    r = l2c(tmp_path, "stage1", "--config", "quick")
    assert (
        r.returncode == 2 and "caption-pair file not found: runs/quick/data/captions/train.jsonl" in r.stderr
    )
    r = l2c(tmp_path, "pipeline", "--config", "quick", "--dry-run", "run.root=work")
    assert r.returncode == 0, r.stderr
    assert "[1/15] data" in r.stdout and "[15/15] report" in r.stdout
    assert (tmp_path / "work").is_dir() and not (tmp_path / "runs" / "quick" / "pipeline").exists()
    r = l2c(tmp_path, "validate", "stage2/quick", "run.root=/nonexistent/../tmp", "--print")
    assert r.returncode == 0 and "root: /nonexistent/../tmp" in r.stdout


def stage1_quick_from_an_empty_folder(folder, environ) -> tuple:
    """The commands of stage1/configs/quick.yaml's header as written, in the empty `folder`: the quick
    data, then `l2c stage1` on the config by its name (`--config quick`). A few minutes of subprocesses:
    started when collection ends (conftest.BACKGROUND_TESTS), beside the other tests."""
    from l2c_llava.config_names import shipped_configs

    from .test_config_headers import commands

    header = next(c for c in shipped_configs(ROOT) if c.path == ROOT / "stage1/configs/quick.yaml").command
    synth, stage1 = commands(header)
    made = l2c(folder, *synth[1:], "--quiet", timeout=900, environ=environ)
    if made.returncode != 0:
        return synth, stage1, made, None
    return synth, stage1, made, l2c(folder, "stage1", "--config", "quick", timeout=1800, environ=environ)


@pytest.mark.slow
def test_stage1_quick_runs_from_an_empty_folder(tmp_path, request):
    """The real thing (a few minutes on 2 cores): stage1/configs/quick.yaml's header as written, from an
    empty folder: the quick data, then `l2c stage1` on the config, by its name (`--config quick`)."""
    folder, (synth, stage1, made, trained) = background_test(
        request, stage1_quick_from_an_empty_folder, tmp_path
    )
    assert not folder.resolve().is_relative_to(ROOT.resolve())
    assert synth[:3] == ["l2c", "data", "synth"] and stage1 == [
        "l2c",
        "stage1",
        "--config",
        "stage1/configs/quick.yaml",
    ]
    assert resolve_config("quick", "stage1") == str(ROOT / "stage1/configs/quick.yaml")
    assert made.returncode == 0, made.stderr
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (folder / "runs/quick/stage1/metrics.json").is_file()
    assert (folder / "runs/quick/stage1/encoder").is_dir()
