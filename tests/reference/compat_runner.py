"""Runs in a consumer's environment (transformers 4.37.2 + the original LLaVA code, 4.44.2, or the
project's own 5.x) and reads the exported folders the way that consumer does; writes what it got to
OUT/result.json and OUT/tensors.safetensors for tests/test_compat_matrix.py to compare. Imports
nothing from l2c_llava (it must run where the project itself does not).

    python compat_runner.py JOB.json OUT_DIR

JOB: {"pixels": safetensors file with "pixels" [B,3,S,S], "vision": {name: folder},
"tokenizers": {name: folder}, "texts": [...], "llava": {"folder" (moved and re-pointed), "placed"
(never moved), "stale" (moved, not re-pointed), "image", "question", "max_new_tokens"} or null, "hf_llava": {"folder", "ids"} or null, "llm2clip_release": {"out", "vision_config", "text_dim", "projection_dim",
"num_blocks", "seed"} or null}
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def loading_info(info: dict) -> dict:
    return {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}


def run_vision(job, tensors, result):
    from transformers import CLIPVisionModel

    pixels = load_file(job["pixels"])["pixels"]
    for name, folder in job.get("vision", {}).items():
        entry = result["vision"][name] = {}
        try:
            model, info = CLIPVisionModel.from_pretrained(folder, output_loading_info=True)
            entry["info"] = loading_info(info)
            with torch.no_grad():
                out = model.eval()(pixel_values=pixels, output_hidden_states=True)
            tensors[f"vision|{name}|pooler"] = out.pooler_output.contiguous()
            tensors[f"vision|{name}|penultimate"] = out.hidden_states[-2].contiguous()
            entry["loaded"] = True
        except Exception as e:  # recorded, judged by the test
            entry["loaded"] = False
            entry["error"] = f"{type(e).__name__}: {e}"[:2000]


def run_tokenizers(job, result):
    from transformers import AutoTokenizer

    for name, folder in job.get("tokenizers", {}).items():
        for fast in (True, False):
            key = f"{name}|{'fast' if fast else 'slow'}"
            entry = result["tokenizers"][key] = {}
            try:
                tok = AutoTokenizer.from_pretrained(folder, use_fast=fast)
                entry["class"] = type(tok).__name__
                entry["len"] = len(tok)
                entry["ids"] = [tok(t).input_ids for t in job["texts"]]
                entry["loaded"] = True
            except Exception as e:
                entry["loaded"] = False
                entry["error"] = f"{type(e).__name__}: {e}"[:2000]


def run_llava(job, tensors, result):
    """The original LLaVA code's own loader and inference path (llava.model.builder,
    llava.mm_utils, llava.conversation), on CPU."""
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.conversation import conv_templates
    from llava.mm_utils import get_model_name_from_path, process_images, tokenizer_image_token
    from llava.model.builder import load_pretrained_model
    from PIL import Image

    spec = job["llava"]
    folder = spec["folder"]  # exported elsewhere, moved here, re-pointed (`l2c export repoint`)
    entry = result["llava"] = {"cwd": os.getcwd()}
    name = get_model_name_from_path(folder)
    # 1. from this working directory (not the folder's): as LLaVA's CLI, its model worker, lmms-eval's
    # llava model and any training script load it
    tokenizer, model, image_processor, _ = load_pretrained_model(folder, None, name, device="cpu")
    entry["mm_vision_tower"] = model.config.mm_vision_tower
    # 2. the absolute tower path handed to the config (the way without l2c-llava at hand)
    _, model2, _, _ = load_pretrained_model(
        folder, None, name, device="cpu", mm_vision_tower=os.path.join(folder, "vision_tower")
    )
    # 3. an export loaded where it was written (never moved)
    placed = spec["placed"]
    _, model3, _, _ = load_pretrained_model(placed, None, get_model_name_from_path(placed), device="cpu")
    # 4. a copy moved without re-pointing, its old place gone: LLaVA's own error
    dtype = torch.get_default_dtype()
    try:
        load_pretrained_model(spec["stale"], None, get_model_name_from_path(spec["stale"]), device="cpu")
        entry["stale_error"] = None
    except Exception as e:  # recorded, judged by the test
        entry["stale_error"] = f"{type(e).__name__}: {e}"[:500]
    finally:  # transformers 4.37 raised inside from_pretrained with float16 left as the default dtype
        torch.set_default_dtype(dtype)
    entry["loaded"] = True
    entry["dtype_loaded"] = str(next(model.parameters()).dtype)
    entry["tokenizer_class"] = type(tokenizer).__name__
    entry["len_tokenizer"] = len(tokenizer)
    entry["embed_rows"] = int(model.get_input_embeddings().weight.shape[0])
    model, model2, model3 = (
        model.float().eval(),
        model2.float().eval(),
        model3.float().eval(),
    )  # fp16-exact weights
    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message(conv.roles[0], "<image>\n" + spec["question"])
    conv.append_message(conv.roles[1], None)
    prompt = conv.get_prompt()
    entry["prompt"] = prompt
    image = Image.open(spec["image"]).convert("RGB")
    pixels = process_images([image], image_processor, model.config).float()
    tensors["llava|pixels"] = pixels.contiguous()
    ids_llava = tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt").unsqueeze(0)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    ids_exact = [IMAGE_TOKEN_INDEX if i == image_id else i for i in tokenizer(prompt).input_ids]
    ids_exact = torch.tensor([ids_exact])
    entry["ids_tokenizer_image_token"] = ids_llava[0].tolist()
    entry["ids_exact"] = ids_exact[0].tolist()
    with torch.no_grad():
        for key, ids in (("exact", ids_exact), ("tokenizer_image_token", ids_llava)):
            logits = model(input_ids=ids, images=pixels, image_sizes=[image.size]).logits
            tensors[f"llava|logits|{key}"] = logits[0].float().contiguous()
            gen = model.generate(
                ids,
                images=pixels,
                image_sizes=[image.size],
                do_sample=False,
                max_new_tokens=spec["max_new_tokens"],
                min_new_tokens=spec["max_new_tokens"],
                use_cache=True,
            )
            entry[f"greedy|{key}"] = gen[0].tolist()
        other = model2(input_ids=ids_exact, images=pixels, image_sizes=[image.size]).logits
        entry["absolute_tower_path_max_diff"] = float(
            (other - tensors["llava|logits|exact"][None]).abs().max()
        )
        tensors["llava|logits|placed"] = (
            model3(input_ids=ids_exact, images=pixels, image_sizes=[image.size]).logits[0].contiguous()
        )


def run_hf_llava(job, tensors, result):
    """The transformers-format export through this transformers' own LlavaForConditionalGeneration:
    one `<image>` token, which 4.x expands inside the model (its legacy processing)."""
    from transformers import LlavaForConditionalGeneration

    spec = job["hf_llava"]
    model, info = LlavaForConditionalGeneration.from_pretrained(spec["folder"], output_loading_info=True)
    entry = result["hf_llava"] = {"info": loading_info(info), "loaded": True}
    ids = torch.tensor([spec["ids"]])
    pixels = load_file(job["pixels"])["pixels"][:1]
    with torch.no_grad():
        logits = model.eval()(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids)).logits
    tensors["hf_llava|logits"] = logits[0].float().contiguous()
    entry["shape"] = list(logits.shape)


def run_llm2clip_release(job, tensors, result):
    """A folder in the LLM2CLIP release layout as this transformers writes it (its CLIPVisionModel's
    own vision_model.* keys), and the features it gives, computed here."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    spec = job["llm2clip_release"]
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(spec["seed"])
    tower = CLIPVisionModel(CLIPVisionConfig(**spec["vision_config"])).eval()
    state = {k: v.contiguous() for k, v in tower.state_dict().items()}
    hidden, d, p, n = tower.config.hidden_size, spec["text_dim"], spec["projection_dim"], spec["num_blocks"]
    g = torch.Generator().manual_seed(spec["seed"] + 1)
    state["visual_projection.weight"] = torch.randn(p, hidden, generator=g) * 0.1
    for i in range(n):
        pre = f"text_adapter.adaptor.{i}."
        state[pre + "ln.weight"] = 1 + 0.1 * torch.randn(d, generator=g)
        state[pre + "ln.bias"] = 0.1 * torch.randn(d, generator=g)
        state[pre + "fn.0.weight"] = 0.1 * torch.randn(2 * d, d, generator=g)
        state[pre + "fn.0.bias"] = 0.1 * torch.randn(2 * d, generator=g)
        state[pre + "fn.3.weight"] = 0.1 * torch.randn(d, 2 * d, generator=g)
        state[pre + "fn.3.bias"] = 0.1 * torch.randn(d, generator=g)
    state[f"text_adapter.adaptor.{n}.weight"] = 1 + 0.1 * torch.randn(d, generator=g)
    state[f"text_adapter.adaptor.{n}.bias"] = 0.1 * torch.randn(d, generator=g)
    state[f"text_adapter.adaptor.{n + 1}.weight"] = 0.1 * torch.randn(p, d, generator=g)
    state[f"text_adapter.adaptor.{n + 1}.bias"] = 0.1 * torch.randn(p, generator=g)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LLM2CLIPModel"],
                "model_type": "clip",
                "projection_dim": p,
                "auto_map": {"AutoModel": "modeling_llm2clip.LLM2CLIPModel"},
                "vision_config": tower.config.to_dict(),
                "logit_scale_init_value": 2.6592,
            },
            indent=2,
        )
    )
    pixels = load_file(job["pixels"])["pixels"]
    text = load_file(job["pixels"])["text"]
    with torch.no_grad():
        tensors["llm2clip|image"] = (
            tower(pixel_values=pixels).pooler_output @ state["visual_projection.weight"].T
        ).contiguous()
        x = torch.nn.functional.normalize(text, dim=-1)
        for i in range(n):
            pre = f"text_adapter.adaptor.{i}."
            h = torch.nn.functional.layer_norm(x, (d,), state[pre + "ln.weight"], state[pre + "ln.bias"])
            h = torch.nn.functional.gelu(h @ state[pre + "fn.0.weight"].T + state[pre + "fn.0.bias"])
            x = x + h @ state[pre + "fn.3.weight"].T + state[pre + "fn.3.bias"]
        x = torch.nn.functional.layer_norm(
            x, (d,), state[f"text_adapter.adaptor.{n}.weight"], state[f"text_adapter.adaptor.{n}.bias"]
        )
        tensors["llm2clip|text"] = (
            x @ state[f"text_adapter.adaptor.{n + 1}.weight"].T + state[f"text_adapter.adaptor.{n + 1}.bias"]
        ).contiguous()
    result["llm2clip_release"] = {"written": True, "keys": sorted(state)[:3]}


def main(job_path: str, out_dir: str) -> int:
    import transformers

    job = json.loads(Path(job_path).read_text())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    result: dict = {"transformers": transformers.__version__, "vision": {}, "tokenizers": {}, "errors": {}}
    try:
        import tokenizers

        result["tokenizers_version"] = tokenizers.__version__
    except ImportError:
        pass
    steps = [("vision", run_vision, (job, tensors, result)), ("tokenizers", run_tokenizers, (job, result))]
    if job.get("llava"):
        steps.append(("llava", run_llava, (job, tensors, result)))
    if job.get("hf_llava"):
        steps.append(("hf_llava", run_hf_llava, (job, tensors, result)))
    if job.get("llm2clip_release"):
        steps.append(("llm2clip_release", run_llm2clip_release, (job, tensors, result)))
    for name, fn, args in steps:
        try:
            fn(*args)
        except Exception:
            result["errors"][name] = traceback.format_exc()[-4000:]
    save_file(tensors, str(out / "tensors.safetensors"))
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
