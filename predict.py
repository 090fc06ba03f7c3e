"""Cog schema for the two Replicate FLUX LoRA model variants, and the hand-off to flux_lora.

- TrainedPredictor: a trained LoRA baked into the deployment (COG_WEIGHTS), go_fast on by default.
- HotswapPredictor: the main LoRA is chosen per request through `replicate_weights`.
- MultiLoraPredictor: any number of LoRAs per request (up to 8), `hf_loras` with `lora_scales` as the
  public multi-LoRA FLUX models on Replicate name them; otherwise the hot-swap variant's inputs.

The inputs are written out literally (a shared `Inputs` class, literal choices and string
constants) because `cog build` reads this file statically to write the OpenAPI schema.

`run` is async so that cog can hold more than one request (cog.yaml `concurrency.max`): a request
that arrives while another runs waits its turn instead of getting `409 At capacity`.
"""

import asyncio
import functools
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

from cog import BaseRunner, Input, Path

from flux_lora import cancel
from flux_lora.errors import UserError, for_cog
from flux_lora.generation.progress import log_progress
from flux_lora.service import HOTSWAP, MULTI, TRAINED, Service, Variant
from flux_lora.weights import url_inputs  # guards cog's own fetch of image/mask URLs (see its docstring)

log = logging.getLogger("flux_lora")

LORA_DESCRIPTION = "Load LoRA weights. Supports Replicate models in the format <owner>/<username> or <owner>/<username>/<version>, HuggingFace URLs in the format huggingface.co/<owner>/<model-name>, CivitAI URLs in the format civitai.com/models/<id>[/<model-name>], or arbitrary .safetensors URLs from the Internet. For example, 'fofr/flux-pixar-cars'"  # noqa: E501
LORA_SCALE_DESCRIPTION = "Determines how strongly the main LoRA should be applied. Sane results between 0 and 1 for base inference. For go_fast we apply a 1.5x multiplier to this value; we've generally seen good performance when scaling the base value by that amount. You may still need to experiment to find the best value for your particular lora."  # noqa: E501
EXTRA_LORA_SCALE_DESCRIPTION = "Determines how strongly the extra LoRA should be applied. Sane results between 0 and 1 for base inference. For go_fast we apply a 1.5x multiplier to this value; we've generally seen good performance when scaling the base value by that amount. You may still need to experiment to find the best value for your particular lora."  # noqa: E501
HF_LORAS_DESCRIPTION = "LoRA weights to apply together, up to 8, in order. Each supports the formats of the hot-swap model's replicate_weights: Replicate models <owner>/<model>[/<version>], HuggingFace huggingface.co/<owner>/<model-name>[/<file>.safetensors], CivitAI civitai.com/models/<id>[/<model-name>], or arbitrary .safetensors URLs. For example, ['fofr/flux-pixar-cars', 'alvdansen/frosting_lane_flux']"  # noqa: E501
LORA_SCALES_DESCRIPTION = "Scales for the LoRAs in hf_loras: one per LoRA in the same order, or a single value for all of them. Default 1.0 each. Each between -1 and 3; sane results between 0 and 1."  # noqa: E501
GO_FAST_DESCRIPTION = "Run faster predictions with model optimized for speed (currently fp8 quantized); disable to run in original bf16"  # noqa: E501


