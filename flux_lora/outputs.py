"""Images to files: `out-{i}.{ext}` in a fresh directory per prediction, so none overwrite another."""

from __future__ import annotations

import tempfile
from pathlib import Path

from PIL import Image

_PIL_FORMAT = {"webp": "WEBP", "jpg": "JPEG", "png": "PNG"}


def save_images(images: list[Image.Image], output_format: str, quality: int, parent: Path | None = None) -> list[Path]:
    """Write the images; webp/jpg use `quality`, png is lossless (quality does not apply)."""
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    out_dir = Path(tempfile.mkdtemp(prefix="prediction-", dir=parent))
    paths = []
    for i, image in enumerate(images):
        path = out_dir / f"out-{i}.{output_format}"
        options: dict[str, object] = {}
        if output_format in ("webp", "jpg"):
            options = {"quality": quality, "optimize": True}
        image.convert("RGB").save(path, format=_PIL_FORMAT[output_format], **options)
        paths.append(path)
    return paths
