"""Pickled PyTorch checkpoints (``pytorch_model*.bin``, ``adapter_model.bin``) -> safetensors.

The toolkit loads safetensors only: a ``.bin`` file is a pickle, and unpickling can run code. Some
models the recipe needs ship ``.bin`` weights only (lmsys/vicuna-7b-v1.5). ``l2c convert weights SRC
OUT`` reads them with ``torch.load(weights_only=True)`` (tensors and plain containers only; anything
else is refused), writes each shard as safetensors under transformers' names, rewrites the shard
index, copies every other file but pickles, and checks each written tensor against the one read.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from l2c_llava.errors import InputError
from l2c_llava.io import publish_folder
from l2c_llava.models.hub import WEIGHTS_PICKLE
from l2c_llava.models.reference import resolve_model_path

CONVERTED_KIND = "converted model"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def safetensors_name(name: str) -> str:
    """transformers' names: pytorch_model[-0000i-of-0000n].bin -> model[...].safetensors,
    adapter_model.bin -> adapter_model.safetensors, x.bin -> x.safetensors."""
    m = re.fullmatch(r"pytorch_model(-\d+-of-\d+)?\.bin", name)
    if m:
        return f"model{m.group(1) or ''}.safetensors"
    return Path(name).stem + ".safetensors"


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError (not plain tensors), a damaged file
        raise InputError(
            f"{path}: not loadable with weights_only=True ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); only plain tensor checkpoints are "
            "converted"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path}: not a flat state dict of tensors")
    return state


def convert_file(src: Path, dst: Path) -> int:
    """One pickled state dict -> one safetensors file (shared storage split, checked); tensors written."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    state = _read_pickle(src)
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, v in state.items():  # tied weights share storage, which safetensors refuses: copy the second
        key = (v.untyped_storage().data_ptr(), v.storage_offset()) if v.numel() else (id(v), 0)
        out[k] = v.contiguous().clone() if key in seen or not v.is_contiguous() else v
        seen.add(key)
    save_file(out, str(dst), metadata={"format": "pt"})
    with safe_open(str(dst), framework="pt") as st:
        if set(st.keys()) != set(state):
            raise InputError(f"{dst}: written keys differ from {src}'s")
        for k in state:
            if not torch.equal(st.get_tensor(k), state[k]):
                raise InputError(f"{dst}: tensor {k} differs from {src}'s after writing")
    return len(state)


def convert_folder(src: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> dict:
    """A model folder (or Hub id) with pickled weights -> `out`, the same folder with safetensors."""
    folder = Path(resolve_model_path(src, "model to convert", WEIGHTS_PICKLE))
    if not folder.is_dir():
        raise InputError(f"{src}: not a folder (nor a Hub id)")
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if not pickles:
        raise InputError(f"{src}: no pickled weights (*.bin) to convert")
    stats = {"source": str(src), "files": {}, "tensors": 0}

    def build(tmp: Path) -> None:
        for p in sorted(folder.iterdir()):
            if p.is_dir() or p.suffix in PICKLE_SUFFIXES or p.name.endswith(".bin.index.json"):
                continue
            if p.suffix == ".safetensors" or p.name.endswith(".safetensors.index.json"):
                continue  # the conversion's own files replace any partial ones
            shutil.copyfile(p, tmp / p.name)
        for p in pickles:
            name = safetensors_name(p.name)
            stats["tensors"] += convert_file(p, tmp / name)
            stats["files"][p.name] = name
        for index in folder.glob("*.bin.index.json"):
            data = json.loads(index.read_text())
            data["weight_map"] = {k: safetensors_name(v) for k, v in data.get("weight_map", {}).items()}
            name = safetensors_name(index.name.removesuffix(".index.json")) + ".index.json"
            (tmp / name).write_text(json.dumps(data, indent=2) + "\n")

    publish_folder(out, build, CONVERTED_KIND, overwrite)
    return stats