class Inputs:
    """Input definitions shared by both variants, in schema order."""

    prompt = Input(
        description="Prompt for generated image. If you include the `trigger_word` used in the training process you are more likely to activate the trained object, style, or concept in the resulting image."  # noqa: E501
    )
    image = Input(
        description="Input image for image to image or inpainting mode. If provided, aspect_ratio, width, and height inputs are ignored.",  # noqa: E501
        default=None,
    )
    mask = Input(
        description="Image mask for image inpainting mode. If provided, aspect_ratio, width, and height inputs are ignored.",  # noqa: E501
        default=None,
    )
    aspect_ratio = Input(
        description="Aspect ratio for the generated image. If custom is selected, uses height and width below & will run in bf16 mode",  # noqa: E501
        choices=["1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21", "custom"],
        default="1:1",
    )
    height = Input(
        description="Height of generated image. Only works if `aspect_ratio` is set to custom. Will be rounded to nearest multiple of 16. Incompatible with fast generation",  # noqa: E501
        ge=256,
        le=1440,
        default=None,
    )
    width = Input(
        description="Width of generated image. Only works if `aspect_ratio` is set to custom. Will be rounded to nearest multiple of 16. Incompatible with fast generation",  # noqa: E501
        ge=256,
        le=1440,
        default=None,
    )
    prompt_strength = Input(
        description="Prompt strength when using img2img. 1.0 corresponds to full destruction of information in image",  # noqa: E501
        ge=0.0,
        le=1.0,
        default=0.8,
    )
    model = Input(
        description="Which model to run inference with. The dev model performs best with around 28 inference steps but the schnell model only needs 4 steps.",  # noqa: E501
        choices=["dev", "schnell"],
        default="dev",
    )
    num_outputs = Input(description="Number of outputs to generate", ge=1, le=4, default=1)
    num_inference_steps = Input(
        description="Number of denoising steps. More steps can give more detailed images, but take longer.",
        ge=1,
        le=50,
        default=28,
    )
    guidance_scale = Input(
        description="Guidance scale for the diffusion process. Lower values can give more realistic images. Good values to try are 2, 2.5, 3 and 3.5",  # noqa: E501
        ge=0,
        le=10,
        default=3,
    )
    seed = Input(description="Random seed. Set for reproducible generation", default=None)
    output_format = Input(
        description="Format of the output images", choices=["webp", "jpg", "png"], default="webp"
    )
    output_quality = Input(
        description="Quality when saving the output images, from 0 to 100. 100 is best quality, 0 is lowest quality. Not relevant for .png outputs",  # noqa: E501
        ge=0,
        le=100,
        default=80,
    )
    disable_safety_checker = Input(description="Disable safety checker for generated images.", default=False)
    megapixels = Input(
        description="Approximate number of megapixels for generated image", choices=["1", "0.25"], default="1"
    )
    replicate_weights = Input(description=LORA_DESCRIPTION, default=None)
    lora_scale = Input(description=LORA_SCALE_DESCRIPTION, ge=-1, le=3, default=1.0)
    extra_lora = Input(description=LORA_DESCRIPTION, default=None)
    extra_lora_scale = Input(description=EXTRA_LORA_SCALE_DESCRIPTION, ge=-1, le=3, default=1.0)

    hf_loras = Input(description=HF_LORAS_DESCRIPTION, default=[])
    lora_scales = Input(description=LORA_SCALES_DESCRIPTION, default=[])

    @staticmethod
    def go_fast(default: bool) -> Input:
        return Input(description=GO_FAST_DESCRIPTION, default=default)


def _without_grad() -> None:
    import torch

    torch.set_grad_enabled(False)


class OneAtATime(BaseRunner):
    """cog may hand us several requests at once; the GPU runs them one after another, in order."""

    def load(self, variant: Variant, weights: Optional[str]) -> None:
        self.service = Service.start(variant, weights)
        log_progress(self.service.pipelines)
        self.gpu = asyncio.Lock()  # FIFO: requests run in the order they arrived
        # One thread for every run: torch's grad mode is per thread (setup turned it off in its own).
        self.gpu_thread = ThreadPoolExecutor(1, thread_name_prefix="gpu", initializer=_without_grad)

    async def in_turn(self, inputs: dict[str, Any]) -> list[Path]:
        """Wait for the GPU (cancelling here ends the prediction unrun), then run in the GPU thread.

        A cancel during the run reaches every stage through the run's token (flux_lora.cancel): a download
        stops and removes its partial file, denoising stops at its next step. The GPU lock belongs to the run,
        not to this coroutine: a cancelled prediction returns at once, so cog frees its slot for the next
        request, which waits for the lock until the run has stopped, and never overlaps it.
        """
        url_inputs.check_fetched(self.run, inputs)
        if self.gpu.locked():
            log.info("Waiting for the prediction ahead of this one to finish")
        await self.gpu.acquire()
        token = cancel.Token()
        run = functools.partial(self.service.predict, **inputs)
        # The run's context: its token, and this prediction's id on its log lines (cog routes them by it).
        ctx = cancel.context_with(token)
        try:
            work = asyncio.get_running_loop().run_in_executor(self.gpu_thread, ctx.run, run)
        except BaseException:
            self.gpu.release()
            raise
        work.add_done_callback(lambda _: self.gpu.release())
        try:
            paths = await asyncio.shield(work)
        except UserError as exc:  # reaches the cog server named for its field, not its class
            raise for_cog(exc) from None
        except asyncio.CancelledError:
            token.cancel()
            work.add_done_callback(_retrieved)
            raise
        return [Path(p) for p in paths]


