from __future__ import annotations

from pathlib import Path

import pytest

from l2c_llava.data.synthetic import SynthOptions, generate

ROOT = Path(__file__).resolve().parent.parent
SMALL = SynthOptions(images=60, seed=7, size=96)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """A small synthetic dataset, generated once per test session (read-only for tests)."""
    out = tmp_path_factory.mktemp("synth") / "data"
    generate(out, SMALL, workers=1, progress=False)
    return out
