"""``l2c export ... --push-to-hub ID`` (issue 19), against a local stand-in of the Hub's API on
127.0.0.1 (never the network): the exported folder, model card included, arrives byte for byte in
one commit; a missing or wrong token is an error that says what to do and keeps the export."""

from __future__ import annotations

import pytest

from l2c_llava.cli import main

from .hub_standin import HubStandIn
from .tiny_models import tiny_vision


@pytest.fixture
def hub(monkeypatch):
    from huggingface_hub import constants

    with HubStandIn() as stand_in:
        monkeypatch.setattr(constants, "ENDPOINT", stand_in.url)
        monkeypatch.setenv("HF_TOKEN", stand_in.token)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        yield stand_in


def vision_export_source(tmp_path):
    """A CLIPVisionModel folder: `l2c export vision` reads towers from LLM2CLIP models, so the tower is
    exported through export_vision_tower, the function behind the command."""
    from l2c_llava.stage2.export import export_vision_tower

    return export_vision_tower(tiny_vision().eval(), tmp_path / "tiny-vision")


def test_an_export_is_pushed_with_its_card_byte_for_byte(hub, tmp_path, capsys):
    from l2c_llava.hub_push import push_folder

    out = vision_export_source(tmp_path)
    url = push_folder(out, "me/tiny-vision", private=True)
    repo = hub.repos["me/tiny-vision"]
    local = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert ".l2c_output.json" in local  # the toolkit's marker stays local
    assert repo["files"] == {k: v for k, v in local.items() if k not in (".l2c_output.json", ".l2c.lock")}
    assert b"pipeline_tag: image-feature-extraction" in repo["files"]["README.md"]
    assert hub.validated and "image-feature-extraction" in hub.validated[0]["content"]  # the card's metadata
    assert repo["private"] and url.startswith(hub.url + "/me/tiny-vision/commit/")
    # again: the repo exists (409 is fine), a second commit
    push_folder(out, "me/tiny-vision")
    assert len(repo["commits"]) == 2


def test_the_cli_pushes_after_the_export_and_names_a_bad_token(hub, tmp_path, capsys, monkeypatch):
    from types import SimpleNamespace

    from l2c_llava.cards import read_card
    from l2c_llava.mllm.build import build_llava, save_llava

    from .tiny_llm import save_tiny_llm

    src = vision_export_source(tmp_path)  # a built tiny LLaVA is a transformers LLaVA folder to export
    save_tiny_llm(tmp_path / "llm", "llama")
    model, proc = build_llava(src, SimpleNamespace(name_or_path=str(tmp_path / "llm")))
    save_llava(model, proc, tmp_path / "built", {"template": "vicuna_v1"})
    out = tmp_path / "tiny-llava"
    assert (
        main(
            [
                "export",
                "llava",
                "--model",
                str(tmp_path / "built"),
                "--out",
                str(out),
                "--push-to-hub",
                "me/tiny-llava",
            ]
        )
        == 0
    )
    assert "pushed" in capsys.readouterr().out
    files = hub.repos["me/tiny-llava"]["files"]
    assert files["config.json"] == (out / "config.json").read_bytes() and "model.safetensors" in files
    meta, _ = read_card(out)
    assert meta["pipeline_tag"] == "image-text-to-text"
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    rc = main(
        ["export", "llava", "--model", str(tmp_path / "built"), "--out", str(out), "--push-to-hub", "me/x"]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "(401)" in err and "HF_TOKEN" in err and "the export is kept" in err
    assert (out / "config.json").is_file()
