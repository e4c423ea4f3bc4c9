"""`l2c search`: the index gives the brute-force top-k, refuses another encoder's vectors, adds images
without re-embedding the old ones, reports an approximate index's recall, and draws the comparison."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from l2c_llava.cli import main
from l2c_llava.data.images import load_rgb
from l2c_llava.search import (
    Encoder,
    SearchError,
    SearchIndex,
    build_faiss,
    build_index,
    list_images,
    recall_vs_exact,
    run_queries,
)

from .test_stage2_eval_export import release_folder
from .tiny_models import FakeEncoder

pytest.importorskip("faiss")


def save_tiny_clip(folder, seed=0):
    """A random transformers CLIPModel folder with OpenAI's tokenizer and an image processor config."""
    from transformers import CLIPTokenizer

    from l2c_llava.data.images import write_preprocessor_config
    from l2c_llava.embedded import write_clip_tokenizer_files
    from l2c_llava.stage2.clip_baseline import build_clip

    write_clip_tokenizer_files(folder)
    tok = CLIPTokenizer.from_pretrained(folder)
    m = SimpleNamespace(
        text_width=32,
        mlp_ratio=2,
        text_layers=1,
        text_heads=2,
        context_length=77,
        projection_dim=16,
        image_size=32,
        patch_size=8,
        vision_width=32,
        vision_layers=1,
        vision_heads=2,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    build_clip(m, tok).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    write_preprocessor_config(folder, 32)
    return folder


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("search_enc")
    save_tiny_clip(root / "clip")
    release_folder(root / "llm2clip", text_dim=12, proj=16)
    return root


def llm2clip_encoder(encoders):
    return Encoder(encoders / "llm2clip", text_encoder=FakeEncoder(dim=12), batch_size=7)


def brute_force(encoder, root, query_vecs, k):
    paths = list_images(root)
    vecs = encoder.embed_images([load_rgb(root / p) for p in paths])
    scores, idx = (query_vecs @ vecs.T).topk(k, dim=1)
    return [[(paths[i], float(s)) for s, i in zip(srow, irow)] for srow, irow in zip(scores, idx)]


@pytest.mark.parametrize("which", ["clip", "llm2clip"])
def test_search_gives_the_brute_force_top_k(tmp_path, encoders, synth_dir, which):
    enc = Encoder(encoders / "clip", batch_size=7) if which == "clip" else llm2clip_encoder(encoders)
    root = synth_dir / "images"
    summary = build_index(root, enc, tmp_path / "idx", progress=False)
    assert summary["count"] == len(list_images(root)) == summary["embedded"] > 20
    index = SearchIndex(tmp_path / "idx")
    texts = ["a red circle on a beige background", "three blue squares"]
    image_query = root / list_images(root)[3]
    results = run_queries(index, enc, texts, [str(image_query)], k=5)
    want = brute_force(
        enc, root, torch.cat([enc.embed_texts(texts), enc.embed_images([load_rgb(image_query)])]), 5
    )
    for res, exp in zip(results, want):
        assert [h.path for h in res["hits"]] == [p for p, _ in exp]
        assert [h.score for h in res["hits"]] == pytest.approx([s for _, s in exp], abs=1e-5)
    assert results[2]["hits"][0].path == list_images(root)[3]  # an image finds itself first
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert meta["encoder"]["kind"] == which and meta["count"] == summary["count"]


def test_an_index_refuses_another_encoder(tmp_path, encoders, synth_dir, capsys):
    clip = Encoder(encoders / "clip")
    build_index(synth_dir / "images", clip, tmp_path / "idx", progress=False)
    index = SearchIndex(tmp_path / "idx")
    other = llm2clip_encoder(encoders)
    with pytest.raises(SearchError, match="not comparable"):
        run_queries(index, other, ["a red circle"])
    with pytest.raises(SearchError, match="not comparable"):  # even with vectors of the same dimension
        index.search(other.embed_texts(["a red circle"]), 3, other.identity)
    with pytest.raises(SearchError, match="another"):  # adding with another encoder
        build_index(synth_dir / "images", other, tmp_path / "idx", progress=False)
    # another CLIP with other weights is another encoder too
    save_tiny_clip(tmp_path / "clip2", seed=1)
    capsys.readouterr()
    rc = main(
        [
            "search",
            "query",
            "--index",
            str(tmp_path / "idx"),
            "--text",
            "a red circle",
            "--encoder",
            str(tmp_path / "clip2"),
        ]
    )
    assert rc == 2 and "not comparable" in capsys.readouterr().err


def test_adding_images_embeds_only_the_new_ones(tmp_path, encoders, synth_dir, monkeypatch):
    src = synth_dir / "images"
    root = tmp_path / "imgs"
    root.mkdir()
    names = list_images(src)

    def copy(n):
        (root / n).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / n, root / n)

    for n in names[:10]:
        copy(n)
    enc = Encoder(encoders / "clip", batch_size=4)
    assert build_index(root, enc, tmp_path / "idx", progress=False)["embedded"] == 10
    before = SearchIndex(tmp_path / "idx")
    embedded = []
    original = enc.embed_images
    monkeypatch.setattr(enc, "embed_images", lambda imgs: embedded.append(len(imgs)) or original(imgs))
    for n in names[10:13]:
        copy(n)
    (root / names[0]).unlink()
    (root / "sub").mkdir()
    (root / "sub" / "broken.png").write_bytes(b"not a png")
    s = build_index(root, enc, tmp_path / "idx", progress=False)
    assert (s["embedded"], s["reused"], s["removed"], s["skipped"]) == (3, 9, 1, 1) and sum(embedded) == 3
    after = SearchIndex(tmp_path / "idx")
    assert len(after) == 12 and [it["path"] for it in after.items] == sorted(it["path"] for it in after.items)
    old = {it["path"]: before.vectors[i] for i, it in enumerate(before.items)}
    for i, it in enumerate(after.items):  # the kept rows are the old vectors, bit for bit
        if it["path"] in old:
            assert torch.equal(after.vectors[i], old[it["path"]])
    assert after.meta["skipped"][0]["path"] == "sub/broken.png"
    # a query over the updated index still equals brute force
    q = enc.embed_texts(["two green triangles"])
    monkeypatch.setattr(enc, "embed_images", original)
    (root / "sub" / "broken.png").unlink()
    want = brute_force(enc, root, q, 4)[0]
    assert [h.path for h in after.search(q, 4, enc.identity)[0]] == [p for p, _ in want]


