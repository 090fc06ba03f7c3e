"""Prediction directories: cog never deletes the files a prediction returned, so the server prunes them."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from flux_lora.outputs import prune_outputs, save_images


def test_only_the_newest_prediction_directories_stay(tmp_path: Path) -> None:
    image = Image.new("RGB", (16, 16), (10, 20, 30))
    made = []
    for i in range(5):
        paths = save_images([image, image], "png", 80, parent=tmp_path)
        os.utime(paths[0].parent, ns=(i * 10**9, i * 10**9))  # creation order, whatever the clock's resolution
        made.append(paths[0].parent)
    (tmp_path / "not-ours").mkdir()
    assert prune_outputs(tmp_path, keep=2) == 3
    assert sorted(p for p in tmp_path.iterdir()) == sorted([*made[3:], tmp_path / "not-ours"])
    assert all(len(list(d.iterdir())) == 2 for d in made[3:])
    assert prune_outputs(tmp_path, keep=2) == 0
