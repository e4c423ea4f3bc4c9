from __future__ import annotations

import json

import pytest
import torch

from l2c_llava.errors import InputError
from l2c_llava.stage1.encoder import TextEncoder, length_batches, lora_targets

from .tiny_llm import FAMILIES, save_tiny_llm


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {f: save_tiny_llm(root / f, f) for f in FAMILIES}


def _first_token_output(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state


def _check_bidirectional(model, expect: bool):
    """Changing the LAST token changes the FIRST real token's output iff attention is bidirectional;
    with left padding, and without; and padding never leaks into the real tokens."""
    ids = torch.tensor([[2, 2, 5, 6, 7, 8], [3, 4, 5, 6, 7, 8]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    ids2 = ids.clone()
    ids2[:, -1] = 9
    a, b = _first_token_output(model, ids, mask), _first_token_output(model, ids2, mask)
    assert (not torch.allclose(a[0, 2], b[0, 2], atol=1e-6)) == expect  # padded row
    assert (not torch.allclose(a[1, 0], b[1, 0], atol=1e-6)) == expect  # full row
    alone = _first_token_output(model, ids[:1, 2:], mask[:1, 2:])
    assert torch.allclose(alone[0], a[0, 2:], atol=1e-4), "padding changed the real tokens' outputs"


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_bidirectional_for_every_family_through_peft_and_merge(tiny_dirs, family, attn):
    from peft import LoraConfig, get_peft_model

    enc = TextEncoder.from_pretrained(tiny_dirs[family], attn_implementation=attn, device="cpu")
    _check_bidirectional(enc.model, expect=True)
    enc.set_bidirectional(False)
    _check_bidirectional(enc.model, expect=False)  # the control: causal attention does not see ahead
    enc.set_bidirectional(True)
    targets = lora_targets(enc.model, ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"])
    peft = get_peft_model(
        enc.model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    )
    _check_bidirectional(peft, expect=True)
    _check_bidirectional(peft.merge_and_unload(), expect=True)


def test_lora_targets_map_to_fused_projections(tiny_dirs):
    phi3 = TextEncoder.from_pretrained(tiny_dirs["phi3"], device="cpu")
    assert lora_targets(
        phi3.model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ) == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    with pytest.raises(ValueError, match="its linear layers: .*qkv_proj"):
        lora_targets(phi3.model, ["c_attn"])


def test_loading_a_causal_encoder_is_causal(tiny_dirs):
    enc = TextEncoder.from_pretrained(tiny_dirs["llama"], bidirectional=False, device="cpu")
    _check_bidirectional(enc.model, expect=False)


# --- pooling and instruction masking against hand-computed values ---------------------------


@pytest.mark.parametrize("pooling", ["mean", "weighted_mean", "eos_token", "last_token", "bos_token"])
def test_pooling_matches_hand_computation(tiny_dirs, pooling):
    enc = TextEncoder.from_pretrained(tiny_dirs["llama"], pooling=pooling, device="cpu")
    instruction = "given a caption retrieve a detailed caption"
    texts = ["a red circle", "two blue squares on a beige background", "star"]
    formatted = [enc.format_text(t, instruction) for t in texts]
    batch = enc.tokenize(formatted)
    with torch.no_grad():
        hidden = enc.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
        got = enc(**batch)
    width = batch["input_ids"].shape[1]
    for i, text in enumerate(texts):
        suffix = " </s>" if pooling == "eos_token" else ""
        n_text = len(
            enc.tokenizer(text.strip() + suffix if suffix else text, add_special_tokens=False)["input_ids"]
        )
        rows = hidden[i, width - n_text :]  # the caption's tokens: the last n positions (left padding)
        if pooling == "mean":
            want = rows.mean(dim=0)
        elif pooling == "weighted_mean":
            w = torch.arange(1, n_text + 1, dtype=torch.float32)
            want = (rows * (w / w.sum())[:, None]).sum(dim=0)
        elif pooling in ("eos_token", "last_token"):
            want = hidden[i, -1]
        else:
            first_real = int((batch["attention_mask"][i] == 0).sum())
            assert batch["input_ids"][i, first_real] == enc.tokenizer.bos_token_id
            want = hidden[i, first_real]
        assert torch.allclose(got[i], want, atol=1e-5), (pooling, i)
    if pooling == "eos_token":
        assert formatted[0].endswith(" </s>")


def test_instruction_is_attended_but_not_pooled(tiny_dirs):
    enc = TextEncoder.from_pretrained(tiny_dirs["llama"], device="cpu")
    text = "a red circle on a beige background"
    batch = enc.tokenize([enc.format_text(text, "given a caption retrieve a detailed caption")])
    n_text = len(enc.tokenizer(text, add_special_tokens=False)["input_ids"])
    assert batch["embed_mask"][0].tolist() == [0] * (batch["input_ids"].shape[1] - n_text) + [1] * n_text
    a = enc.encode([text], instruction="given a caption retrieve a detailed caption")
    b = enc.encode([text], instruction="given a short sentence")
    c = enc.encode([text])
    assert not torch.allclose(a, b) and not torch.allclose(a, c)  # the instruction is attended to
    enc.settings.skip_instruction = False
    d = enc.encode([text], instruction="given a caption retrieve a detailed caption")
    assert not torch.allclose(a, d)  # pooling over the instruction too gives something else


def test_encode_keeps_order_and_is_independent_of_batching(tiny_dirs):
    enc = TextEncoder.from_pretrained(tiny_dirs["qwen2"], device="cpu")
    texts = [
        "star",
        "two blue squares on a beige background",
        "a red circle",
        "a large solid red circle in the center",
    ]
    one = enc.encode(texts, batch_size=1)
    many = enc.encode(texts, batch_size=3)
    assert one.dtype == torch.float32 and one.shape == (4, 32)
    assert torch.allclose(one, many, atol=1e-5)
    assert torch.allclose(enc.encode(texts[::-1], batch_size=2), one.flip(0), atol=1e-5)
    normed = enc.encode(texts, normalize=True)
    assert torch.allclose(normed.norm(dim=-1), torch.ones(4), atol=1e-5)
    # the length-bucketed forward (training) gives the same features as one padded batch
    batch = enc.tokenize([enc.format_text(t) for t in texts])
    with torch.no_grad():
        assert torch.allclose(enc(**batch), enc(**batch, length_buckets=3), atol=1e-5)


def _brute_force_cost(widths: list[int], max_rows: int, overhead: int) -> float:
    """The least padded tokens + overhead per batch over every split of the sorted widths."""
    n = len(widths)
    if n == 0:
        return 0
    return min(
        widths[0] * k + overhead + _brute_force_cost(widths[k:], max_rows, overhead)
        for k in range(1, min(max_rows, n) + 1)
    )


def test_length_batches_are_the_least_padding_and_cover_every_text_once():
    import random

    rng = random.Random(0)
    for _ in range(40):
        lengths = [rng.choice([3, 4, 5, 9, 30, 31, 60]) for _ in range(rng.randint(1, 9))]
        max_rows, overhead = rng.randint(1, 4), rng.choice([0, 5, 64])
        batches = length_batches(lengths, max_rows, overhead)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        assert all(1 <= len(b) <= max_rows for b in batches)
        widths = [max(lengths[i] for i in b) for b in batches]
        assert widths == sorted(widths, reverse=True)  # longest first
        cost = sum(w * len(b) + overhead for w, b in zip(widths, batches))
        assert cost == _brute_force_cost(sorted(lengths, reverse=True), max_rows, overhead)
    # the demo's mix: dense captions are not padded into the batch of the longest short ones
    mix = [150, 140, 120, 25, 24, 22, 20] + [15] * 20
    for b in length_batches(mix, 8):
        assert len({mix[i] >= 120 for i in b}) == 1
    with pytest.raises(InputError, match="batch size"):
        length_batches([3], 0)


def test_bf16_features_stay_within_the_stated_tolerance_of_float32(tiny_dirs):
    """The stage-2 cache runs the encoder in bf16 (the demo's text_encoder.torch_dtype): on this tiny
    random model the features agree with float32 ones within a cosine of 0.9995 per text and a largest
    difference of 1% of the largest feature value (measured: 0.99998, 0.2%). SmolLM2-135M is more
    sensitive on short captions (bench/text_encode.py against llm2vec's float32: dense captions
    >= 0.9999, short ones down to about 0.986, mean 0.998; bench/RESULTS.md)."""
    texts = [
        "star",
        "two blue squares on a beige background",
        "a large solid red circle in the center, next to three small green triangles",
        " ".join(["red circle on blue"] * 12),
    ]
    f32 = TextEncoder.from_pretrained(tiny_dirs["llama"], torch_dtype="float32", device="cpu")
    b16 = TextEncoder.from_pretrained(tiny_dirs["llama"], torch_dtype="bfloat16", device="cpu")
    assert next(b16.model.parameters()).dtype == torch.bfloat16
    a, b = f32.encode(texts, batch_size=2), b16.encode(texts, batch_size=2)
    assert b.dtype == torch.float32  # pooled in float32 whatever the compute dtype
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert bool((cos >= 0.9995).all()), cos.tolist()
    assert (a - b).abs().max() <= 0.01 * a.abs().max()
    assert not torch.equal(a, b)  # it did run in bf16


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: frozen q/k/v biases too
def test_frozen_base_in_bf16_gives_the_same_autocast_step(tiny_dirs, family):
    from peft import LoraConfig, get_peft_model

    from l2c_llava.stage1.encoder import frozen_linears_in

    enc = TextEncoder.from_pretrained(tiny_dirs[family], device="cpu")
    enc.model = get_peft_model(
        enc.model, LoraConfig(r=4, lora_alpha=8, target_modules=lora_targets(enc.model, ["q_proj", "v_proj"]))
    )
    torch.nn.init.normal_(enc.model.base_model.model.layers[0].self_attn.q_proj.lora_B.default.weight)
    batch = enc.tokenize([enc.format_text(t) for t in ["a red circle", "two blue squares on beige"]])
    before = {n: p.detach().clone() for n, p in enc.named_parameters()}

    def grads():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            enc(**batch, length_buckets=2).float().square().sum().backward()
        out = {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}
        enc.zero_grad(set_to_none=True)
        return out

    plain = grads()
    with frozen_linears_in(enc.model, torch.bfloat16) as n:
        assert n > 0 and enc.model.base_model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
        cast = grads()
    assert plain.keys() == cast.keys() and len(plain) > 0
    assert all(torch.equal(plain[k], cast[k]) for k in plain)  # the same products, bit for bit
    after = dict(enc.named_parameters())
    assert all(after[n].dtype == v.dtype and torch.equal(after[n], v) for n, v in before.items())


def test_bf16_encode_holds_every_linear_in_bf16_and_gives_them_back(tiny_dirs):
    """frozen_only=False (stage 1's evaluation of a bf16 run): the trained LoRA weights are held in bf16
    too while encoding; the features stay close to float32's and every parameter comes back unchanged."""
    from peft import LoraConfig, get_peft_model

    from l2c_llava.stage1.encoder import frozen_linears_in

    enc = TextEncoder.from_pretrained(tiny_dirs["llama"], device="cpu")
    enc.model = get_peft_model(
        enc.model, LoraConfig(r=4, lora_alpha=8, target_modules=lora_targets(enc.model, ["q_proj", "v_proj"]))
    )
    lora = enc.model.base_model.model.layers[0].self_attn.q_proj.lora_B.default.weight
    torch.nn.init.normal_(lora)
    before = {n: p.detach().clone() for n, p in enc.named_parameters()}
    texts = ["a red circle", "two blue squares on beige"]
    plain = enc.encode(texts)
    with torch.autocast("cpu", dtype=torch.bfloat16), frozen_linears_in(enc.model, torch.bfloat16, False):
        assert lora.dtype == torch.bfloat16  # trainable, cast as well
        low = enc.encode(texts)
    with frozen_linears_in(enc.model, torch.bfloat16):  # the default leaves the trainable ones alone
        assert lora.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(plain, low).min() > 0.99
    after = dict(enc.named_parameters())
    assert all(after[n].dtype == v.dtype and torch.equal(after[n], v) for n, v in before.items())


def test_doc_max_length_cuts_long_texts_by_words(tiny_dirs):
    enc = TextEncoder.from_pretrained(tiny_dirs["llama"], doc_max_length=8, device="cpu")
    text = " ".join(["red circle"] * 20)
    formatted = enc.format_text(text)
    kept = formatted.split("!@#$%^&*()")[1]
    assert len(enc.tokenizer(kept, add_special_tokens=False)["input_ids"]) <= 8
    assert text.startswith(kept)


# --- saving and loading ---------------------------------------------------------------------


def test_save_reload_adapter_and_merged(tiny_dirs, tmp_path):
    from peft import LoraConfig, get_peft_model

    enc = TextEncoder.from_pretrained(tiny_dirs["mistral"], pooling="weighted_mean", device="cpu")
    enc.model = get_peft_model(
        enc.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    texts = ["a red circle", "two blue squares"]
    want = enc.encode(texts)
    enc.save(tmp_path / "adapter_form")
    meta = json.loads((tmp_path / "adapter_form" / "l2c_encoder.json").read_text())
    assert (
        meta["standalone"] is False
        and (tmp_path / "adapter_form" / "adapter" / "adapter_model.safetensors").is_file()
    )
    again = TextEncoder.from_pretrained(tmp_path / "adapter_form", device="cpu")
    assert again.settings.pooling == "weighted_mean"
    assert torch.allclose(again.encode(texts), want, atol=1e-5)
    enc.save(tmp_path / "merged_form", merged=True)
    assert (tmp_path / "merged_form" / "model.safetensors").is_file()
    merged = TextEncoder.from_pretrained(tmp_path / "merged_form", device="cpu")
    assert torch.allclose(merged.encode(texts), want, atol=1e-5)
    _check_bidirectional(merged.model, expect=True)


def _random_adapter(base_dir, out_dir, seed, targets):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    torch.manual_seed(seed)
    model = AutoModel.from_pretrained(base_dir)
    peft = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    )
    peft.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def test_llm2vec_format_folder_base_plus_adapter_chain(tiny_dirs, tmp_path):
    """base + LoRA adapters merged in turn + llm2vec_config.json (LLM2CLIP's checkpoint layout)."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModel

    base = tiny_dirs["llama"]
    a1 = _random_adapter(base, tmp_path / "mntp", 1, ["q_proj", "k_proj", "v_proj"])
    a2 = _random_adapter(base, tmp_path / "supervised", 2, ["o_proj", "up_proj"])
    (a2 / "llm2vec_config.json").write_text(
        json.dumps(
            {
                "pooling_mode": "weighted_mean",
                "max_length": 64,
                "doc_max_length": 32,
                "skip_instruction": True,
            }
        )
    )
    enc = TextEncoder.from_pretrained(base, adapters=[a1, a2], device="cpu")
    assert (enc.settings.pooling, enc.settings.max_length, enc.settings.doc_max_length) == (
        "weighted_mean",
        64,
        32,
    )
    # the same weights by hand: merge a1, then a2, bidirectional
    cfg = AutoConfig.from_pretrained(base)
    cfg.is_causal = False
    manual = AutoModel.from_pretrained(base, config=cfg)
    manual = PeftModel.from_pretrained(manual, str(a1)).merge_and_unload()
    manual = PeftModel.from_pretrained(manual, str(a2)).merge_and_unload()
    for (k, v), (k2, v2) in zip(enc.model.state_dict().items(), manual.state_dict().items()):
        assert k == k2 and torch.allclose(v, v2), k
    plain = TextEncoder.from_pretrained(base, device="cpu")
    assert not torch.allclose(plain.encode(["a red circle"]), enc.encode(["a red circle"]))
    # explicit options override the saved ones
    assert (
        TextEncoder.from_pretrained(base, adapters=[a1, a2], pooling="mean", device="cpu").settings.pooling
        == "mean"
    )


# --- bad input ------------------------------------------------------------------------------


def test_unknown_model_family_is_named(tmp_path):
    from transformers import BertConfig, BertModel

    folder = tmp_path / "bert"
    BertModel(
        BertConfig(
            vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        )
    ).save_pretrained(folder)
    with pytest.raises(
        InputError,
        match=r"model family 'bert' is not supported.*supported: gemma, llama, mistral, phi3, qwen2, qwen3",
    ):
        TextEncoder.from_pretrained(folder, device="cpu")


def test_gguf_that_is_not_a_decoder_llm(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "encoder.gguf"
    w = gguf.GGUFWriter(str(path), "bert")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(InputError, match=r"holds a 'bert' model, not a supported decoder LLM"):
        TextEncoder.from_pretrained(path, device="cpu")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"this is not gguf at all" * 10)
    with pytest.raises(InputError, match="is not a readable GGUF file"):
        TextEncoder.from_pretrained(junk, device="cpu")
    with pytest.raises(InputError, match="GGUF file not found"):
        TextEncoder.from_pretrained(tmp_path / "missing.gguf", device="cpu")


def test_checkpoint_folders_missing_files(tiny_dirs, tmp_path):
    import shutil

    with pytest.raises(InputError, match="model folder not found"):
        TextEncoder.from_pretrained(tmp_path / "nowhere", device="cpu")
    no_config = shutil.copytree(tiny_dirs["llama"], tmp_path / "no_config")
    (no_config / "config.json").unlink()
    with pytest.raises(InputError, match="has no config.json"):
        TextEncoder.from_pretrained(no_config, device="cpu")
    no_weights = shutil.copytree(tiny_dirs["llama"], tmp_path / "no_weights")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(InputError, match=r"has no \*.safetensors weights"):
        TextEncoder.from_pretrained(no_weights, device="cpu")
    empty_adapter = tmp_path / "adapter"
    empty_adapter.mkdir()
    with pytest.raises(InputError, match="has no adapter_config.json"):
        TextEncoder.from_pretrained(tiny_dirs["llama"], adapters=[empty_adapter], device="cpu")
    (empty_adapter / "adapter_config.json").write_text("{}")
    (empty_adapter / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(InputError, match="no adapter_model.safetensors .found adapter_model.bin: convert it"):
        TextEncoder.from_pretrained(tiny_dirs["llama"], adapters=[empty_adapter], device="cpu")
    broken = tmp_path / "encoder"
    broken.mkdir()
    (broken / "l2c_encoder.json").write_text(
        json.dumps({"standalone": False, "source": {"base": str(tiny_dirs["llama"])}})
    )
    with pytest.raises(InputError, match="names an adapter, but .* is missing"):
        TextEncoder.from_pretrained(broken, device="cpu")


def test_empty_text_is_refused_with_its_index(tiny_dirs):
    enc = TextEncoder.from_pretrained(tiny_dirs["llama"], device="cpu")
    with pytest.raises(ValueError, match="text 1 is empty"):
        enc.encode(["a red circle", "   "])
    with pytest.raises(TypeError, match="list of texts"):
        enc.encode("a red circle")