def test_approximate_indexes_report_their_recall():
    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(3000, 24), dim=-1)
    exact = recall_vs_exact(x, build_faiss(x, "flat", {}), k=10, queries=200)
    assert exact["recall"] == 1.0
    full_probe = recall_vs_exact(x, build_faiss(x, "ivf", {"nlist": 16, "nprobe": 16}), k=10, queries=200)
    assert full_probe["recall"] == pytest.approx(1.0)  # every cell searched: exact
    one_probe = recall_vs_exact(x, build_faiss(x, "ivf", {"nlist": 64, "nprobe": 1}), k=10, queries=200)
    assert 0.0 < one_probe["recall"] < 0.95  # one cell of 64: misses some
    hnsw = recall_vs_exact(x, build_faiss(x, "hnsw", {"hnsw_m": 16, "ef_search": 128}), k=10, queries=200)
    assert hnsw["recall"] > 0.9


def test_cli_index_and_compare_with_a_contact_sheet(tmp_path, encoders, synth_dir, capsys):
    from PIL import Image

    images = synth_dir / "images"
    assert (
        main(
            [
                "search",
                "index",
                "--images",
                str(images),
                "--encoder",
                str(encoders / "clip"),
                "--out",
                str(tmp_path / "clip_idx"),
                "--kind",
                "hnsw",
            ]
        )
        == 0
    )
    assert "recall@10 vs exact" in capsys.readouterr().out
    meta = json.loads((tmp_path / "clip_idx" / "index.json").read_text())
    assert meta["kind"] == "hnsw" and 0 < meta["recall_vs_exact"]["recall"] <= 1
    assert (tmp_path / "clip_idx" / "index.faiss").is_file()
    # an LLM2CLIP index (its text side needs the caption encoder: a fake one through the API)
    build_index(images, llm2clip_encoder(encoders), tmp_path / "l2c_idx", progress=False)
    query_image = images / list_images(images)[0]
    sheet = tmp_path / "cmp" / "sheet.png"
    rc = main(
        [
            "search",
            "query",
            "--index",
            str(tmp_path / "clip_idx"),
            "--compare",
            str(tmp_path / "l2c_idx"),
            "--image",
            str(query_image),
            "--k",
            "4",
            "--sheet",
            str(sheet),
            "--json",
            str(tmp_path / "hits.json"),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "clip: clip_idx" in out and "llm2clip: l2c_idx" in out
    with Image.open(sheet) as im:
        assert im.size[0] > 4 * 112 and im.size[1] > 2 * 112
    hits = json.loads((tmp_path / "hits.json").read_text())
    assert [h["encoder"]["kind"] for h in hits] == ["clip", "llm2clip"]
    assert all(len(h["results"][0]["hits"]) == 4 for h in hits)
    assert (tmp_path / "cmp" / "sheet.md").is_file()
    assert main(["search", "query", "--index", str(tmp_path / "clip_idx")]) == 2
    assert (
        main(
            [
                "search",
                "index",
                "--images",
                str(tmp_path / "none"),
                "--encoder",
                str(encoders / "clip"),
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )


def test_a_damaged_index_is_rebuilt_not_reused_and_its_paths_stay_under_the_root(
    tmp_path, encoders, synth_dir
):
    root = tmp_path / "imgs"
    shutil.copytree(synth_dir / "images" / "00000", root)
    enc = Encoder(encoders / "clip", batch_size=8)
    idx = tmp_path / "idx"
    n = build_index(root, enc, idx, progress=False)["embedded"]
    emb = idx / "embeddings.safetensors"
    data = bytearray(emb.read_bytes())
    data[-8:] = b"\xff" * 8  # NaN in place, same size: reused, it would poison every later query
    emb.write_bytes(bytes(data))
    s = build_index(root, enc, idx, progress=False)
    assert (s["embedded"], s["reused"]) == (n, 0)
    assert torch.isfinite(SearchIndex(idx).vectors).all()
    assert build_index(root, enc, idx, progress=False)["reused"] == n  # intact: reused again
    items = json.loads((idx / "items.json").read_text())
    items[0]["path"] = "../../etc/passwd"
    (idx / "items.json").write_text(json.dumps(items))
    with pytest.raises(SearchError, match=r"item '../../etc/passwd' is not a path under the image root"):
        SearchIndex(idx)
    (idx / "items.json").write_text("[{not json")
    with pytest.raises(SearchError, match=r"items.json cannot be read \(JSONDecodeError.*rebuild it"):
        SearchIndex(idx)
