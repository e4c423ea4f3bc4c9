"""Fault injection: each fault a new user can hit gives a message that names the file, row or key and
what to do (exit code 2 from the CLI), and nothing the user had is gone. Tiny data, tiny models built
in code; the whole module runs in seconds."""

from __future__ import annotations

import errno as errno_
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from l2c_llava import io as l2c_io
from l2c_llava.cli import main
from l2c_llava.data.readers import DataError, read_caption_pairs
from l2c_llava.errors import CannotRunError, L2CError, OutputError
from l2c_llava.io import HOLDER_NAME, run_lock

from .conftest import ROOT


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _photos(folder: Path, n: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (16, 16), (40 * i, 90, 200)).save(folder / f"p{i}.jpg", quality=90)
    return folder


def _tiny_tower(folder: Path, safe: bool = True) -> Path:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=16,
    )
    torch.manual_seed(0)
    model = CLIPVisionModel(cfg)
    if safe:
        model.save_pretrained(folder)
    else:  # what older exports hold (transformers 5 writes safetensors only)
        cfg.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


# -- one error type, caught once -------------------------------------------------------------------


def test_module_errors_share_the_base_and_keep_their_builtin_type():
    from l2c_llava.config import ConfigError
    from l2c_llava.mllm.build import BuildError

    assert issubclass(DataError, L2CError) and issubclass(DataError, ValueError)
    assert issubclass(ConfigError, L2CError) and issubclass(BuildError, L2CError)
    assert issubclass(CannotRunError, L2CError) and issubclass(CannotRunError, RuntimeError)


def test_cli_prints_an_l2c_error_with_exit_2_and_keeps_tracebacks_of_bugs(monkeypatch, capsys):
    import l2c_llava.cli as cli

    monkeypatch.setitem(
        cli.COMMANDS,
        "ls",
        replace(cli.COMMANDS["ls"], run=lambda args: (_ for _ in ()).throw(OutputError("X: do Y"))),
    )
    assert main(["ls"]) == 2
    assert capsys.readouterr().err.strip() == "l2c ls: X: do Y"
    monkeypatch.setitem(
        cli.COMMANDS,
        "ls",
        replace(cli.COMMANDS["ls"], run=lambda args: (_ for _ in ()).throw(KeyError("bug"))),
    )
    with pytest.raises(KeyError):
        main(["ls"])


# -- data faults -----------------------------------------------------------------------------------


def test_non_utf8_caption_file_names_the_line(tmp_path, capsys):
    f = tmp_path / "pairs.jsonl"
    good = json.dumps({"image": "a.jpg", "short": "a cat", "long": "a cat on a mat"})
    f.write_bytes(good.encode() + b"\n" + b'{"image": "b.jpg", "short": "caf\xe9", "long": "x"}\n')
    before = f.read_bytes()
    assert main(["data", "check", str(f), "--format", "pairs"]) == 2
    out = capsys.readouterr()
    assert "line 2" in out.out and "not UTF-8 text (byte 0xe9" in out.out
    with pytest.raises(DataError, match=r"line 2: not UTF-8"):
        read_caption_pairs(f)  # what stage 1 reads
    csv = tmp_path / "pairs.csv"
    csv.write_bytes(b"image,short,long\na.jpg,ok,fine\nb.jpg,caf\xe9,x\n")
    with pytest.raises(DataError, match=r"line 3: not UTF-8 text.*\nSave the file as UTF-8"):
        read_caption_pairs(csv)
    assert f.read_bytes() == before


def test_empty_jsonl_says_it_is_empty_not_skip(tmp_path, capsys):
    f = tmp_path / "empty.jsonl"
    f.write_text("\n")
    with pytest.raises(DataError) as e:
        read_caption_pairs(f)
    assert "holds no rows (the file is empty)" in str(e.value) and "on_bad_row" not in str(e.value)
    (tmp_path / "empty.json").write_text("")
    assert main(["data", "check", str(tmp_path / "empty.json"), "--format", "llava"]) == 2
    assert "holds no rows" in capsys.readouterr().err


