"""`l2c mllm build` in the target dtype: the LLaVA is made on the meta device and takes the loaded LLM's
tensors as they are (no float32 model, no second copy of the LLM)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from tests.tiny_llm import save_tiny_llm


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    root = tmp_path_factory.mktemp("parts")
    torch.manual_seed(0)
    CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=16,
        )
    ).save_pretrained(root / "v")
    save_tiny_llm(root / "llm")
    return root


@pytest.mark.parametrize("projector", ["mlp2x_gelu", "linear", "qformer"])
def test_build_in_bfloat16_shares_the_llm_tensors(parts, monkeypatch, projector):
    from transformers import AutoModelForCausalLM

    from l2c_llava.mllm.build import build_llava

    loaded = {}
    original = AutoModelForCausalLM.from_pretrained

    def spy(*a, **k):
        loaded["lm"] = original(*a, **k)
        return loaded["lm"]

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    model, _ = build_llava(
        parts / "v",
        SimpleNamespace(name_or_path=str(parts / "llm")),
        torch_dtype="bfloat16",
        projector_type=projector,
        connector={"num_queries": 4, "heads": 4},
    )
    lm = loaded["lm"]
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    ours = model.model.language_model.state_dict()
    for k, v in lm.get_decoder().state_dict().items():  # the same storage: the LLM was not copied
        assert ours[k].data_ptr() == v.data_ptr(), k
    assert model.lm_head.weight.data_ptr() == lm.get_output_embeddings().weight.data_ptr()
    ids = torch.tensor([[1, 5, 6]])
    with torch.no_grad():  # the text path is the LLM's own
        assert torch.equal(model(input_ids=ids).logits, lm(input_ids=ids).logits)


def test_cli_build_dtype_defaults_to_the_llms(tmp_path, parts):
    import shutil
    import subprocess
    import sys

    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from tests.conftest import ROOT

    llm16 = tmp_path / "llm16"  # saved in float16, as Vicuna-7B-v1.5 is
    shutil.copytree(parts / "llm", llm16)
    AutoModelForCausalLM.from_pretrained(parts / "llm", dtype=torch.float16).save_pretrained(llm16)
    assert json.loads((llm16 / "config.json").read_text())["dtype"] == "float16"

    def build(out, *extra):
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "l2c_llava.cli",
                "mllm",
                "build",
                "--vision",
                str(parts / "v"),
                "--llm",
                str(llm16),
                "--out",
                str(out),
                *extra,
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        dtypes = set()
        for f in out.glob("*.safetensors"):
            with safe_open(str(f), framework="pt") as st:
                dtypes |= {st.get_slice(k).get_dtype() for k in st.keys()}
        return dtypes

    assert build(tmp_path / "a") == {"F16"}  # the LLM's own dtype
    assert build(tmp_path / "b", "--dtype", "bfloat16") == {"BF16"}
