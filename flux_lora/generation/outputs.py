"""Images to files: `out-{i}.{ext}` in a fresh directory per prediction, so none overwrite another.

Each file carries the parameters that made it (FLUX_LORA_OUTPUT_METADATA, on by default), the way
image tools read them: the `parameters` PNG text chunk of the A1111/Forge web UIs, and for JPEG and
WebP the same text in EXIF UserComment (where A1111 writes it) and in XMP dc:description. With the seed
that was drawn and the image's place in its batch, the file alone is enough to make the image again.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING
from xml.sax.saxutils import escape

from PIL import ExifTags, Image
from PIL.PngImagePlugin import PngInfo

from flux_lora import cancel
from flux_lora.errors import shorten
from flux_lora.request import Mode
from flux_lora.weights.refs import shown

if TYPE_CHECKING:
    from flux_lora.request import Request

_PIL_FORMAT = {"webp": "WEBP", "jpg": "JPEG", "png": "PNG"}
PREFIX = "prediction-"
PARAMETERS = "parameters"  # the PNG text key and the `Image.info` key the A1111/Forge web UIs use
_USER_COMMENT_UNICODE = b"UNICODE\x00"  # EXIF UserComment's character-code prefix (UTF-16, file byte order)
_XML_INVALID = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")  # control characters XML 1.0 cannot hold
JPEG_TEXT_LIMIT = 8000  # characters: UTF-16 in EXIF and UTF-8 in XMP stay under a JPEG segment's 64 KiB


def _quote(value: object) -> str:
    """A value as A1111 writes one into its `Key: value, ...` line: JSON-quoted only when it must be."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def _number(value: float) -> str:
    return f"{value:g}"


def parameters_text(request: Request, width: int, height: int, index: int) -> str:
    """Image `index` of a batch as A1111/Forge write it: the prompt, then one `Key: value, ...` line.

    FLUX guidance goes where Forge puts it (Distilled CFG Scale; FLUX runs without real CFG, so CFG
    scale 1); everything else uses our input names. LoRA references are redacted as in the logs (no
    query strings, tokens or credentials; a data: URI only by its length); input images never appear.
    """

    fields: dict[str, object] = {
        "Steps": request.num_inference_steps,
        "Sampler": "Euler",
        "Schedule type": "Simple",
        "CFG scale": 1,
        "Distilled CFG Scale": _number(request.guidance_scale),
        "Seed": request.seed,
        "Size": f"{width}x{height}",
        "Model": request.model,
        "Mode": request.mode.value,
        # Only img2img and inpainting have an input image for the prompt to overpower.
        **({} if request.mode is Mode.TXT2IMG else {"Prompt strength": _number(request.prompt_strength)}),
        "go_fast": request.go_fast,
        "Batch size": request.num_outputs,
        "Batch pos": index,
    }
    for lora in request.loras:
        fields[lora.label] = shorten(shown(lora.ref))
        fields[f"{lora.label} scale"] = _number(lora.scale)
    fields["Version"] = "flux-lora-cog"
    line = ", ".join(f"{key}: {_quote(value)}" for key, value in fields.items())
    return f"{request.prompt}\n{line}"


def label_batch(
    images: list[Image.Image], request: Request, width: int, height: int, batch: list[Image.Image] | None = None
) -> None:
    """Attach each image's parameters; its index is its place in the generated `batch` (the safety checker
    may have dropped some of it), so image k of a batch is reproducible from its file alone."""
    batch = images if batch is None else batch
    for image in images:
        index = next(i for i, generated in enumerate(batch) if generated is image)
        image.info[PARAMETERS] = parameters_text(request, width, height, index)


def _xmp(text: str) -> bytes:
    """An XMP packet holding `text` as dc:description (UTF-8, unlike EXIF's ASCII ImageDescription)."""
    return (
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:description><rdf:Alt>'
        f'<rdf:li xml:lang="x-default">{escape(_XML_INVALID.sub("", text))}</rdf:li>'
        "</rdf:Alt></dc:description></rdf:Description>"
        "</rdf:RDF></x:xmpmeta>"
    ).encode()


def _fit(text: str, limit: int) -> str:
    """`text` within `limit` characters, cutting the prompt rather than the parameters line after it."""
    if len(text) <= limit:
        return text
    prompt, _, line = text.rpartition("\n")
    return prompt[: max(0, limit - len(line) - 4)] + "...\n" + line


def _metadata_options(output_format: str, text: str) -> dict[str, object]:
    """The save() options that embed `text` in a file of this format."""
    if output_format == "png":
        info = PngInfo()
        info.add_text(PARAMETERS, text)  # tEXt when Latin-1, else iTXt (UTF-8)
        return {"pnginfo": info}
    if output_format == "jpg":  # EXIF and XMP each live in one 64 KiB JPEG segment
        text = _fit(text, JPEG_TEXT_LIMIT)
    exif = Image.Exif()  # big-endian ("MM"), so the UTF-16 below is big-endian as readers expect
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment] = _USER_COMMENT_UNICODE + text.encode("utf-16-be")
    return {"exif": exif, "xmp": _xmp(text)}


def save_images(images: list[Image.Image], output_format: str, quality: int, parent: Path | None = None) -> list[Path]:
    """Write the images; webp/jpg use `quality`, png is lossless (quality does not apply). Parameters
    attached by `label_batch` go into each file."""
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    out_dir = Path(tempfile.mkdtemp(prefix=PREFIX, dir=parent))
    paths = []
    try:
        for i, image in enumerate(images):
            cancel.check()
            path = out_dir / f"out-{i}.{output_format}"
            options: dict[str, object] = {}
            if output_format in ("webp", "jpg"):
                options = {"quality": quality, "optimize": True}
            text = image.info.get(PARAMETERS)
            if text is not None:
                options.update(_metadata_options(output_format, str(text)))
            image.convert("RGB").save(path, format=_PIL_FORMAT[output_format], **options)
            paths.append(path)
    except cancel.Cancelled:
        shutil.rmtree(out_dir, ignore_errors=True)  # a cancelled prediction leaves no half batch behind
        raise
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
