"""The embedded defaults are found offline, from the packages the set-up installs with --no-deps."""

from __future__ import annotations

import pytest

from l2c_llava.embedded import EMBEDDED_LLM, clip_token_count, clip_tokenizer, smollm2_gguf_path
from l2c_llava.models.reference import model_ref, resolve_llm_path


def test_smollm2_gguf_is_found_and_is_smollm2():
    gguf = pytest.importorskip("gguf")
    path = smollm2_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    reader = gguf.GGUFReader(str(path))
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "llama"
    assert len(reader.tensors) == 272  # 30 layers x 9 + embeddings + final norm
    folder, name = resolve_llm_path(EMBEDDED_LLM)
    assert (folder, name) == (str(path.parent), path.name)


def test_resolve_llm_path_forms(tmp_path):
    assert resolve_llm_path("ckpt/vicuna") == ("ckpt/vicuna", None)
    assert resolve_llm_path("ckpt/model.Q4.gguf") == ("ckpt", "model.Q4.gguf")
    with pytest.raises(ValueError, match="the only one is"):
        resolve_llm_path("embedded:gpt5")


def test_model_ref_kinds(tmp_path):
    """One place says what a model name means: shipped, a GGUF file, a stage-2 run, a Hub id, a folder."""
    run = tmp_path / "s2"
    run.mkdir()
    (run / "config.yaml").write_text("recipe: stage2\n")
    kinds = {
        "embedded:demo-clip": "embedded",
        "ckpt/model.Q4.gguf": "gguf",
        str(run): "stage2_run",
        "openai/clip-vit-large-patch14-336": "hub",
        str(tmp_path): "folder",
        "a/b/c": "folder",
    }
    assert {name: model_ref(name).kind for name in kinds} == kinds


def test_clip_tokenizer_matches_openai_ids():
    tok = clip_tokenizer()
    assert len(tok) == 49408 and tok.model_max_length == 77
    # ids of OpenAI CLIP's tokenizer for this text (49406 = <|startoftext|>, 49407 = <|endoftext|>)
    assert tok("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert clip_token_count("a photo of a cat") == 7


def test_clip_tokenizer_files_build_from_scratch(tmp_path):
    from transformers import CLIPTokenizer

    from l2c_llava.embedded import write_clip_tokenizer_files

    out = write_clip_tokenizer_files(tmp_path / "clip")
    assert sorted(p.name for p in out.iterdir()) == ["merges.txt", "vocab.json"]
    tok = CLIPTokenizer.from_pretrained(str(out))
    assert tok("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
