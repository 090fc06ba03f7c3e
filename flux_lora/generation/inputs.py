"""The request's input images: opened safely, fitted to the output size, ready for a pipeline.

Beside the request rules (`request.py`): what a user sent becomes `Conditioning` here, before any
LoRA is fetched, so a bad image fails first and names its input.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from flux_lora.request import InputError, Request, fit_input_size

MAX_INPUT_PIXELS = 100_000_000  # a 100 MP photo decodes to 300 MB; larger inputs are refused before decoding


def open_image(path: str, field: str, mode: str = "RGB") -> Image.Image:
    """Read a user's image (EXIF orientation applied) or say which input is not an image."""
    limit = f"the largest accepted is {MAX_INPUT_PIXELS // 10**6} megapixels"
    try:
        with Image.open(path) as img:
            width, height = img.size  # read from the header: nothing is decoded yet
            if width * height > MAX_INPUT_PIXELS:
                raise InputError(field, f"is {width}x{height} pixels; {limit}")
            img.load()
            return ImageOps.exif_transpose(img).convert(mode)
    except Image.DecompressionBombError as exc:  # Pillow's own check fires first, above twice its MAX_IMAGE_PIXELS
        bomb = 2 * (Image.MAX_IMAGE_PIXELS or 0) // 10**6
        raise InputError(field, f"is over {bomb} megapixels; {limit}") from exc
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(field, "must be an image file (png, jpg, webp, ...); this one could not be read") from exc


@dataclass(frozen=True)
class Conditioning:
    """The input image and mask, resized to the output size the request resolves to."""

    width: int
    height: int
    image: Image.Image | None = None
    mask: Image.Image | None = None


def prepare_inputs(request: Request) -> Conditioning:
    """Output size and conditioning images: img2img/inpaint follow the input image's size."""
    if request.image is None:
        assert request.width and request.height
        return Conditioning(request.width, request.height)
    image = open_image(request.image, "image")
    width, height = fit_input_size(*image.size)
    image = image.resize((width, height), Image.Resampling.LANCZOS)
    mask = None
    if request.mask is not None:
        # Nearest-neighbour keeps a hard mask hard: white repaints, black keeps.
        mask = open_image(request.mask, "mask", mode="L").resize((width, height), Image.Resampling.NEAREST)
    return Conditioning(width, height, image, mask)
