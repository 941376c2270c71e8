"""Shared small datasets for the synth tests (built once per session)."""
from __future__ import annotations

import pytest

from synth.generate import GenConfig
from synth.run import generate_dataset

SIZE = 80  # 4 mm voxels over the default 320 mm field of view: small and quick


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory):
    """All 15 lesion types once, 80^3, one worker."""
    out = tmp_path_factory.mktemp("synth") / "ds"
    cfg = GenConfig(size=(SIZE,) * 3, seed=3)
    rows = generate_dataset(out, 15, cfg, workers=1, progress=False)
    return out, rows, cfg
