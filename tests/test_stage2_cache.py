from __future__ import annotations

import json

import pytest
import torch

from l2c_llava.cli import main
from l2c_llava.errors import InputError
from l2c_llava.stage1.encoder import TextEncoder
from l2c_llava.stage2.cache import TextFeatureCache, build_cache, encoder_fingerprint

from .tiny_llm import save_tiny_llm
from .tiny_models import FakeEncoder

CAPTIONS = [f"a red circle and {n} blue squares" for n in ("one", "two", "three", "four")] + [
    "a large green star on a beige background",
    "two small pink hexagons",
    "an outlined black cross",
    "a cyan diamond",
    "three orange triangles in the top left corner",
    "a white pentagon",
]


def test_round_trip_with_a_real_encoder(tmp_path, tiny_llama):
    cache = build_cache(tmp_path / "c", CAPTIONS, tiny_llama, shard_size=4, dtype="float32", progress=False)
    assert len(cache) == 10 and cache.dim == 32 and len(cache.manifest["shards"]) == 3
    want = TextEncoder.from_pretrained(tiny_llama, device="cpu").encode(CAPTIONS)
    assert torch.allclose(cache.features(range(10)), want, atol=1e-5)
    assert torch.allclose(cache.feature(9), want[9], atol=1e-5)
    cache.check(CAPTIONS, encoder_path=tiny_llama)  # the same captions and encoder: accepted
    half = build_cache(tmp_path / "h", CAPTIONS, tiny_llama, shard_size=4, dtype="float16", progress=False)
    assert half._handles[0].get_slice("features").get_dtype() == "F16"
    assert torch.allclose(half.features([0, 5]), want[[0, 5]], atol=2e-3)
    with pytest.raises(IndexError):
        cache.feature(10)


def test_bf16_compute_is_recorded_and_close_to_float32(tmp_path, tiny_llama):
    """text_encoder.torch_dtype=bfloat16 (the demo's, ~1.8x faster on a CPU with AVX512-BF16): the
    features stay close to float32's, the manifest records the compute dtype, and a cache made in
    another compute dtype is not resumed into."""
    enc = TextEncoder.from_pretrained(tiny_llama, device="cpu", torch_dtype="bfloat16")
    assert next(enc.model.parameters()).dtype == torch.bfloat16
    cache = build_cache(
        tmp_path / "c",
        CAPTIONS,
        tiny_llama,
        shard_size=4,
        dtype="float32",
        progress=False,
        load_encoder=lambda: enc,
        compute_dtype="bfloat16",
    )
    assert cache.manifest["compute_dtype"] == "bfloat16"
    want = TextEncoder.from_pretrained(tiny_llama, device="cpu").encode(CAPTIONS)
    got = cache.features(range(10))
    assert got.dtype == torch.float32 and not torch.equal(got, want)  # really computed in bf16
    assert torch.nn.functional.cosine_similarity(got, want).min() > 0.99
    with pytest.raises(InputError, match="other compute_dtype"):
        build_cache(
            tmp_path / "c",
            CAPTIONS,
            tiny_llama,
            shard_size=4,
            dtype="float32",
            progress=False,
            load_encoder=FakeEncoder,
        )
    old = build_cache(
        tmp_path / "f", CAPTIONS, tiny_llama, shard_size=4, load_encoder=FakeEncoder, progress=False
    )
    manifest = json.loads((old.folder / "manifest.json").read_text())
    del manifest["compute_dtype"]  # a cache written before the key existed is still reused as "auto"
    (old.folder / "manifest.json").write_text(json.dumps(manifest))
    build_cache(
        tmp_path / "f", CAPTIONS, tiny_llama, shard_size=4, load_encoder=lambda: 1 / 0, progress=False
    )


def test_a_cache_made_under_another_token_window_is_not_reused(tmp_path, tiny_llama):
    """text_encoder.max_length cuts every dense caption: a cache built with one window is refused
    under another (it was reused silently before), recorded in the manifest; a cache written before
    the key existed counts as the encoder's own window."""
    kw = dict(shard_size=4, load_encoder=FakeEncoder, progress=False)
    cache = build_cache(tmp_path / "c", CAPTIONS, tiny_llama, max_length=64, **kw)
    assert cache.manifest["max_length"] == 64
    with pytest.raises(InputError, match="other max_length"):
        build_cache(tmp_path / "c", CAPTIONS, tiny_llama, max_length=128, **kw)
    with pytest.raises(InputError, match="other max_length"):
        build_cache(tmp_path / "c", CAPTIONS, tiny_llama, **kw)  # the encoder's own window
    build_cache(tmp_path / "c", CAPTIONS, tiny_llama, max_length=64, **{**kw, "load_encoder": lambda: 1 / 0})
    old = build_cache(tmp_path / "f", CAPTIONS, tiny_llama, **kw)
    manifest = json.loads((old.folder / "manifest.json").read_text())
    del manifest["max_length"]
    (old.folder / "manifest.json").write_text(json.dumps(manifest))
    build_cache(tmp_path / "f", CAPTIONS, tiny_llama, **{**kw, "load_encoder": lambda: 1 / 0})


