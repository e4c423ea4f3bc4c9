"""Does a trained LLaVA look at the image? Loss of its training rows with their own image vs with the
image of another row (the batch's images rolled by one), on the same answer tokens.

A model that uses the image has a clearly lower loss with its own image; a model that answers from
the question alone has the same loss both ways. Also prints the mean norm of the projected image
tokens next to the LLM's text embeddings (a large ratio is a reason an LLM ignores them).

    python bench/llava_image_use.py --model runs/demo/mllm/llm2clip/finetune \
        --data runs/demo/data/llava/instruct.json --image-root runs/demo/data/images --rows 64
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


@torch.no_grad()
def image_use(
    model_dir: str, data: str, image_root: str, rows: int = 64, batch_size: int = 8, seed: int = 0
) -> dict:
    from l2c_llava.data.readers import read_llava_json
    from l2c_llava.mllm.build import num_image_tokens
    from l2c_llava.mllm.data import Collate, LlavaDataset
    from l2c_llava.mllm.export import load_trained_llava

    folder, model, processor = load_trained_llava(model_dir)
    meta = json.loads((folder / "l2c_mllm.json").read_text()) if (folder / "l2c_mllm.json").is_file() else {}
    template = meta.get("template", "vicuna_v1")
    parsed = read_llava_json(data, image_root, on_bad_row="skip", image_check="exists")
    items = [r for r in parsed.items if r.has_image]
    g = torch.Generator().manual_seed(seed)
    items = [items[i] for i in torch.randperm(len(items), generator=g)[:rows].tolist()]
    n_img = num_image_tokens(
        model.config.vision_config, meta.get("vision_feature_select_strategy", "default")
    )
    ds = LlavaDataset(
        items,
        processor,
        template,
        2048,
        n_img,
        model.config.image_token_id,
        meta.get("image_aspect_ratio", "pad"),
    )
    collate = Collate(processor.tokenizer.pad_token_id)
    model.eval()
    own, other, norms = [], [], []
    for lo in range(0, len(ds) - batch_size + 1, batch_size):
        batch = collate([ds[i] for i in range(lo, lo + batch_size)])
        own.append(model(**batch).loss.item())
        rolled = dict(batch, pixel_values=batch["pixel_values"].roll(1, dims=0))
        other.append(model(**rolled).loss.item())
        feats = model.get_image_features(pixel_values=batch["pixel_values"])
        feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
        feats = torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats
        norms.append(feats.float().norm(dim=-1).mean().item())
    text_norm = model.get_input_embeddings().weight.float().norm(dim=-1).mean().item()
    mean = lambda v: sum(v) / max(1, len(v))  # noqa: E731
    return {
        "model": str(folder),
        "rows": len(own) * batch_size,
        "loss_own_image": round(mean(own), 4),
        "loss_other_image": round(mean(other), 4),
        "gap": round(mean(other) - mean(own), 4),
        "image_token_norm": round(mean(norms), 3),
        "text_embedding_norm": round(text_norm, 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, nargs="+")
    p.add_argument("--data", required=True)
    p.add_argument("--image-root", required=True)
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default=None, help="append the results as JSON lines to this file")
    a = p.parse_args()
    for m in a.model:
        r = image_use(m, a.data, a.image_root, a.rows, a.batch_size)
        print(json.dumps(r))
        if a.out:
            with Path(a.out).open("a") as f:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
