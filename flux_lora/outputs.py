"""Images to files: `out-{i}.{ext}` in a fresh directory per prediction, so none overwrite another."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from PIL import Image

_PIL_FORMAT = {"webp": "WEBP", "jpg": "JPEG", "png": "PNG"}
PREFIX = "prediction-"


def save_images(images: list[Image.Image], output_format: str, quality: int, parent: Path | None = None) -> list[Path]:
    """Write the images; webp/jpg use `quality`, png is lossless (quality does not apply)."""
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    out_dir = Path(tempfile.mkdtemp(prefix=PREFIX, dir=parent))
    paths = []
    for i, image in enumerate(images):
        path = out_dir / f"out-{i}.{output_format}"
        options: dict[str, object] = {}
        if output_format in ("webp", "jpg"):
            options = {"quality": quality, "optimize": True}
        image.convert("RGB").save(path, format=_PIL_FORMAT[output_format], **options)
        paths.append(path)
    return paths


def prune_outputs(parent: Path, keep: int) -> int:
    """Remove all but the newest `keep` prediction directories under `parent`; returns how many went.

    cog reads a prediction's files after `run` returns (to upload them or inline them as data URIs)
    and never deletes them, so a long-running server would fill its disk; the newest few stay, which
    covers every prediction cog may still be reading.
    """
    dirs = sorted((p for p in parent.glob(PREFIX + "*") if p.is_dir()), key=lambda p: p.stat().st_mtime_ns)
    old = dirs[: max(0, len(dirs) - keep)]
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    return len(old)
