"""The validated prediction request and its sizing rules. Pure Python: no torch, no PIL.

Everything here is a rule a user can read off Replicate's model page (aspect ratios, megapixels,
custom sizes rounded to 16, input images fitted into 1440x1440), so it is tested in milliseconds.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple

from flux_lora.errors import UserError

# Width x height at 1 megapixel, as Replicate's FLUX models define them.
ASPECT_RATIOS: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "16:9": (1344, 768),
    "21:9": (1536, 640),
    "3:2": (1216, 832),
    "2:3": (832, 1216),
    "4:5": (896, 1088),
    "5:4": (1088, 896),
    "3:4": (896, 1152),
    "4:3": (1152, 896),
    "9:16": (768, 1344),
    "9:21": (640, 1536),
}
CUSTOM = "custom"
MEGAPIXELS = ("1", "0.25")
MODELS = ("dev", "schnell")
OUTPUT_FORMATS = ("webp", "jpg", "png")
MIN_SIDE, MAX_SIDE = 256, 1440
MAX_INPUT_SIDE = 1440  # img2img/inpaint inputs are scaled down to fit this square
MULTIPLE = 16  # FLUX packs 2x2 latent patches of an 8x downsampling VAE
MAX_SEED = 2**31 - 1  # random seeds are drawn up to this
MAX_USER_SEED = 2**63 - 1  # torch.Generator.manual_seed takes no larger one
MAX_LORAS = 8  # hf_loras: LoRAs in one request (the packed adapter's rank budget is the other bound)
LORA_SCALE_RANGE = (-1.0, 3.0)  # lora_scale's bounds on the seed models' pages, for every LoRA scale


class InputError(UserError, ValueError):
    """A request the user must fix; the message names the field and what is allowed."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class Mode(StrEnum):
    TXT2IMG = "txt2img"
    IMG2IMG = "img2img"
    INPAINT = "inpaint"


def round_to_multiple(value: int, multiple: int = MULTIPLE) -> int:
    """Nearest multiple, halves rounded up (Replicate's "rounded to nearest multiple of 16")."""
    return max(multiple, int(value / multiple + 0.5) * multiple)


def size_for_aspect_ratio(aspect_ratio: str, megapixels: str = "1") -> tuple[int, int]:
    """Width and height for a named aspect ratio; 0.25 megapixels halves both sides."""
    if aspect_ratio not in ASPECT_RATIOS:
        allowed = ", ".join([*ASPECT_RATIOS, CUSTOM])
        raise InputError("aspect_ratio", f"must be one of {allowed}, got {aspect_ratio!r}")
    if megapixels not in MEGAPIXELS:
        raise InputError("megapixels", f"must be one of {', '.join(MEGAPIXELS)}, got {megapixels!r}")
    width, height = ASPECT_RATIOS[aspect_ratio]
    if megapixels == "0.25":
        width, height = width // 2, height // 2
    return width, height


def custom_size(width: int | None, height: int | None) -> tuple[int, int]:
    """A user-chosen size: both sides required, in bounds, rounded to a multiple of 16."""
    sides = {"width": width, "height": height}
    for name, value in sides.items():
        if value is None:
            raise InputError(
                name, f"is required when aspect_ratio is 'custom' (an integer from {MIN_SIDE} to {MAX_SIDE})"
            )
        if not MIN_SIDE <= value <= MAX_SIDE:
            raise InputError(name, f"must be between {MIN_SIDE} and {MAX_SIDE}, got {value}")
    return round_to_multiple(sides["width"]), round_to_multiple(sides["height"])