def test_resume_after_a_kill_between_shards(tmp_path, tiny_llama):
    dying = FakeEncoder(die_on_call=3)
    with pytest.raises(KeyboardInterrupt):
        build_cache(
            tmp_path / "c", CAPTIONS, tiny_llama, shard_size=4, load_encoder=lambda: dying, progress=False
        )
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert [s["file"] for s in manifest["shards"]] == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert not manifest["complete"]
    with pytest.raises(InputError, match="incomplete .2 shards written"):
        TextFeatureCache(tmp_path / "c")
    again = FakeEncoder()
    cache = build_cache(
        tmp_path / "c", CAPTIONS, tiny_llama, shard_size=4, load_encoder=lambda: again, progress=False
    )
    assert again.calls == 1  # only the missing shard was embedded
    straight = build_cache(
        tmp_path / "s", CAPTIONS, tiny_llama, shard_size=4, load_encoder=FakeEncoder, progress=False
    )
    assert torch.equal(cache.features(range(10)), straight.features(range(10)))
    # complete: nothing is embedded again (the loader is not even called)
    build_cache(
        tmp_path / "c", CAPTIONS, tiny_llama, shard_size=4, load_encoder=lambda: 1 / 0, progress=False
    )


def test_a_stale_cache_is_refused(tmp_path, tiny_llama):
    build_cache(tmp_path / "c", CAPTIONS, tiny_llama, shard_size=4, load_encoder=FakeEncoder, progress=False)
    other = CAPTIONS[:6] + ["a brown star"] + CAPTIONS[7:]
    with pytest.raises(InputError, match="made with other captions_digest; it is not reused"):
        build_cache(tmp_path / "c", other, tiny_llama, shard_size=4, load_encoder=FakeEncoder, progress=False)
    cache = TextFeatureCache(tmp_path / "c")
    with pytest.raises(InputError, match=r"caption 6 \('a brown star'\) has no cached feature"):
        cache.check(other)
    with pytest.raises(InputError, match=r"caption 10 \('one more'\) has no cached feature"):
        cache.check(CAPTIONS + ["one more"])
    # another encoder (other weights) or another instruction: refused
    other_encoder = save_tiny_llm(tmp_path / "other", "llama", seed=1)
    assert encoder_fingerprint(other_encoder)["digest"] != encoder_fingerprint(tiny_llama)["digest"]
    with pytest.raises(InputError, match="built by another text encoder"):
        cache.check(CAPTIONS, encoder_path=other_encoder)
    with pytest.raises(InputError, match="built by another text encoder or instruction"):
        cache.check(CAPTIONS, encoder_path=tiny_llama, instruction="Given a caption")
    with pytest.raises(InputError, match="other encoder"):
        build_cache(
            tmp_path / "c", CAPTIONS, other_encoder, shard_size=4, load_encoder=FakeEncoder, progress=False
        )
    # --overwrite rebuilds in place
    rebuilt = build_cache(
        tmp_path / "c",
        other,
        tiny_llama,
        shard_size=4,
        load_encoder=FakeEncoder,
        overwrite=True,
        progress=False,
    )
    rebuilt.check(other)


def test_bad_input(tmp_path, tiny_llama):
    with pytest.raises(ValueError, match="caption 1 is empty"):
        build_cache(tmp_path / "c", ["a", " "], tiny_llama, load_encoder=FakeEncoder, progress=False)
    with pytest.raises(InputError, match="not a text feature cache"):
        TextFeatureCache(tmp_path / "nowhere")

    class Shifting(FakeEncoder):  # the feature dimension changes between shards
        def encode(self, texts, instruction=None, batch_size=32):
            self.dim += 1
            return super().encode(texts, instruction, batch_size)

    with pytest.raises(InputError, match="shard 1: feature dimension 8 differs from the cache's 7"):
        build_cache(tmp_path / "d", CAPTIONS, tiny_llama, shard_size=4, load_encoder=Shifting, progress=False)
    with pytest.raises(InputError, match="text encoder not found"):
        build_cache(
            tmp_path / "e", CAPTIONS, tmp_path / "no_encoder", load_encoder=FakeEncoder, progress=False
        )


