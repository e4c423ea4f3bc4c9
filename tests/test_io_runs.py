from __future__ import annotations

import json

import pytest
import yaml

from l2c_llava.config import load_config
from l2c_llava.io import atomic_write_text, tree_digest
from l2c_llava.train.run_dir import prepare_run_dir

from .conftest import ROOT


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "f.txt"
    atomic_write_text(target, "old")

    class Boom(Exception):
        pass

    class Bad:
        def encode(self, *_):
            raise Boom

    with pytest.raises(Boom):
        atomic_write_text(target, Bad())  # type: ignore[arg-type]
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]  # no temp file left behind


def test_tree_digest_sees_content_and_names(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_text("1")
    d1 = tree_digest(tmp_path)
    (tmp_path / "a" / "x").write_text("2")
    d2 = tree_digest(tmp_path)
    (tmp_path / "a" / "x").rename(tmp_path / "a" / "y")
    assert len({d1, d2, tree_digest(tmp_path)}) == 3


def test_run_folder_holds_resolved_config_and_versions(tmp_path):
    cfg = load_config(ROOT / "stage1/configs/demo.yaml", ["train.max_steps=7"])
    run = prepare_run_dir(
        cfg, tmp_path / "run", source="stage1/configs/demo.yaml", overrides=["train.max_steps=7"]
    )
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 7 and saved["lora"]["r"] == 16
    assert load_config(run / "config.yaml") == cfg
    versions = json.loads((run / "versions.json").read_text())
    assert {"python", "torch", "transformers", "l2c-llava"} <= set(versions)
