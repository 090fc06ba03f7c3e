"""FLUX.1 dev and schnell, loaded once, sharing text encoders, tokenizers and VAE.

Six entry points (2 models x txt2img/img2img/inpaint) over two transformers: the img2img and
inpaint pipelines are built with `from_pipe`, which shares every component.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxImg2ImgPipeline,
    FluxInpaintPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
)
from PIL import Image, ImageOps, UnidentifiedImageError

from flux_lora.request import InputError, Mode, Request, fit_input_size
from flux_lora.store import DEV_DIR, SCHNELL_DIR

log = logging.getLogger(__name__)

def pick_device(preferred: str | None = None) -> tuple[torch.device, torch.dtype]:
    """CUDA in bf16 when present, else CPU in float32 (bf16 matmuls are slow on most CPUs)."""
    name = preferred or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    return device, torch.bfloat16 if device.type == "cuda" else torch.float32


@dataclass
class Pipelines:
    """The loaded models; `get(model, mode)` picks the entry point for a request."""

    text2img: dict[str, FluxPipeline]
    img2img: dict[str, FluxImg2ImgPipeline]
    inpaint: dict[str, FluxInpaintPipeline]
    device: torch.device
    dtype: torch.dtype

    @property
    def transformers(self) -> dict[str, FluxTransformer2DModel]:
        return {name: pipe.transformer for name, pipe in self.text2img.items()}

    def get(self, model: str, mode: Mode) -> DiffusionPipeline:
        table = {Mode.TXT2IMG: self.text2img, Mode.IMG2IMG: self.img2img, Mode.INPAINT: self.inpaint}[mode]
        return table[model]


def load_pipelines(store: Path, device: torch.device, dtype: torch.dtype) -> Pipelines:
    """Load dev from the store, then schnell's transformer and scheduler on top of dev's components."""
    start = time.perf_counter()
    dev = FluxPipeline.from_pretrained(store / DEV_DIR, dtype=dtype)
    schnell_transformer = FluxTransformer2DModel.from_pretrained(
        store / SCHNELL_DIR, subfolder="transformer", dtype=dtype
    )
    schnell_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(store / SCHNELL_DIR, subfolder="scheduler")
    schnell = FluxPipeline.from_pipe(dev, transformer=schnell_transformer, scheduler=schnell_scheduler, dtype=dtype)
    if device.type != "cpu":
        dev.to(device)
        schnell_transformer.to(device)
    for pipe in (dev, schnell):
        pipe.set_progress_bar_config(disable=True)
    text2img = {"dev": dev, "schnell": schnell}
    pipelines = Pipelines(
        text2img=text2img,
        img2img={name: FluxImg2ImgPipeline.from_pipe(pipe, dtype=dtype) for name, pipe in text2img.items()},
        inpaint={name: FluxInpaintPipeline.from_pipe(pipe, dtype=dtype) for name, pipe in text2img.items()},
        device=device,
        dtype=dtype,
    )
    for table in (pipelines.img2img, pipelines.inpaint):
        for pipe in table.values():
            pipe.set_progress_bar_config(disable=True)
    log.info("Loaded FLUX.1 dev and schnell on %s (%s) in %.1fs", device, dtype, time.perf_counter() - start)
    return pipelines


def open_image(path: str, field: str, mode: str = "RGB") -> Image.Image:
    """Read a user's image (EXIF orientation applied) or say which input is not an image."""
    try:
        with Image.open(path) as img:
            img.load()
            return ImageOps.exif_transpose(img).convert(mode)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
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


def generate(pipelines: Pipelines, request: Request, cond: Conditioning, **extra: object) -> list[Image.Image]:
    """Run one batch of `num_outputs` images; the CPU generator makes seeds portable across runs."""
    pipe = pipelines.get(request.model, request.mode)
    kwargs: dict[str, object] = dict(
        prompt=request.prompt,
        num_images_per_prompt=request.num_outputs,
        height=cond.height,
        width=cond.width,
        num_inference_steps=request.num_inference_steps,
        guidance_scale=request.guidance,
        max_sequence_length=request.max_sequence_length,
        generator=torch.Generator("cpu").manual_seed(request.seed),
        output_type="pil",
        **extra,
    )
    if request.mode is not Mode.TXT2IMG:
        kwargs.update(image=cond.image, strength=request.prompt_strength)
    if request.mode is Mode.INPAINT:
        kwargs["mask_image"] = cond.mask
    with torch.inference_mode():
        return list(pipe(**kwargs).images)