def test_cli_builds_train_and_eval_caches(tmp_path, tiny_llama, synth_dir, capsys):
    cfg = tmp_path / "s2.yaml"
    cfg.write_text(f"""recipe: stage2
run: {{output_dir: {tmp_path}/run}}
text_encoder: {{path: {tiny_llama}, batch_size: 8}}
cache: {{dir: {tmp_path}/cache, shard_size: 16, dtype: float32}}
vision: {{name_or_path: unused}}
data:
  train: {synth_dir}/captions/val.jsonl
  image_root: {synth_dir}/images
  eval_short: {synth_dir}/retrieval/karpathy.json
  eval_long: {synth_dir}/retrieval/long_test.json
  eval_image_root: {synth_dir}/images
""")
    assert main(["stage2", "cache", "--config", str(cfg)]) == 0
    summary = json.loads(capsys.readouterr().out)
    n_val = len((synth_dir / "captions" / "val.jsonl").read_text().splitlines())
    assert summary["train"]["rows"] == 2 * n_val and summary["train"]["dim"] == 32
    assert summary["eval_short"]["rows"] == 5 * summary["eval_long"]["rows"]
    assert main(["stage2", "cache", "--config", str(cfg)]) == 0  # complete: reused
    capsys.readouterr()
    assert main(["stage2", "cache", "--config", str(cfg), f"data.train={synth_dir}/captions/test.jsonl"]) == 2
    assert "it is not reused" in capsys.readouterr().err
    # the first rows only (data.max_train_rows), in a cache of their own
    part = [f"cache.dir={tmp_path}/cache3", "data.max_train_rows=3"]
    assert main(["stage2", "cache", "--config", str(cfg), *part]) == 0
    assert json.loads(capsys.readouterr().out)["train"]["rows"] == 2 * 3
    shards = ["data.format=webdataset", f"data.train={tmp_path}/shards/{{00000..00001}}.tar"]
    assert main(["stage2", "cache", "--config", str(cfg), *part, *shards]) == 2
    assert "with webdataset shards, name fewer shards" in capsys.readouterr().err


def test_cli_caches_webdataset_captions_and_scans_the_images(tmp_path, tiny_llama, synth_dir, capsys):
    import io
    import tarfile

    from l2c_llava.config import load_config
    from l2c_llava.data.images import TrainTransform
    from l2c_llava.data.readers import read_caption_pairs
    from l2c_llava.data.webdataset import expand_shards, write_shards
    from l2c_llava.stage2.train import ShardImages

    pairs = read_caption_pairs(synth_dir / "captions" / "val.jsonl", synth_dir / "images")
    write_shards(
        [(f"{i:05d}", p.image_path, p.short, p.long) for i, p in enumerate(pairs)],
        tmp_path / "wds",
        per_shard=4,
    )
    # corrupt the image of the first sample of shard 1 (same size, garbage bytes)
    shard = tmp_path / "wds" / "00001.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for i, (m, data) in enumerate(members):
            tar.addfile(m, io.BytesIO(b"\0" * len(data) if i == 0 else data))
    bad_key = members[0][0].name.split(".")[0]
    n = len(list((tmp_path / "wds").glob("*.tar")))
    cfg = tmp_path / "s2.yaml"
    cfg.write_text(f"""recipe: stage2
run: {{output_dir: {tmp_path}/run}}
text_encoder: {{path: {tiny_llama}, batch_size: 8}}
cache: {{dir: {tmp_path}/cache, shard_size: 16, dtype: float32}}
vision: {{name_or_path: unused}}
data: {{format: webdataset, train: "{tmp_path}/wds/{{00000..{n - 1:05d}}}.tar"}}
""")
    assert main(["stage2", "cache", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"00001.tar/{bad_key}" in err and "cannot be read" in err and "on_bad_row" in err
    assert main(["stage2", "cache", "--config", str(cfg), "data.on_bad_row=skip"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["train"]["rows"] == 2 * (len(pairs) - 1)
    assert f"1 bad sample(s) of {len(pairs)} skipped" in captured.err
    bad = json.loads((tmp_path / "cache" / "train" / "bad_samples.json").read_text())
    assert list(bad) == [f"00001.tar/{bad_key}"]
    # training streams the shards and leaves the bad sample out (its caption has no feature: it would fail)
    c = load_config(cfg, ["data.on_bad_row=skip"])
    ds = ShardImages(
        expand_shards(c.data.train),
        TextFeatureCache(tmp_path / "cache" / "train"),
        TrainTransform(32),
        seed=0,
        share=0.5,
    )
    assert len(list(ds)) == len(pairs) - 1
