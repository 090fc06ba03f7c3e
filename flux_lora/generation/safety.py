"""The two NSFW checkers: the SD safety checker on the whole batch, Falcon's ViT as a second opinion.

The SD checker (CLIP concept matching) over-flags, so an image is dropped only when Falcon's
classifier agrees it is not "normal". Both run once per batch, never per image, and Falcon sees only
the images the SD checker flagged. The prediction fails only when every image is dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.utils import logging as diffusers_logging
from PIL import Image
from transformers import (
    AutoImageProcessor,
    CLIPConfig,
    CLIPImageProcessor,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)
from transformers.image_processing_utils import BaseImageProcessor

from flux_lora import cancel
from flux_lora.errors import UserError
from flux_lora.weights.store import FALCON_DIR
from flux_lora.weights.store import SAFETY_CHECKER_DIR as SD_CHECKER_DIR

log = logging.getLogger(__name__)
# The SD checker's "a black image will be returned instead" warning is not what we do; we log our own.
diffusers_logging.get_logger(StableDiffusionSafetyChecker.__module__).setLevel(logging.ERROR)

SAFE_LABEL = "normal"
NSFW_MESSAGE = "All generated images contained NSFW content. Try running it again with a different prompt."


class NSFWError(UserError):
    """Every generated image was judged NSFW by both checkers."""

    def __init__(self) -> None:
        super().__init__(NSFW_MESSAGE)


@dataclass
class SafetyChecker:
    """Both checkers and their image processors, loaded once at setup on the pipeline's device."""

    sd: StableDiffusionSafetyChecker
    sd_processor: BaseImageProcessor
    falcon: ViTForImageClassification
    falcon_processor: BaseImageProcessor
    device: torch.device
    dtype: torch.dtype

    @classmethod
    def load(cls, store: Path, device: torch.device, dtype: torch.dtype) -> SafetyChecker:
        """Load `<store>/safety-checker` and `<store>/falcon-nsfw` (fp16 on CUDA, float32 on CPU)."""
        sd_dir, falcon_dir = Path(store) / SD_CHECKER_DIR, Path(store) / FALCON_DIR
        for path in (sd_dir, falcon_dir):
            if not (path / "config.json").is_file():
                raise FileNotFoundError(f"safety checker weights missing: {path}/config.json")
        sd = StableDiffusionSafetyChecker.from_pretrained(sd_dir, dtype=dtype).to(device).eval()
        falcon = ViTForImageClassification.from_pretrained(falcon_dir, dtype=dtype).to(device).eval()
        return cls(
            sd=sd,
            sd_processor=AutoImageProcessor.from_pretrained(sd_dir),
            falcon=falcon,
            falcon_processor=AutoImageProcessor.from_pretrained(falcon_dir),
            device=torch.device(device),
            dtype=dtype,
        )

    def filter(self, images: Sequence[Image.Image]) -> list[int]:
        """Indices of the images to keep, in order; raises NSFWError when none is left."""
        if not images:
            return []
        cancel.check()
        flagged = [i for i, bad in enumerate(self.sd_flags(images)) if bad]
        cancel.check()
        dropped = [i for i, bad in zip(flagged, self.falcon_unsafe([images[i] for i in flagged]), strict=True)
                   if bad]
        if flagged:
            log.info("SD safety checker flagged image(s) %s; Falcon confirmed %s", flagged, dropped)
        if dropped:
            log.warning("dropped NSFW image(s) at index %s of %d", dropped, len(images))
        kept = [i for i in range(len(images)) if i not in dropped]
        if not kept:
            raise NSFWError()
        return kept

    @torch.no_grad()
    def sd_flags(self, images: Sequence[Image.Image]) -> list[bool]:
        """The SD checker's verdict for each image, from one call on the whole batch."""
        clip_input = self._pixels(self.sd_processor, images)
        # The checker blacks out the flagged entries of `images` in place. We want only the flags, so it
        # gets its own input tensor (used up by then) instead of a full-size copy of our images.
        _, flags = self.sd(clip_input=clip_input, images=clip_input)
        return [bool(flag) for flag in flags]

    def falcon_unsafe(self, images: Sequence[Image.Image]) -> list[bool]:
        """Falcon's verdict (True = not "normal") for each image, in one call; a failure counts as unsafe."""
        if not images:
            return []
        try:
            with torch.no_grad():
                logits = self.falcon(pixel_values=self._pixels(self.falcon_processor, images)).logits
            labels = [self.falcon.config.id2label[int(i)] for i in logits.argmax(-1).tolist()]
        except Exception:
            log.exception("Falcon NSFW classifier failed; treating its %d image(s) as NSFW", len(images))
            return [True] * len(images)
        return [label != SAFE_LABEL for label in labels]

    def _pixels(self, processor: BaseImageProcessor, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = processor(images=list(images), return_tensors="pt").pixel_values
        return pixels.to(self.device, self.dtype)


def safe_images(
    images: Sequence[Image.Image], checker: SafetyChecker, *, disabled: bool
) -> list[Image.Image]:
    """The images a prediction returns: all of them when checking is disabled (no model runs), else
    the safe ones in order; raises NSFWError when none is safe."""
    if disabled:
        return list(images)
    return [images[i] for i in checker.filter(images)]


def make_tiny_checkers(
    store: Path,
    *,
    flag: Literal["never", "always"] = "never",
    falcon: Literal["normal", "nsfw"] = "normal",
) -> None:
    """Write tiny random checkers (32 px, 2 layers) in the real layout, with a known verdict."""
    store = Path(store)
    torch.manual_seed(0)
    tower = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
    clip = CLIPConfig(
        text_config={**tower, "vocab_size": 99, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
        vision_config={**tower, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    sd, vit = rigged_checkers(clip, ViTConfig(**tower, image_size=32, patch_size=8), flag=flag, falcon=falcon)
    sd.save_pretrained(store / SD_CHECKER_DIR)
    clip_processor(32).save_pretrained(store / SD_CHECKER_DIR)
    vit.save_pretrained(store / FALCON_DIR)
    vit_processor(32).save_pretrained(store / FALCON_DIR)


def rigged_checkers(
    clip: CLIPConfig,
    vit: ViTConfig,
    *,
    flag: Literal["never", "always"],
    falcon: Literal["normal", "nsfw"],
) -> tuple[StableDiffusionSafetyChecker, ViTForImageClassification]:
    """Random checkers of any size whose verdict is known in advance (for tests and benchmarks).

    SD checker: an image is flagged when cos(image, concept) - threshold > 0; cosines lie in [-1, 1],
    so a threshold of 2 never flags and -2 always does. Falcon: a zero classifier weight and a bias
    favouring one label make that label win for every image.
    """
    sd = StableDiffusionSafetyChecker(clip).eval()
    with torch.no_grad():
        sd.concept_embeds.copy_(torch.randn_like(sd.concept_embeds))
        sd.special_care_embeds.copy_(torch.randn_like(sd.special_care_embeds))
        sd.concept_embeds_weights.fill_(2.0 if flag == "never" else -2.0)
        sd.special_care_embeds_weights.fill_(2.0)  # no "special care" adjustment
    vit.id2label, vit.label2id = {0: SAFE_LABEL, 1: "nsfw"}, {SAFE_LABEL: 0, "nsfw": 1}
    model = ViTForImageClassification(vit).eval()
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([4.0, -4.0] if falcon == "normal" else [-4.0, 4.0]))
    return sd, model


def clip_processor(size: int) -> CLIPImageProcessor:
    """The SD checker's preprocessing (resize the short side, centre crop), at its tower's size."""
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def vit_processor(size: int) -> ViTImageProcessor:
    """Falcon's preprocessing (plain resize to a square), at its model's size."""
    return ViTImageProcessor(size={"height": size, "width": size})
