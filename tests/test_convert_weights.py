"""`l2c convert weights`: pickled .bin checkpoints (Vicuna ships them) -> safetensors, weights_only."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from l2c_llava.errors import InputError
from l2c_llava.models.convert import convert_folder, safetensors_name
from tests.conftest import ROOT
from tests.tiny_llm import save_tiny_llm


def bin_folder(tmp_path, shards: int = 1):
    """A tiny Llama saved the pre-safetensors way (pytorch_model*.bin + index), tied-style shared tensor."""
    from transformers import AutoModelForCausalLM

    src = save_tiny_llm(tmp_path / "st")
    state = AutoModelForCausalLM.from_pretrained(src).state_dict()
    out = tmp_path / "bin"
    out.mkdir()
    for f in src.iterdir():  # config, tokenizer: everything but the weights
        if not f.name.endswith(".safetensors") and f.is_file():
            (out / f.name).write_bytes(f.read_bytes())
    keys = sorted(state)
    state["model.shared_view"] = state[keys[0]]  # shared storage, as tied checkpoints have
    keys = sorted(state)
    if shards == 1:
        torch.save(state, out / "pytorch_model.bin")
    else:  # transformers' sharded layout
        parts = [keys[i::shards] for i in range(shards)]
        weight_map = {}
        for i, part in enumerate(parts, 1):
            name = f"pytorch_model-{i:05d}-of-{shards:05d}.bin"
            torch.save({k: state[k] for k in part}, out / name)
            weight_map.update({k: name for k in part})
        (out / "pytorch_model.bin.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map})
        )
    return src, out


def test_names():
    assert safetensors_name("pytorch_model.bin") == "model.safetensors"
    assert safetensors_name("pytorch_model-00001-of-00002.bin") == "model-00001-of-00002.safetensors"
    assert safetensors_name("adapter_model.bin") == "adapter_model.safetensors"


@pytest.mark.parametrize("shards", [1, 3])
def test_converted_folder_loads_where_the_pickled_one_is_refused(tmp_path, shards):
    from transformers import AutoModelForCausalLM

    from l2c_llava.errors import InputError
    from l2c_llava.models.llm import local_llm_folder

    src, binary = bin_folder(tmp_path, shards)
    assert not list(binary.glob("*.safetensors")) and list(binary.glob("*.bin"))
    with pytest.raises(InputError, match="l2c convert weights"):
        local_llm_folder(str(binary))
    r = subprocess.run(
        [sys.executable, "-m", "l2c_llava.cli", "convert", "weights", str(binary), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "out"
    assert not list(out.glob("*.bin")) and local_llm_folder(str(out)) == str(out)
    if len(list(binary.glob("*.bin"))) > 1:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert all(v.endswith(".safetensors") and (out / v).is_file() for v in index["weight_map"].values())
    a = AutoModelForCausalLM.from_pretrained(src)
    b = AutoModelForCausalLM.from_pretrained(out)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    from safetensors import safe_open

    names = set()
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            names |= set(st.keys())
    assert "model.shared_view" in names


def test_a_pickle_that_is_not_plain_tensors_is_refused(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    with open(tmp_path / "m" / "pytorch_model.bin", "wb") as f:
        pickle.dump({"w": Evil()}, f)
    with pytest.raises(InputError, match="weights_only=True"):
        convert_folder(tmp_path / "m", tmp_path / "out")
    assert not (tmp_path / "out").exists()