def fit_input_size(width: int, height: int, limit: int = MAX_INPUT_SIDE) -> tuple[int, int]:
    """Output size for img2img/inpaint: the input's size, scaled down to fit `limit`, floored to 16."""
    if width <= 0 or height <= 0:
        raise InputError("image", f"has an empty size {width}x{height}")
    scale = min(1.0, limit / width, limit / height)
    return (
        max(MULTIPLE, int(width * scale) // MULTIPLE * MULTIPLE),
        max(MULTIPLE, int(height * scale) // MULTIPLE * MULTIPLE),
    )


def resolve_seed(seed: int | None, rng: random.Random | None = None) -> int:
    """The seed to use: the user's, or a fresh 31-bit one when unset or negative (clients send -1 for
    "random", as Replicate accepts; the reference drew only 65,536)."""
    if seed is not None and seed >= 0:
        return seed
    return (rng or random.SystemRandom()).randint(0, MAX_SEED)


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA reference, the scale the user asked for (before any go_fast multiplier), and the input that
    named it (errors name it; the image's parameters label it)."""

    ref: str
    scale: float
    field: str = "replicate_weights"

    @property
    def label(self) -> str:
        """How the image's parameters name it: "Lora", "Extra lora", "Lora 2"..."""
        if self.field == "extra_lora":
            return "Extra lora"
        index = self.field.partition("[")[2].rstrip("]")
        return f"Lora {int(index) + 1}" if index.isdigit() else "Lora"


# The schema's "for go_fast we apply a 1.5x multiplier" makes up for the reference merging the LoRA into fp8
# weights, which weakens it. Here adapters stay unmerged in the compute dtype on top of the fp8 linears, so
# a LoRA is as strong with go_fast as without: the same scale gives the same strength, a multiplier of 1.
GO_FAST_SCALE = 1.0


def effective_scale(scale: float, go_fast: bool) -> float:
    """The strength the adapter runs at: the user's scale, under go_fast too (see GO_FAST_SCALE)."""
    return scale * GO_FAST_SCALE if go_fast else scale


class PipelineKey(NamedTuple):
    """Which transformer a request runs on: the model, plain or go_fast (fp8 + compile)."""

    model: str
    go_fast: bool = False

    def __str__(self) -> str:  # how logs name it
        return f"{self.model} (go_fast)" if self.go_fast else self.model


@dataclass(frozen=True)
class Request:
    """One prediction, with every default applied and every rule checked."""

    prompt: str
    mode: Mode
    width: int | None  # None for img2img/inpaint until the input image is read
    height: int | None
    image: str | None
    mask: str | None
    prompt_strength: float
    model: str
    num_outputs: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    output_format: str
    output_quality: int
    disable_safety_checker: bool
    go_fast: bool
    loras: tuple[LoraSpec, ...]  # in the order they are applied: main, extra (or the list's order)

    @property
    def key(self) -> PipelineKey:
        return PipelineKey(self.model, self.go_fast)

    @property
    def guidance(self) -> float:
        """schnell is guidance-distilled: it ignores guidance, so it runs with 0."""
        return 0.0 if self.model == "schnell" else self.guidance_scale

    @property
    def max_sequence_length(self) -> int:
        return 256 if self.model == "schnell" else 512


def _lora(ref: str | None, scale: float, field: str) -> tuple[LoraSpec, ...]:
    return (LoraSpec(ref.strip(), scale, field),) if ref and ref.strip() else ()


def _lora_list(refs: Sequence[str], scales: Sequence[float]) -> tuple[LoraSpec, ...]:
    """`hf_loras` with `lora_scales`: one scale per LoRA, or one for all of them, or none (1.0 each)."""
    if len(refs) > MAX_LORAS:
        raise InputError("hf_loras", f"takes at most {MAX_LORAS} LoRAs, got {len(refs)}")
    for index, ref in enumerate(refs):
        if not str(ref).strip():
            raise InputError(f"hf_loras[{index}]", "is empty: give a LoRA reference or remove the entry")
    if len(scales) > len(refs) or 1 < len(scales) < len(refs):
        raise InputError(
            "lora_scales",
            f"has {len(scales)} value(s) for {len(refs)} LoRA(s) in hf_loras: give one scale per LoRA, "
            "or one for all of them",
        )
    for index, scale in enumerate(scales):
        _bounded(f"lora_scales[{index}]", scale, *LORA_SCALE_RANGE)
    per_lora = list(scales) if len(scales) == len(refs) else [scales[0] if scales else 1.0] * len(refs)
    return tuple(
        LoraSpec(str(ref).strip(), scale, f"hf_loras[{index}]")
        for index, (ref, scale) in enumerate(zip(refs, per_lora, strict=True))
    )


def _choice(field: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise InputError(field, f"must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _bounded(field: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise InputError(field, f"must be between {low:g} and {high:g}, got {value:g}")


def build_request(
    *,
    prompt: str,
    image: str | None = None,
    mask: str | None = None,
    aspect_ratio: str = "1:1",
    height: int | None = None,
    width: int | None = None,
    prompt_strength: float = 0.8,
    model: str = "dev",
    num_outputs: int = 1,
    num_inference_steps: int = 28,
    guidance_scale: float = 3.0,
    seed: int | None = None,
    output_format: str = "webp",
    output_quality: int = 80,
    disable_safety_checker: bool = False,
    go_fast: bool = False,
    megapixels: str = "1",
    main_lora: str | None = None,
    lora_scale: float = 1.0,
    extra_lora: str | None = None,
    extra_lora_scale: float = 1.0,
    main_field: str = "replicate_weights",
    hf_loras: Sequence[str] = (),
    lora_scales: Sequence[float] = (),
) -> Request:
    """Apply Replicate's rules to raw inputs (already type-checked by cog's schema). An empty or
    blank prompt runs, as on Replicate (common for img2img and inpainting)."""
    _choice("model", model, MODELS)
    _choice("output_format", output_format, OUTPUT_FORMATS)
    _bounded("num_outputs", num_outputs, 1, 4)
    _bounded("num_inference_steps", num_inference_steps, 1, 50)
    _bounded("guidance_scale", guidance_scale, 0, 10)
    _bounded("prompt_strength", prompt_strength, 0, 1)
    _bounded("output_quality", output_quality, 0, 100)
    _bounded("lora_scale", lora_scale, *LORA_SCALE_RANGE)
    _bounded("extra_lora_scale", extra_lora_scale, *LORA_SCALE_RANGE)
    listed = _lora_list(hf_loras, lora_scales)
    if seed is not None and (seed != int(seed) or seed > MAX_USER_SEED):
        raise InputError("seed", f"must be an integer up to {MAX_USER_SEED} (negative: random), got {seed:.0f}")

    if mask and not image:
        raise InputError("mask", "needs an input image: set image as well, or leave mask empty")
    if image:
        if int(num_inference_steps * prompt_strength) < 1:
            raise InputError(
                "prompt_strength",
                f"is too low for {num_inference_steps} steps: num_inference_steps x prompt_strength "
                "must be at least 1 (raise either)",
            )
        mode = Mode.INPAINT if mask else Mode.IMG2IMG
        width = height = None  # taken from the image once it is read
    elif aspect_ratio == CUSTOM:
        mode = Mode.TXT2IMG
        width, height = custom_size(width, height)
    else:
        mode = Mode.TXT2IMG
        width, height = size_for_aspect_ratio(aspect_ratio, megapixels)

    return Request(
        prompt=prompt,
        mode=mode,
        width=width,
        height=height,
        image=image,
        mask=mask,
        prompt_strength=prompt_strength,
        model=model,
        num_outputs=num_outputs,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        seed=resolve_seed(seed),
        output_format=output_format,
        output_quality=output_quality,
        disable_safety_checker=disable_safety_checker,
        go_fast=go_fast,
        loras=_lora(main_lora, lora_scale, main_field) + _lora(extra_lora, extra_lora_scale, "extra_lora") + listed,
    )