def _retrieved(work: asyncio.Future) -> None:
    """A cancelled run's own ending (its Cancelled, or a result nobody waits for) is expected: mark it read."""
    if not work.cancelled():
        work.exception()


class TrainedPredictor(OneAtATime):
    """A deployment of one trained LoRA: COG_WEIGHTS names it; go_fast is on by default."""

    def setup(self, weights: Optional[str] = None) -> None:
        self.load(TRAINED, weights)

    async def run(
        self,
        prompt: str = Inputs.prompt,
        image: Optional[Path] = Inputs.image,
        mask: Optional[Path] = Inputs.mask,
        aspect_ratio: str = Inputs.aspect_ratio,
        height: Optional[int] = Inputs.height,
        width: Optional[int] = Inputs.width,
        prompt_strength: float = Inputs.prompt_strength,
        model: str = Inputs.model,
        num_outputs: int = Inputs.num_outputs,
        num_inference_steps: int = Inputs.num_inference_steps,
        guidance_scale: float = Inputs.guidance_scale,
        seed: Optional[int] = Inputs.seed,
        output_format: str = Inputs.output_format,
        output_quality: int = Inputs.output_quality,
        disable_safety_checker: bool = Inputs.disable_safety_checker,
        go_fast: bool = Inputs.go_fast(True),
        megapixels: str = Inputs.megapixels,
        lora_scale: float = Inputs.lora_scale,
        extra_lora: Optional[str] = Inputs.extra_lora,
        extra_lora_scale: float = Inputs.extra_lora_scale,
    ) -> list[Path]:
        inputs = dict(locals())
        del inputs["self"]
        return await self.in_turn(inputs)


class HotswapPredictor(OneAtATime):
    """One deployment for any LoRA: `replicate_weights` picks the main LoRA per request."""

    def setup(self, weights: Optional[str] = None) -> None:
        self.load(HOTSWAP, weights)

    async def run(
        self,
        prompt: str = Inputs.prompt,
        image: Optional[Path] = Inputs.image,
        mask: Optional[Path] = Inputs.mask,
        aspect_ratio: str = Inputs.aspect_ratio,
        height: Optional[int] = Inputs.height,
        width: Optional[int] = Inputs.width,
        prompt_strength: float = Inputs.prompt_strength,
        model: str = Inputs.model,
        num_outputs: int = Inputs.num_outputs,
        num_inference_steps: int = Inputs.num_inference_steps,
        guidance_scale: float = Inputs.guidance_scale,
        seed: Optional[int] = Inputs.seed,
        output_format: str = Inputs.output_format,
        output_quality: int = Inputs.output_quality,
        disable_safety_checker: bool = Inputs.disable_safety_checker,
        go_fast: bool = Inputs.go_fast(False),
        megapixels: str = Inputs.megapixels,
        replicate_weights: Optional[str] = Inputs.replicate_weights,
        lora_scale: float = Inputs.lora_scale,
        extra_lora: Optional[str] = Inputs.extra_lora,
        extra_lora_scale: float = Inputs.extra_lora_scale,
    ) -> list[Path]:
        inputs = dict(locals())
        del inputs["self"]
        return await self.in_turn(inputs)


class MultiLoraPredictor(OneAtATime):
    """Any number of LoRAs per request, each at its own scale, all in one packed adapter (no recompilation)."""

    def setup(self, weights: Optional[str] = None) -> None:
        self.load(MULTI, weights)

    async def run(
        self,
        prompt: str = Inputs.prompt,
        image: Optional[Path] = Inputs.image,
        mask: Optional[Path] = Inputs.mask,
        aspect_ratio: str = Inputs.aspect_ratio,
        height: Optional[int] = Inputs.height,
        width: Optional[int] = Inputs.width,
        prompt_strength: float = Inputs.prompt_strength,
        model: str = Inputs.model,
        num_outputs: int = Inputs.num_outputs,
        num_inference_steps: int = Inputs.num_inference_steps,
        guidance_scale: float = Inputs.guidance_scale,
        seed: Optional[int] = Inputs.seed,
        output_format: str = Inputs.output_format,
        output_quality: int = Inputs.output_quality,
        disable_safety_checker: bool = Inputs.disable_safety_checker,
        go_fast: bool = Inputs.go_fast(False),
        megapixels: str = Inputs.megapixels,
        hf_loras: list[str] = Inputs.hf_loras,
        lora_scales: list[float] = Inputs.lora_scales,
    ) -> list[Path]:
        inputs = dict(locals())
        del inputs["self"]
        return await self.in_turn(inputs)