def test_truncated_jpeg_is_found_by_the_default_check(tmp_path, capsys):
    from l2c_llava.config.schemas import DataChecks

    root = _photos(tmp_path / "img", 2)
    noise = torch.randint(
        0, 256, (128, 128, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )
    Image.fromarray(noise.numpy()).save(root / "p1.jpg", quality=90)
    data = (root / "p1.jpg").read_bytes()
    (root / "p1.jpg").write_bytes(data[: len(data) * 2 // 3])  # a copy cut short: the header is intact
    f = tmp_path / "pairs.jsonl"
    f.write_text(
        "".join(json.dumps({"image": f"p{i}.jpg", "short": "s", "long": "l"}) + "\n" for i in range(2))
    )
    assert DataChecks().image_check == "decode"  # every training config's default
    assert (
        read_caption_pairs(f, root, image_check="header", on_bad_row="skip").skipped == []
    )  # the old default
    assert main(["data", "check", str(f), "--format", "pairs", "--image-root", str(root)]) == 2
    out = capsys.readouterr()
    assert "line 2" in out.out and "truncated" in out.out and "1 good, 1 bad of 2" in out.err


def test_long_captions_and_duplicate_ids_are_warned_with_counts(tmp_path, capsys):
    f = tmp_path / "pairs.jsonl"
    rows = [
        {"image": "a.jpg", "short": "s", "long": "x" * 100_000},
        {"image": "b.jpg", "short": "s", "long": "l"},
        {"image": "a.jpg", "short": "t", "long": "m"},
    ]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = read_caption_pairs(f)
    assert len(loaded) == 3  # warnings, not errors
    assert any(
        "1 caption(s) longer than 20,000" in w and "line 1 (100,000 chars)" in w for w in loaded.warnings
    )
    assert any(
        "1 row(s) with a duplicate image" in w and "line 3 repeats line 1" in w for w in loaded.warnings
    )
    conv = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]
    lj = tmp_path / "llava.json"
    lj.write_text(
        json.dumps([{"id": "7", "conversations": conv}, {"id": "7", "conversations": conv}]).replace(
            "<image>\\n", ""
        )
    )
    assert main(["data", "check", str(lj), "--format", "llava"]) == 0
    assert "1 row(s) with a duplicate id (first: item 1 repeats item 0 ('7'))" in capsys.readouterr().err


def test_bad_llava_rows_are_reported_before_any_model_loads(tmp_path, monkeypatch):
    from l2c_llava.config import load_config
    from l2c_llava.mllm import train as mllm_train

    bad = tmp_path / "pretrain.json"
    bad.write_text(
        json.dumps([{"id": "0", "image": "p0.jpg", "conversations": [{"from": "human", "value": "hi"}]}])
    )
    _photos(tmp_path / "img", 1)
    cfg = load_config(
        str(ROOT / "mllm/configs/quick_pretrain.yaml"),
        [f"run.output_dir={tmp_path / 'run'}", f"data.path={bad}", f"data.image_root={tmp_path / 'img'}"],
    )

    def build(self, quantize=True):
        raise AssertionError("a model was built before the rows were checked")

    monkeypatch.setattr(mllm_train.MllmRecipe, "build", build)
    with pytest.raises(DataError, match=r"item 0: .*<image>|item 0: the last turn"):
        mllm_train.run_mllm(cfg)


# -- weights ---------------------------------------------------------------------------------------


def test_corrupt_safetensors_tower_names_the_file(tmp_path, capsys):
    tower = _tiny_tower(tmp_path / "tower")
    (tower / "model.safetensors").write_bytes(b"\x00\x01garbage")
    out = tmp_path / "llava"
    assert (
        main(
            [
                "mllm",
                "build",
                "--vision",
                str(tower),
                "--llm",
                "embedded:smollm2-135m-instruct",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert f"vision tower {tower}: model.safetensors cannot be read" in err and "damaged" in err
    assert not out.exists()


def test_pickle_tower_needs_allow_pickle(tmp_path, monkeypatch):
    from l2c_llava.errors import InputError
    from l2c_llava.models.vision import load_vision_tower

    tower = _tiny_tower(tmp_path / "tower", safe=False)
    assert (tower / "pytorch_model.bin").is_file() and not list(tower.glob("*.safetensors"))
    with pytest.raises(InputError, match=r"pytorch_model.bin \(a pickle.*--allow-pickle"):
        load_vision_tower(str(tower))
    calls, real_load = [], torch.load
    monkeypatch.setattr(
        torch, "load", lambda *a, **k: calls.append(k.get("weights_only")) or real_load(*a, **k)
    )
    loaded = load_vision_tower(str(tower), allow_pickle=True)
    assert loaded.config.hidden_size == 16 and calls and all(w is True for w in calls)  # weights_only=True


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
    from l2c_llava.train.checkpoints import Checkpoints
    from l2c_llava.train.schedule import make_scheduler

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = make_scheduler(opt, "constant", 10, 0, None)
    ck = Checkpoints(tmp_path, keep=3)
    own = lambda: {k: v.detach().clone() for k, v in model.state_dict().items()}  # noqa: E731

    class Acc:
        is_main_process = True

        def wait_for_everyone(self):
            pass

    for step in (1, 2):
        with torch.no_grad():
            model.weight.fill_(step)
        ck.save_state(Acc(), step, own, opt, sched, wrapped=model, model=model)
    latest = tmp_path / "checkpoints" / "step-0000002"
    (latest / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad")
    with caplog.at_level(logging.WARNING, logger="l2c_llava.train.checkpoints"):
        step = ck.load_state(Acc(), own, opt, sched, wrapped=model, model=model)
    assert step == 1 and float(model.weight.detach()[0, 0]) == 1.0
    assert "step-0000002 cannot be read" in caplog.text and "resuming from" in caplog.text
    assert (tmp_path / "checkpoints" / "damaged-step-0000002" / "model.safetensors").is_file()  # kept
    assert [p.name for p in ck.all()] == ["step-0000001"]


# -- output folders --------------------------------------------------------------------------------


def test_search_index_into_the_photo_folder_leaves_the_photos(tmp_path, capsys):
    photos = _photos(tmp_path / "photos", 4)
    before = _tree(photos)
    code = main(
        [
            "search",
            "index",
            "--images",
            str(photos),
            "--encoder",
            str(tmp_path / "no-encoder"),
            "--out",
            str(photos),
        ]
    )
    assert code == 2 and "is the image folder" in capsys.readouterr().err
    other = _photos(tmp_path / "other", 1)
    code = main(
        [
            "search",
            "index",
            "--images",
            str(photos),
            "--encoder",
            str(tmp_path / "no-encoder"),
            "--out",
            str(other),
        ]
    )
    assert (
        code == 2
        and "is not empty (p0.jpg) and is not a previous search index output" in capsys.readouterr().err
    )
    assert _tree(photos) == before and (other / "p0.jpg").is_file()


def test_mllm_build_refuses_a_folder_with_the_users_files_before_loading(tmp_path, capsys):
    out = tmp_path / "work"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "data.jsonl").write_text("{}\n")
    code = main(["mllm", "build", "--vision", str(tmp_path / "none"), "--llm", "none", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "not empty (data.jsonl, notes.txt)" in err and "--overwrite" in err
    assert _tree(out) == {"data.jsonl": b"{}\n", "notes.txt": b"mine"}


def test_publish_replaces_its_own_output_only(tmp_path):
    out = tmp_path / "out"

    def build(text):
        return lambda tmp: (tmp / "a.txt").write_text(text)

    l2c_io.publish_folder(out, build("1"), "demo")
    l2c_io.publish_folder(out, build("2"), "demo")  # a previous output of the same kind: replaced
    assert (out / "a.txt").read_text() == "2"
    with pytest.raises(OutputError, match="holds a 'demo' output, not a 'other' one"):
        l2c_io.publish_folder(out, build("3"), "other")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"holds files it did not write \(notes.txt\)"):
        l2c_io.publish_folder(out, build("3"), "demo")
    assert (out / "notes.txt").read_text() == "mine" and (out / "a.txt").read_text() == "2"
    l2c_io.publish_folder(out, build("4"), "demo", overwrite=True)  # the user said so
    assert (out / "a.txt").read_text() == "4" and not (out / "notes.txt").exists()


def test_output_folder_that_is_a_file_or_not_writable(tmp_path, monkeypatch):
    f = tmp_path / "taken"
    f.write_text("mine")
    with pytest.raises(OutputError, match="is an existing file"):
        l2c_io.check_output_folder(f, "demo")
    with pytest.raises(OutputError, match="is an existing file"):
        with run_lock(f / "run"):
            pass
    assert f.read_text() == "mine"
    monkeypatch.setattr(
        l2c_io.os, "access", lambda *a: False
    )  # root ignores modes: simulate a read-only place
    with pytest.raises(OutputError, match="no permission to write"):
        l2c_io.check_output_folder(tmp_path / "new", "demo")
    monkeypatch.undo()

    def denied(self, *a, **k):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", denied)
    with pytest.raises(OutputError, match="no permission to create it"):
        l2c_io.ensure_folder(tmp_path / "x" / "y", "run")


def test_data_filter_missing_out_folder_is_refused_before_scoring(tmp_path, capsys):
    f = tmp_path / "pairs.jsonl"
    f.write_text(json.dumps({"image": "a.jpg", "short": "s", "long": "l"}) + "\n")
    out = tmp_path / "missing" / "kept.jsonl"
    code = main(
        [
            "data",
            "filter",
            str(f),
            "--format",
            "pairs",
            "--image-root",
            str(tmp_path),
            "--model",
            str(tmp_path / "no-model"),
            "--out",
            str(out),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and f"the folder {out.parent} does not exist" in err and "mkdir -p" in err


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_killed_publish_temp_folder_is_cleaned_next_run(tmp_path, caplog):
    out = tmp_path / "llava"
    left = tmp_path / (l2c_io._tmp_prefix(tmp_path / "llava", _dead_pid()) + "abc123")
    (left / "sub").mkdir(parents=True)
    (left / "sub" / "model.safetensors").write_bytes(b"0" * 1000)
    live = tmp_path / (l2c_io._tmp_prefix(out) + "live")  # a publish still running (this process)
    live.mkdir()
    mine = tmp_path / ".llava.notes"  # a hidden sibling the toolkit did not write
    mine.write_text("keep")
    with caplog.at_level(logging.WARNING):
        l2c_io.publish_folder(out, lambda tmp: (tmp / "config.json").write_text("{}"), "llava model")
    assert (
        not left.exists() and live.is_dir() and mine.read_text() == "keep" and (out / "config.json").is_file()
    )
    assert "left by an interrupted earlier run" in caplog.text
    # killed between the two renames of a replace: the previous output is put back, not removed
    old = tmp_path / (l2c_io._tmp_prefix(out, _dead_pid()) + "old")
    out.rename(old)
    assert l2c_io.clean_interrupted(out) == [] and (out / "config.json").is_file()


def test_files_and_folders_follow_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        l2c_io._UMASK = None
        f = l2c_io.atomic_write_text(tmp_path / "a.json", "{}")
        out = l2c_io.publish_folder(tmp_path / "out", lambda tmp: (tmp / "x.txt").write_text("x"), "demo")
        assert f.stat().st_mode & 0o777 == 0o644
        assert (
            out.stat().st_mode & 0o777 == 0o755
            and (out / l2c_io.OUTPUT_MARKER).stat().st_mode & 0o777 == 0o644
        )
        os.umask(0o027)
        l2c_io._UMASK = None
        g = l2c_io.atomic_write_text(tmp_path / "b.json", "{}")
        assert g.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(previous)
        l2c_io._UMASK = None


# -- YAML ------------------------------------------------------------------------------------------


def test_yaml_alias_bomb_in_validate_finishes(tmp_path, capsys):
    lines = ["recipe: stage1", 'a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    lines.append("run:\n  output_dir: *a9")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    t0 = time.perf_counter()
    assert main(["validate", str(bomb)]) == 2
    assert time.perf_counter() - t0 < 10  # it was past 60 s at 9 levels
    err = capsys.readouterr().err
    assert "run.output_dir = [[[[" in err and "Input should be a valid string" in err
    assert max(len(line) for line in err.splitlines()) < 400


# -- one writer per run folder ---------------------------------------------------------------------

HOLD = """
import sys, time
from l2c_llava.io import run_lock
with run_lock(sys.argv[1], "stage-2 run"):
    print("held", flush=True)
    time.sleep(60)
"""


def _holder(folder: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True, env=env
    )
    assert p.stdout.readline().strip() == "held"
    return p


def test_second_run_in_a_folder_stops_at_once_with_the_holders_pid(tmp_path, capsys):
    run = tmp_path / "run"
    p = _holder(run)
    try:
        t0 = time.perf_counter()
        with pytest.raises(CannotRunError) as e:
            with run_lock(run, "stage-2 run"):
                pass
        assert time.perf_counter() - t0 < 5
        assert f"{run} is in use by another stage-2 run: PID {p.pid}" in str(e.value) and "-c" in str(e.value)
        code = main(
            ["stage2", "train", "--config", str(ROOT / "stage2/configs/quick.yaml"), f"run.output_dir={run}"]
        )
        err = capsys.readouterr().err
        assert code == 2 and f"PID {p.pid}" in err
        code = main(
            ["pipeline", "--config", str(ROOT / "pipeline/configs/quick.yaml"), f"run.output_dir={run}"]
        )
        err = capsys.readouterr().err
        assert code == 2 and f"{run} is in use by another stage-2 run: PID {p.pid}" in err
        with run_lock(run / "stage1"):  # a sub-folder has its own lock: the pipeline's children run
            pass
    finally:
        p.kill()
        p.wait()
    assert json.loads((run / HOLDER_NAME).read_text())["pid"] == p.pid  # left by the killed holder
    with run_lock(run, "stage-2 run"):  # a dead holder's lock is taken over
        assert json.loads((run / HOLDER_NAME).read_text())["pid"] == os.getpid()
    assert not (run / HOLDER_NAME).exists()


# -- data synth: the user's folders, one writer, content checked -----------------------------------

TINY = ["--images", "6", "--seed", "1", "--size", "32", "--workers", "1", "--quiet"]


def _synth(out: Path, *extra: str) -> int:
    return main(["data", "synth", "--out", str(out), *TINY, *extra])


def test_synth_keeps_the_users_partial_and_old_folders(tmp_path, capsys):
    out = tmp_path / "d"
    for name in ("d.partial", "d.old"):  # the user's own folders, named as the old temporaries were
        (tmp_path / name).mkdir()
        (tmp_path / name / "mine.txt").write_text(name)
    assert _synth(out) == 0
    assert main(["data", "synth", "--out", str(out), *TINY[:-1], "--images", "7", "--overwrite"]) == 0
    assert (tmp_path / "d.partial" / "mine.txt").read_text() == "d.partial"
    assert (tmp_path / "d.old" / "mine.txt").read_text() == "d.old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "d.old", "d.partial"]  # nothing left over
    assert json.loads((out / "manifest.json").read_text())["options"]["images"] == 7


def test_synth_overwrite_replaces_only_its_own_dataset(tmp_path, capsys):
    mine = tmp_path / "photos"
    _photos(mine, 2)
    before = _tree(mine)
    assert _synth(mine, "--overwrite") == 2
    err = capsys.readouterr().err
    assert "holds no dataset written by `l2c data synth`" in err and "--overwrite or not" in err
    assert _tree(mine) == before
    out = tmp_path / "d"
    assert _synth(out) == 0
    (out / "notes.txt").write_text("mine")
    assert main(["data", "synth", "--out", str(out), *TINY, "--images", "8", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "holds files it did not write (notes.txt)" in err
    assert (out / "notes.txt").read_text() == "mine"
    from l2c_llava.cli.data import COMMANDS as DATA

    over = next(kw for flags, kw in DATA["data synth"].options if flags == ("--overwrite",))
    assert "a folder of anything else is never replaced" in over["help"]


def test_synth_damaged_dataset_is_not_nothing_to_do(tmp_path, capsys, caplog):
    from l2c_llava.data.synthetic import dataset_problems

    out = tmp_path / "d"
    assert _synth(out) == 0
    good = _tree(out)
    image = next(iter(sorted((out / "images").rglob("*.jpg"))))
    image.unlink()
    (out / "llava" / "pretrain.json").write_text("")
    capsys.readouterr()
    with caplog.at_level(logging.WARNING):
        assert _synth(out) == 0
    assert "nothing to do" not in capsys.readouterr().out
    assert "does not match what its manifest recorded" in caplog.text and "missing" in caplog.text
    assert _tree(out) == good
    # one byte changed in place, same size: found by the hashes, generated again
    data = bytearray(image.read_bytes())
    data[len(data) // 2] ^= 0xFF
    image.write_bytes(bytes(data))
    manifest = json.loads((out / "manifest.json").read_text())
    assert "1 file(s) changed" in dataset_problems(out, manifest)[0]
    assert _synth(out) == 0 and _tree(out) == good
    assert _synth(out) == 0 and "nothing to do" in capsys.readouterr().out


SLOW_SYNTH = """
import sys, time
import l2c_llava.data.synthetic as S
from l2c_llava.cli import main
real = S.render_scene
def slow(*a, **k):  # the first image takes seconds: a second writer comes while this one builds
    if not getattr(slow, "done", False):
        slow.done = True
        print("building", flush=True)
        time.sleep(4)
    return real(*a, **k)
S.render_scene = slow
sys.exit(main(["data", "synth", "--out", sys.argv[1], *sys.argv[2:]]))
"""


def test_two_synth_writers_into_one_folder(tmp_path, capsys):
    out = tmp_path / "d"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    first = subprocess.Popen(
        [sys.executable, "-c", SLOW_SYNTH, str(out), *TINY], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert first.stdout.readline().strip() == "building"
        assert _synth(out) == 2  # the second writer stops at once
        err = capsys.readouterr().err
        assert f"{out} is in use by another data synth: PID {first.pid}" in err
    finally:
        assert first.wait(timeout=60) == 0
    from l2c_llava.data.synthetic import dataset_problems

    manifest = json.loads((out / "manifest.json").read_text())
    assert (
        dataset_problems(out, manifest) == []
        and len([p for p in (out / "images").rglob("*.jpg") if "hard" not in p.parts]) == 6
    )  # hard/: the hard set
    assert _synth(out) == 0 and "nothing to do" in capsys.readouterr().out


# -- checkpoints verified by content ---------------------------------------------------------------


class _Acc:
    is_main_process = True

    def wait_for_everyone(self):
        pass


def _checkpointed_model(tmp_path: Path, steps, keep: int = 3, value=None):
    from l2c_llava.train.checkpoints import Checkpoints
    from l2c_llava.train.schedule import make_scheduler

    model = torch.nn.Linear(64, 64)
    opt = torch.optim.AdamW(model.parameters())
    sched = make_scheduler(opt, "constant", 10, 0, None)
    ck = Checkpoints(tmp_path, keep=keep)

    def own():
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    for step in steps:
        with torch.no_grad():
            model.weight.fill_(step if value is None else value(step))
        ck.save_state(_Acc(), step, own, opt, sched, wrapped=model, model=model)
    return model, opt, sched, ck, own


def _overwrite(f: Path, at: int, data: bytes) -> None:
    size = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.seek(at)
        fh.write(data)
    assert f.stat().st_size == size  # in place, same size


def test_checkpoint_damaged_in_place_at_its_size_is_not_resumed_from(tmp_path, caplog):
    model, opt, sched, ck, own = _checkpointed_model(tmp_path, (1, 2))
    latest = tmp_path / "checkpoints" / "step-0000002"
    weights = latest / "model.safetensors"
    _overwrite(weights, weights.stat().st_size - 4096, b"\xff" * 4096)  # NaN bytes over the data
    with caplog.at_level(logging.WARNING, logger="l2c_llava.train.checkpoints"):
        step = ck.load_state(_Acc(), own, opt, sched, wrapped=model, model=model)
    w = model.weight.detach()
    assert step == 1 and torch.isfinite(w).all() and float(w[0, 0]) == 1.0
    assert "model.safetensors changed since it was written" in caplog.text
    assert (tmp_path / "checkpoints" / "damaged-step-0000002").is_dir()
    # a zeroed stretch of the trainer state is found too
    ck.save_state(_Acc(), 3, own, opt, sched, wrapped=model, model=model)
    state = tmp_path / "checkpoints" / "step-0000003" / "trainer_state.pt"
    _overwrite(state, state.stat().st_size // 2, b"\0" * 64)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="l2c_llava.train.checkpoints"):
        assert ck.load_state(_Acc(), own, opt, sched, wrapped=model, model=model) == 1
    assert "trainer_state.pt changed since it was written" in caplog.text


def test_rotation_keeps_the_last_checkpoint_with_finite_weights(tmp_path, caplog):
    from l2c_llava.train.checkpoints import CHECKPOINT_SUMS

    with caplog.at_level(logging.ERROR, logger="l2c_llava.train.checkpoints"):
        model, opt, sched, ck, own = _checkpointed_model(
            tmp_path, (1, 2, 3, 4), keep=2, value=lambda s: 1.0 if s < 3 else float("nan")
        )
    assert [p.name for p in ck.all()] == ["step-0000002", "step-0000003", "step-0000004"]
    assert "holds non-finite weights" in caplog.text
    record = json.loads((tmp_path / "checkpoints" / "step-0000002" / CHECKPOINT_SUMS).read_text())
    assert record["finite"] and set(record["files"]) == {"model.safetensors", "trainer_state.pt"}
    assert (
        ck.load_state(_Acc(), own, opt, sched, wrapped=model, model=model) == 2
        and torch.isfinite(model.weight.detach()).all()
    )


def test_checkpoint_without_hashes_is_still_accepted(tmp_path, caplog):
    from l2c_llava.train.checkpoints import CHECKPOINT_SUMS

    model, opt, sched, ck, own = _checkpointed_model(tmp_path, (1, 2))
    for p in (tmp_path / "checkpoints").glob("step-*"):
        (p / CHECKPOINT_SUMS).unlink()  # as an older version wrote them
    with caplog.at_level(logging.INFO, logger="l2c_llava.train.checkpoints"):
        assert ck.load_state(_Acc(), own, opt, sched, wrapped=model, model=model) == 2
    assert f"has no {CHECKPOINT_SUMS}" in caplog.text


# -- the pipeline checks a step's outputs before skipping it ---------------------------------------


def test_pipeline_reruns_a_step_whose_exported_weights_were_cut_short(tmp_path):
    from safetensors.torch import save_file

    from l2c_llava.pipeline import load_pipeline

    quick = str(ROOT / "pipeline" / "configs" / "quick.yaml")
    out = tmp_path / "p"
    pipe = load_pipeline(quick, [f"run.output_dir={out}"])
    weights = pipe.run_folder.export("vision") / "model.safetensors"
    weights.parent.mkdir(parents=True)
    save_file({"w": torch.ones(256, 256)}, str(weights))
    data = out / "data"
    assert _synth(data) == 0
    steps = {}
    for s in pipe.steps:
        s.done_marker.parent.mkdir(parents=True, exist_ok=True)
        if s.done_marker.suffix == ".safetensors":  # stage 2's model
            save_file({"w": torch.zeros(2)}, str(s.done_marker))
        elif not s.done_marker.exists():
            s.done_marker.touch()
        steps[s.name] = {"fingerprint": s.fingerprint, "status": "done", "outputs": pipe.record_outputs(s)}
    assert steps["export"]["outputs"] == {
        "export/vision/model.safetensors": {
            "bytes": weights.stat().st_size,
            "sha256": l2c_io.sha256_file(weights),
        }
    }
    l2c_io.atomic_write_json(out / "pipeline" / "state.json", {"steps": steps})

    def plan() -> dict[str, str]:
        return load_pipeline(quick, [f"run.output_dir={out}"]).run(dry_run=True, echo=lambda *_: None)

    assert set(plan().values()) == {"skip"}
    full = weights.read_bytes()
    weights.write_bytes(full[: len(full) // 2])  # truncated
    again = load_pipeline(quick, [f"run.output_dir={out}"])
    decided = again.run(dry_run=True, echo=lambda *_: None)
    assert decided["export"] == "resume" and {d for s, d in decided.items() if s != "export"} == {"skip"}
    assert "cut short" in again.damaged["export"] or "bytes" in again.damaged["export"]
    # same size, one byte changed: the recorded sha256 finds it
    weights.write_bytes(full[:-1] + bytes([full[-1] ^ 1]))
    again = load_pipeline(quick, [f"run.output_dir={out}"])
    assert again.run(dry_run=True, echo=lambda *_: None)["export"] == "resume"
    assert "sha256 differs" in again.damaged["export"]
    # the step runs again and its new weights are recorded; a step that leaves a file cut short fails
    export = next(s for s in again.steps if s.name == "export")
    export.func = lambda: weights.write_bytes(full)
    lines = []
    ran = again._run_plan(
        [(export, "resume")], json.loads((out / "pipeline" / "state.json").read_text()), lines.append
    )
    assert ran == {"export": "resume"} and any("its outputs changed since it finished" in x for x in lines)
    assert set(plan().values()) == {"skip"}
    export.func = lambda: weights.write_bytes(full[:100])
    with pytest.raises(L2CError, match="finished, but .*model.safetensors: .*cut short or damaged"):
        again._run_plan(
            [(export, "resume")], json.loads((out / "pipeline" / "state.json").read_text()), lines.append
        )
    # the dataset step: the data's own SHA256SUMS
    assert plan()["export"] == "resume"  # left unfinished: it runs again next time
    (data / "llava" / "pretrain.json").write_text("")
    again = load_pipeline(quick, [f"run.output_dir={out}"])
    assert again.run(dry_run=True, echo=lambda *_: None)["data"] == "resume"
    assert "llava/pretrain.json" in again.damaged["data"] or "bytes" in again.damaged["data"]


# -- system errors and damaged files: exit 2 with the file and what to do, never a traceback -------

FULL_DISK = """
import errno, resource, signal, sys
from pathlib import Path
import torch
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
from l2c_llava.cli import main, os_error_message
from l2c_llava.train.checkpoints import Checkpoints
from l2c_llava.train.schedule import make_scheduler
out = Path(sys.argv[1])
small = torch.nn.Linear(4, 4)
opt = torch.optim.AdamW(small.parameters())
ck = Checkpoints(out / "run", keep=3)
ck.save(1, lambda d: torch.save({}, d / "w.pt"), opt, make_scheduler(opt, "constant", 10, 0, None))
resource.setrlimit(resource.RLIMIT_FSIZE, (3000, 3000))
code = main(["data", "synth", "--out", str(out / "d"), "--images", "6", "--size", "64", "--workers", "1", "--quiet"])
big = torch.nn.Linear(64, 64)
opt = torch.optim.AdamW(big.parameters())
try:
    ck.save_state(type("A", (), {"is_main_process": True, "wait_for_everyone": lambda self: None})(), 2,
                  lambda: dict(big.state_dict()), opt, make_scheduler(opt, "constant", 10, 0, None),
                  wrapped=big, model=big)
except OSError as e:
    print("checkpoint:", e.errno == errno.EFBIG, os_error_message(e), file=sys.stderr)
sys.exit(code)
"""


def test_full_disk_ends_in_a_message_and_keeps_what_was_there(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(tmp_path)], capture_output=True, text=True, env=env, timeout=120
    )
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    synth = next(line for line in p.stderr.splitlines() if line.startswith("l2c data synth:"))
    assert "File too large" in synth and "ulimit -f" in synth and str(tmp_path) in synth
    assert "checkpoint: True" in p.stderr and ".step-0000002.tmp" in p.stderr  # names the folder written
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-0000001"]  # intact, nothing half-written
    assert not [p for p in tmp_path.iterdir() if ".l2c-tmp-" in p.name]  # the work folder is removed


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder no one can write into, root included: a read-only bind mount (EROFS), else an
    immutable attribute (EPERM)."""
    import shutil

    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "inside").mkdir()
    if shutil.which("mount"):
        ok = subprocess.run(["mount", "--bind", str(ro), str(ro)], capture_output=True).returncode == 0
        if (
            ok
            and subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)], capture_output=True).returncode
            == 0
        ):
            yield ro
            subprocess.run(["umount", str(ro)], check=True)
            return
        if ok:
            subprocess.run(["umount", str(ro)], check=True)
    if (
        shutil.which("chattr")
        and subprocess.run(["chattr", "+i", str(ro)], capture_output=True).returncode == 0
    ):
        yield ro
        subprocess.run(["chattr", "-i", str(ro)], check=True)
        return
    pytest.skip(
        "no read-only bind mount (mount needs CAP_SYS_ADMIN) and no chattr +i here; root writes anywhere"
    )


def test_read_only_and_not_a_folder_outputs_end_in_a_message(read_only_dir, tmp_path, capsys):
    for out in (read_only_dir / "d", read_only_dir / "inside" / "d"):
        assert _synth(out) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(out) in err
        assert any(w in err for w in ("read-only", "not permitted", "no permission")), err
    f = tmp_path / "file"
    f.write_text("mine")
    assert _synth(f / "d") == 2
    err = capsys.readouterr().err
    assert "is an existing file" in err and f.read_text() == "mine"
    # the same, past the CLI's own checks: the system's error, named and explained in one line
    import l2c_llava.cli as cli

    err_of = {}
    for code, name in ((errno_.EROFS, "read-only"), (errno_.EBUSY, "busy"), (errno_.ENOSPC, "disk is full")):
        bad = OSError(code, os.strerror(code), str(read_only_dir / "x.bin"))
        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(
                cli.COMMANDS,
                "ls",
                replace(cli.COMMANDS["ls"], run=lambda args, e=bad: (_ for _ in ()).throw(e)),
            )
            assert main(["ls"]) == 2
        err_of[name] = capsys.readouterr().err
        assert (
            f"l2c ls: {read_only_dir / 'x.bin'}: {os.strerror(code)}: " in err_of[name]
            and name in err_of[name]
        )


def test_damaged_run_config_on_resume_is_named(tmp_path):
    from l2c_llava.config import load_config
    from l2c_llava.train.resume import check_resume_config

    run = tmp_path / "run"
    (run / "checkpoints" / "step-0000001").mkdir(parents=True)
    (run / "checkpoints" / "step-0000001" / "trainer_state.pt").write_bytes(b"x")
    (run / "config.yaml").write_bytes(b"recipe: stage2\n\xff\xfe\x00[[[\n")
    cfg = load_config(str(ROOT / "stage2/configs/quick.yaml"), [f"run.output_dir={run}"])
    with pytest.raises(
        L2CError, match=r"config.yaml, the config this run's checkpoints were written under, is damaged"
    ):
        check_resume_config(run, cfg)
    (run / "config.yaml").write_text("- a list\n- not a mapping\n")
    with pytest.raises(L2CError, match="run.resume=false"):
        check_resume_config(run, cfg)


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_malicious_pickle_with_allow_pickle_is_refused_and_not_run(tmp_path, monkeypatch, capsys):
    import pickle

    tower = _tiny_tower(tmp_path / "tower", safe=False)
    (tower / "pytorch_model.bin").write_bytes(pickle.dumps({"w": _Boom()}))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "llava"
    code = main(
        [
            "mllm",
            "build",
            "--vision",
            str(tower),
            "--llm",
            "embedded:smollm2-135m-instruct",
            "--out",
            str(out),
            "--allow-pickle",
        ]
    )
    err = capsys.readouterr().err
    assert (
        code == 2
        and "pytorch_model.bin cannot be loaded as plain tensors" in err
        and "Nothing in it was run" in err
    )
    assert not (tmp_path / "PWNED").exists() and not out.exists()
    (tower / "pytorch_model.bin").write_bytes(b"\x80\x04garbage")  # a broken pickle
    assert (
        main(["mllm", "build", "--vision", str(tower), "--llm", "x", "--out", str(out), "--allow-pickle"])
        == 2
    )
    assert "cannot be loaded as plain tensors" in capsys.readouterr().err


def test_bad_paths_are_named_for_what_they_are(tmp_path, capsys):
    fifo = tmp_path / "img.jpg"
    os.mkfifo(fifo)
    row = {"conversations": [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "yo"}]}
    f = tmp_path / "llava.json"
    f.write_text(json.dumps([{"id": "1", "image": 5, **row}, {"id": "2", "image": "img.jpg", **row}]))
    assert main(["data", "check", str(f), "--format", "llava", "--image-root", str(tmp_path)]) == 2
    out = "".join(capsys.readouterr())
    assert "image path 5 is a number, not a string" in out and "image path is empty" not in out
    assert f"not a regular file (a pipe, socket or device): {fifo}" in out and "image not found" not in out
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "a.yaml").write_text("recipe: stage1\n")
    assert main(["validate", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "is a folder, not a YAML file" in err and "a.yaml" in err and "no such file" not in err


# -- modes -----------------------------------------------------------------------------------------


def test_weights_follow_the_umask(tmp_path):
    from safetensors.torch import save_file

    previous = os.umask(0o022)
    try:
        l2c_io._UMASK = None
        out = l2c_io.publish_folder(
            tmp_path / "out",
            lambda tmp: save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors")),
            "demo",
        )
        assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o644
        _, _, _, ck, _ = _checkpointed_model(tmp_path / "run", (1,))
        step = tmp_path / "run" / "checkpoints" / "step-0000001"
        assert {p.name: p.stat().st_mode & 0o777 for p in step.iterdir()} == dict.fromkeys(
            ["model.safetensors", "trainer_state.pt", "checkpoint_sha256.json"], 0o644
        )
        assert step.stat().st_mode & 0o777 == 0o755
        os.umask(0o027)
        l2c_io._UMASK = None
        out = l2c_io.publish_folder(
            tmp_path / "out2",
            lambda tmp: save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors")),
            "demo",
        )
        assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(previous)
        l2c_io._UMASK = None


def test_one_publish_at_a_time_into_an_output_folder(tmp_path):
    out = tmp_path / "index"
    seen = []

    def second(tmp):  # another publish into the same folder while this one builds
        with pytest.raises(CannotRunError, match=f"{out} is in use by another demo: PID {os.getpid()}"):
            l2c_io.publish_folder(out, lambda t: (t / "b.txt").write_text("b"), "demo")
        seen.append("refused")
        (tmp / "a.txt").write_text("a")

    l2c_io.publish_folder(out, second, "demo")
    assert seen == ["refused"] and (out / "a.txt").read_text() == "a" and not (out / "b.txt").exists()
    l2c_io.publish_folder(
        out, lambda t: (t / "c.txt").write_text("c"), "demo"
    )  # the lock file is no user file
    assert sorted(p.name for p in out.iterdir()) == [".l2c.lock", ".l2c_output.json", "c.txt"]
