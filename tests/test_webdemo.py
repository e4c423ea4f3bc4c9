"""``l2c demo`` (issue 19): two tiny random LLaVAs behind the Gradio page on 127.0.0.1, driven by a
headless Chromium (Playwright): the page loads, an image is picked, a question asked, both answers
arrive under their encoders' names (each the model's own greedy answer), and a screenshot of the page
is saved in the run folder. The search tab is checked the same way with two tiny CLIPs."""

from __future__ import annotations

import importlib.util
import os
import shutil
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gradio") is None, reason="gradio not installed")


def chromium() -> str | None:
    for p in (
        "/usr/lib/chromium/chromium",
        shutil.which("chromium") or "",
        shutil.which("chromium-browser") or "",
    ):
        if p and os.path.isfile(p):
            return p
    return None


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, synth_dir):
    """A demo-like run folder: two LLaVAs built on two different tiny towers, two tiny CLIPs."""
    from l2c_llava.mllm.build import build_llava, save_llava

    from .test_search import save_tiny_clip
    from .tiny_llm import save_tiny_llm
    from .tiny_models import tiny_vision

    run = tmp_path_factory.mktemp("demo") / "run"
    save_tiny_llm(run / "llm", "llama")
    for enc, seed in (("baseline", 0), ("llm2clip", 1)):
        import torch

        torch.manual_seed(seed)
        tower = run / f"tower-{enc}"
        tiny_vision().save_pretrained(tower)
        model, proc = build_llava(tower, SimpleNamespace(name_or_path=str(run / "llm")))
        save_llava(
            model,
            proc,
            run / "mllm" / enc / "finetune" / "model",
            {"template": "vicuna_v1", "image_aspect_ratio": "pad", "vision_tower": str(tower)},
        )
    save_tiny_clip(run / "clip" / "model", seed=0)
    save_tiny_clip(run / "llm2clip-clip", seed=1)
    shutil.copytree(synth_dir / "images", run / "data" / "images")
    return run


def test_the_command_says_when_there_is_nothing_to_show(tmp_path, capsys):
    from l2c_llava.cli import main

    assert main(["demo", "--run", str(tmp_path / "nothing")]) == 2
    assert "nothing to show" in capsys.readouterr().err


def test_default_setup_reads_the_run_layout(demo_run):
    from l2c_llava.webdemo import default_setup

    s = default_setup(demo_run)
    assert list(s.llavas) == ["LLaVA on baseline CLIP", "LLaVA on LLM2CLIP"]
    assert s.encoders == {"baseline CLIP": str(demo_run / "clip" / "model")}  # no export/llm2clip in this run
    assert s.images == str(demo_run / "data" / "images")


@pytest.mark.skipif(
    chromium() is None or importlib.util.find_spec("playwright") is None,
    reason="needs Chromium and playwright",
)
def test_both_llavas_answer_in_the_browser_and_search_shows_both_encoders(demo_run):
    import numpy as np
    from playwright.sync_api import sync_playwright

    from l2c_llava.data.images import load_rgb
    from l2c_llava.mllm.chat import LlavaChat
    from l2c_llava.webdemo import DemoBackend, default_setup, serve

    setup = default_setup(demo_run)
    setup.encoders["LLM2CLIP"] = str(demo_run / "llm2clip-clip")
    backend = DemoBackend(setup, max_new_tokens=6)
    received = []
    ask = backend.ask
    backend.ask = lambda image, q, n=None: (received.append(image), ask(image, q, n))[1]
    page_app, url = serve(backend, host="127.0.0.1", port=None, block=False)
    try:
        assert url.startswith("http://127.0.0.1:")
        question = "How many red circles are there?"
        picked = backend.picks()[0]
        want = [LlavaChat(f).answer(picked, question, 6) for f in setup.llavas.values()]
        shot = demo_run / "demo_screenshot.png"
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url, wait_until="networkidle")
            for title in backend.titles():  # the panels name the vision encoders
                assert page.get_by_label(title).count() == 1, title
            page.locator(".gallery-item, [data-testid='gallery-item'], button:has(img)").first.click()  # pick
            page.locator("#image img").first.wait_for(timeout=30000)  # the picked image is in the input
            page.wait_for_load_state("networkidle")
            page.locator("#question textarea").fill(question)
            page.locator("#ask").click()
            boxes = [page.locator(f"#answer-{i} textarea") for i in range(2)]
            page.wait_for_function(
                "() => [0, 1].every(i => document.querySelector(`#answer-${i} textarea`).value !== '')",
                timeout=60000,
            )
            got = [b.input_value() for b in boxes]
            page.screenshot(path=str(shot), full_page=True)
            assert received and received[-1] is not None  # the page sent the picked image
            assert np.array_equal(
                np.asarray(load_rgb(received[-1])), np.asarray(load_rgb(picked))
            )  # lossless
            assert got == want  # each panel is its own model's answer to the picked image
            page.get_by_role("tab", name="Search").click()
            page.locator("#query textarea").fill("two blue squares")
            page.locator("#search").click()
            page.wait_for_function(
                "() => [0, 1].every(i => document.querySelectorAll(`#hits-${i} img`).length > 0)",
                timeout=120000,
            )
            page.wait_for_function(
                "() => [...document.querySelectorAll('[id^=hits-] img')].every(i => i.complete "
                "&& i.naturalWidth > 0)",
                timeout=60000,
            )
            page.screenshot(path=str(demo_run / "demo_search_screenshot.png"), full_page=True)
            browser.close()
        assert shot.stat().st_size > 10_000
        hits = backend.search("two blue squares", 6)
        assert len(hits) == 2 and all(len(h) == 6 for h in hits) and hits[0] != hits[1]
    finally:
        page_app.close()
