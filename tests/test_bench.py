"""The benchmark scripts run (tiny sizes; the figures themselves are measured by hand, never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import LLM2VEC_ENV, ROOT, env_setup


def _run(args, tmp_path):
    out = subprocess.run(
        [sys.executable, *args, "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout


def test_gpu_benchmark_runs_at_tiny_sizes_on_cpu(tmp_path):
    text = _run(["bench/gpu.py", "--tiny"], tmp_path)
    res = json.loads((tmp_path / "gpu-tiny-cpu.json").read_text())
    assert set(res["benches"]) == {"stage2", "stage1", "llava_lora", "llava_full"}
    for r in res["benches"].values():
        assert r["largest_batch"] >= r["batch"] and any(k.endswith("_per_s") and v > 0 for k, v in r.items())
    assert "| stage2 |" in text


def test_cpu_suite_runs_quick(tmp_path, synth_dir):
    _run(["bench/run.py", "--quick", "--only", "retrieval", "stage2_step"], tmp_path)
    res = json.loads(next(tmp_path.glob("cpu-quick-*.json")).read_text())["benches"]
    assert res["retrieval"]["ratio"] > 0 and res["stage2_step"]["ratio_cached_over_clip"] > 0


@pytest.mark.slow
def test_llava_data_and_text_encode_benchmarks_run(tmp_path, synth_dir):
    sys.path.insert(0, str(ROOT / "bench"))
    import llava_data

    r = llava_data.run(str(synth_dir), batch=2, batches=2, model_steps=1)
    assert 0 <= r["padding_waste_grouped"] <= r["padding_waste_random"] <= 1
    assert r["collate_rows_per_s"] > 0 and r["model_step_rows_per_s"] > 0
    import text_encode

    # the llm2vec environment text_encode runs its side in: the build started when collection ended
    assert env_setup(*LLM2VEC_ENV).returncode == 0
    t = text_encode.run(images=2, batch=4, rounds=1, weights="random")
    assert t["captions"] == 12 and t["short_captions"] == 10
    for side in ("ours_bf16", "llm2vec_fp32", "ours_fp32"):
        assert t[side]["texts_per_s"] > 0
    assert t["agreement_with_llm2vec_fp32"]["ours_fp32"]["cosine_min"] > 0.9999
    import llava_step

    s = llava_step.run(str(synth_dir), batch=2, steps=1)
    for stage in ("pretrain", "finetune"):
        r = s[stage]
        assert 0 < r["positions_kept_share"] < 1 and r["ratio_kept_over_all"] > 0
        assert r["float32_logits_mb_per_batch"]["kept"] < r["float32_logits_mb_per_batch"]["all"]


@pytest.mark.slow
def test_gemm_limit_benchmark_counts_every_stage(tmp_path):
    """Every stage runs (tiny random models), its FLOPs counted and the analytic count close to them."""
    sys.path.insert(0, str(ROOT / "bench"))
    from gemm_limit import STAGES

    _run(["bench/gemm_limit.py", "--quick"], tmp_path)
    res = json.loads((tmp_path / "gemm_limit-quick.json").read_text())
    assert set(res["stages"]) == set(STAGES)
    for dtype in ("bf16", "fp32"):
        assert res["limit_start"][dtype]["limit_gflops"] > 0 and res["limit_end"][dtype]["limit_gflops"] > 0
    for name, stage in res["stages"].items():
        for dtype in ("bf16", "fp32") if name != "retrieval" else ("fp32",):
            r = stage[dtype]
            assert r["gflops_counted"] > 0 and r["share_of_limit"] > 0, (name, dtype, r)
            assert 0.8 <= r["analytic_over_counted"] <= 1.25, (name, dtype, r)
            assert 0 < r["useful_share_of_limit"] <= r["share_of_limit"] + 1e-9


def test_caption_corruptions_mark_exactly_the_changed_rows():
    sys.path.insert(0, str(ROOT / "bench"))
    from caption_filter import corrupt

    rows = [
        {
            "image": f"{i}.jpg",
            "short": f"a red circle number {i}",
            "long": f"one red circle, {i} of them, on blue",
        }
        for i in range(40)
    ]
    for kind in ("swap", "colour"):
        noisy, bad = corrupt(rows, kind, 0.25, seed=1)
        changed = {r["image"] for r, o in zip(noisy, rows) if r != o}
        assert changed == bad and len(bad) == 10 and [r["image"] for r in noisy] == [r["image"] for r in rows]
    noisy, bad = corrupt(rows, "colour", 0.25, seed=1)
    assert all("red" not in r["short"] for r in noisy if r["image"] in bad)


def test_patch_probe_questions_are_true_and_the_probe_runs(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import patch_probe

    from l2c_llava.data.scenes import COLOURS, SHAPES
    from l2c_llava.data.synthetic import SynthOptions, generate
    from l2c_llava.stage2.health import _CELL0, _SHAPE0, probe_questions

    from .tiny_models import tiny_vision

    data = tmp_path / "data"
    generate(data, SynthOptions(images=60, seed=5, size=64, test_fraction=0.3), workers=1, progress=False)
    rows = [json.loads(x) for x in (data / "scenes.jsonl").read_text().splitlines()]
    q = probe_questions(rows)
    colours = list(COLOURS)
    for scene, a, b, task, target, _ in q.tolist():
        groups = {(g["colour"], g["shape"]): g["row"] * 3 + g["col"] for g in rows[scene]["groups"]}
        if task == 2:  # the colour of the shape in a cell
            shape, cell = SHAPES[a - _SHAPE0], b - _CELL0
            assert (colours[target], shape) in groups and groups[(colours[target], shape)] == cell
            continue
        key = (colours[a], SHAPES[b - _SHAPE0])
        if task == 0:
            assert (key in groups) == bool(target)
        else:
            assert groups[key] == target
    assert int((q[:, 3] == 0).sum()) == 2 * int((q[:, 3] == 1).sum())  # one absent pair per present group
    tiny_vision().save_pretrained(tmp_path / "tower")
    res = patch_probe.run(str(data), [str(tmp_path / "tower"), "random"], steps=5)
    for tower in (str(tmp_path / "tower"), "random"):
        for split in ("train", "test"):
            assert set(res["towers"][tower]["probe"][split]) == {"existence", "position", "colour"}
            assert all(0 <= v <= 1 for v in res["towers"][tower]["probe"][split].values())
    assert 0 < res["towers"]["random"]["probe"]["chance"]["position"] <= 1


def test_stage2_data_benchmark_runs_each_variant_and_shares_the_test_features(tmp_path, synth_dir):
    from .tiny_llm import save_tiny_llm

    encoder = save_tiny_llm(tmp_path / "enc", "llama")
    out = tmp_path / "s2"
    args = [
        sys.executable,
        "bench/stage2_data.py",
        "--data",
        str(synth_dir),
        "--encoder",
        str(encoder),
        "--steps",
        "2",
        "--variant",
        "short=captions/train.jsonl:short",
        "--variant",
        "coco=captions/train.jsonl:alternatives",
        "--set",
        "train.batch_size=4",
        "eval.batch_size=8",
        "--out",
        str(out),
    ]
    res = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    rows = [r for r in res.stdout.splitlines() if r.startswith("| coco |") or r.startswith("| short |")]
    assert len(rows) == 8  # 2 variants x 2 sets x 2 directions, each with baseline, LLM2CLIP and paired p
    shorts = json.loads((out / "short" / "cache" / "train" / "manifest.json").read_text())["rows"]
    coco = json.loads((out / "coco" / "cache" / "train" / "manifest.json").read_text())["rows"]
    assert coco > shorts  # five captions per image instead of one
    assert (out / "coco" / "cache" / "eval_long").resolve() == (out / "eval_cache" / "eval_long").resolve()
