"""Long phases show progress, and ``mllm chat --interactive`` keeps the model loaded (issue 19)."""

from __future__ import annotations

import io
from types import SimpleNamespace

from l2c_llava.cli import main
from l2c_llava.mllm.build import build_llava, save_llava

from .recipe_configs import stage1_config


def test_stage1_shows_the_evaluations_and_the_save(tmp_path, tiny_llama, synth_dir, capsys):
    cfg = stage1_config(
        tmp_path, tiny_llama, synth_dir, tmp_path / "run", extra="output: {merge_weights: true}\n"
    )
    assert main(["stage1", "--config", str(cfg)]) == 0
    err = capsys.readouterr().err
    for phase in (
        "eval before training (causal)",
        "eval before training (bidirectional)",
        "eval after training",
    ):
        assert phase in err and "text/s" in err.split(phase, 1)[1][:400], phase  # a bar counting texts
    assert "saving" in err and "2/2" in err.split("saving", 1)[1][:400]  # encoder, encoder_merged
    assert main(["stage1", "eval", "--config", str(cfg)]) == 0
    assert "eval:" in capsys.readouterr().err


def test_interactive_chat_loads_once_and_answers_every_line(
    tmp_path, llava_parts, synth_dir, capsys, monkeypatch
):
    import l2c_llava.mllm.chat as chat_module

    model, proc = build_llava(llava_parts / "vision", SimpleNamespace(name_or_path=str(llava_parts / "llm")))
    save_llava(model, proc, tmp_path / "a", {"template": "vicuna_v1", "image_aspect_ratio": "pad"})
    images = sorted((synth_dir / "images").rglob("*.jpg"))[:2]
    loads = []
    real = chat_module.load_trained_llava
    monkeypatch.setattr(chat_module, "load_trained_llava", lambda d: (loads.append(d), real(d))[1])
    monkeypatch.setattr(
        "sys.stdin",
        io.StringIO(f"what colour ?\n/image {images[1]}\nhow many ?\n/image\ntext only\n\nnot read\n"),
    )
    assert (
        main(
            [
                "mllm",
                "chat",
                "--model",
                str(tmp_path / "a"),
                "--image",
                str(images[0]),
                "--max-new-tokens",
                "3",
                "--interactive",
                "what shapes ?",
            ]
        )
        == 0
    )
    answers = capsys.readouterr().out.splitlines()
    assert len(loads) == 1 and len(answers) == 4  # 4 questions, one load; the line after the empty one unread
    chat = chat_module.LlavaChat(tmp_path / "a")
    want = [
        chat.answer(images[0], "what shapes ?", 3),
        chat.answer(images[0], "what colour ?", 3),
        chat.answer(images[1], "how many ?", 3),
        chat.answer(None, "text only", 3),
    ]
    assert answers == want
    assert main(["mllm", "chat", "--model", str(tmp_path / "a")]) == 2  # no question, not interactive
