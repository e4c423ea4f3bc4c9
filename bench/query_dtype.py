"""Query features in the dtype stage 2 trained on, or in float32? A pipeline run's long-caption
text->image R@1 with its cached eval features (computed in the cache's dtype, bf16 in the demo) against
the same captions encoded afresh in float32, on the same test images; McNemar on the queries only one
side gets right.

    python bench/query_dtype.py --run runs/demo

Costs one encoding of the test set's dense captions through the stage-1 encoder (about 6 min for 520 on
one thread of the 2-core machine)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from l2c_llava import layout as L
from l2c_llava.data.images import load_rgb
from l2c_llava.data.readers import read_long_captions
from l2c_llava.stage1.encoder import TextEncoder
from l2c_llava.stage2.cache import TextFeatureCache
from l2c_llava.stage2.llm2clip import LLM2CLIP
from l2c_llava.stats import paired_comparison


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="runs/demo", help="a pipeline run folder")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--limit", type=int, default=None, help="the first N dense captions only (all images searched)"
    )
    args = p.parse_args()
    run = L.PipelineRun(Path(args.run))
    rs = read_long_captions(run.data / L.RETRIEVAL_LONG, run.data / L.IMAGES)
    cache = TextFeatureCache(run.text_features / "eval_long")
    captions = list(rs.captions[: args.limit])
    target = torch.tensor(rs.caption_image[: args.limit])
    cached = cache.features(cache.rows_of(captions, where="long test set").tolist()).float()
    model = LLM2CLIP.from_pretrained(run.stage2)
    path = model.text_encoder_ref["path"]
    t0 = time.perf_counter()
    fresh = TextEncoder.from_pretrained(path, torch_dtype="float32").encode(
        captions, instruction=model.text_encoder_ref.get("instruction"), batch_size=args.batch_size
    )
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        img = torch.cat(
            [
                model.get_image_features(model.preprocess([load_rgb(p) for p in rs.images[i : i + 32]]))
                for i in range(0, len(rs.images), 32)
            ]
        )
        img = F.normalize(img.float(), dim=-1)
        right = {}
        for name, feats in (
            (f"cached ({cache.manifest.get('compute_dtype', 'auto')})", cached),
            ("float32", fresh),
        ):
            txt = F.normalize(model.get_text_features_from_llm(feats.float()).float(), dim=-1)
            right[name] = (txt @ img.T).argmax(1) == target
    (na, a), (nb, b) = right.items()
    paired = paired_comparison(a.tolist(), b.tolist())  # McNemar's exact test on the discordant queries
    cos = F.cosine_similarity(fresh.float(), cached)
    out = {
        "run": str(args.run),
        "queries": len(captions),
        "feature_cosine": {"mean": round(float(cos.mean()), 4), "min": round(float(cos.min()), 4)},
        "t2i_R@1": {na: round(float(a.float().mean()), 4), nb: round(float(b.float().mean()), 4)},
        "only_right": {na: paired["wins"], nb: paired["losses"]},
        "mcnemar_p": paired["p_value"],
        "float32_encode_seconds": round(seconds, 1),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
