from __future__ import annotations

import json
import subprocess
import sys

from l2c_llava.cli import main

from .conftest import ROOT


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "l2c_llava.cli", *args], capture_output=True, text=True, cwd=ROOT
    )


def test_help_lists_the_subcommands():
    out = run("--help")
    assert out.returncode == 0
    for cmd in ("ls", "validate", "data"):
        assert cmd in out.stdout
    data = run("data", "--help")
    assert "synth" in data.stdout and "check" in data.stdout


def test_ls_lists_every_shipped_config_with_a_line(capsys):
    assert main(["ls"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith("stage1/demo ") and "Demo" in line for line in lines)  # names, usable anywhere
    assert len(lines) == len(list(ROOT.glob("stage1/configs/*.yaml"))) + len(
        list(ROOT.glob("stage2/configs/*.yaml"))
    ) + len(list(ROOT.glob("mllm/configs/*.yaml"))) + len(list(ROOT.glob("pipeline/configs/*.yaml")))


def test_validate_good_and_bad_with_overrides(capsys):
    assert main(["validate", str(ROOT / "stage2/configs/demo.yaml"), "train.lr=3e-4", "--print"]) == 0
    out = capsys.readouterr()
    assert "lr: 0.0003" in out.out and "OK" in out.err
    code = main(["validate", str(ROOT / "stage2/configs/demo.yaml"), "train.lr=-3", "vision.trainable=some"])
    err = capsys.readouterr().err
    assert code == 2
    assert (
        "2 problems" in err
        and "override 'train.lr=-3': train.lr = -3" in err
        and "vision.trainable = 'some'" in err
    )


def test_data_synth_then_check(tmp_path, capsys):
    out = tmp_path / "d"
    assert (
        main(
            ["data", "synth", "--out", str(out), "--images", "8", "--size", "64", "--workers", "1", "--quiet"]
        )
        == 0
    )
    stats = capsys.readouterr().out
    assert "wrote 8 images" in stats
    assert main(["data", "synth", "--out", str(out), "--images", "8", "--size", "64", "--quiet"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert main(["data", "synth", "--out", str(out), "--images", "9", "--size", "64", "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (
        main(
            [
                "data",
                "check",
                str(out / "llava/instruct.json"),
                "--format",
                "llava",
                "--image-root",
                str(out / "images"),
            ]
        )
        == 0
    )
    # break one row: the checker lists it by row and exits 2
    rows = json.loads((out / "llava/pretrain.json").read_text())
    rows[1]["image"] = "../../escape.jpg"
    (out / "llava/pretrain.json").write_text(json.dumps(rows))
    code = main(
        [
            "data",
            "check",
            str(out / "llava/pretrain.json"),
            "--format",
            "llava",
            "--image-root",
            str(out / "images"),
        ]
    )
    res = capsys.readouterr()
    assert code == 2 and "item 1: image path '../../escape.jpg' escapes the image root" in res.out
    assert f"{len(rows) - 1} good, 1 bad of {len(rows)}" in res.err


def test_console_script_is_installed():
    exe = __import__("shutil").which("l2c", path=str(ROOT / ".venv" / "bin")) or __import__("shutil").which(
        "l2c"
    )
    assert exe, "the `l2c` console script is installed by `pip install -e .`"
    out = subprocess.run([exe, "ls"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "stage2/demo " in out.stdout


def test_a_closed_pipe_ends_quietly():
    """`l2c ls | head -1`: the reader leaves early; the command stops with 141 (128 + SIGPIPE), no traceback."""
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "l2c_llava.cli", "ls", "--paths"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # the reader is gone before the command writes (it takes a second to start)
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141, err
    assert b"Traceback" not in err and b"BrokenPipeError" not in err, err.decode()


def test_a_command_leaves_the_process_group_it_ran_in(tmp_path):
    """Under a launcher a command ends by leaving its process group (torch asks for it; left to the
    interpreter's exit, a rank's communication threads can be torn down mid-flight)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert main(["ls"]) == 0
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
