"""The prediction service both Cog variants hand off to: request -> weights -> pipeline -> safety -> files."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flux_lora.errors import UserError
from flux_lora.request import Request, build_request
from flux_lora.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    """What differs between the two Replicate models: where the main LoRA comes from."""

    name: str
    main_lora_per_request: bool  # hot-swap: `replicate_weights`; trained: COG_WEIGHTS at setup


HOTSWAP = Variant("hotswap", main_lora_per_request=True)
TRAINED = Variant("trained", main_lora_per_request=False)


def _configure_logging() -> None:
    """Cog captures stdout/stderr as prediction logs; make INFO records reach them."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("flux_lora").setLevel(logging.INFO)


def baked_lora_ref(weights: str | Path | None, settings: Settings) -> str | None:
    """The trained variant's LoRA reference; cog hands setup the store directory when COG_WEIGHTS is unset."""
    if weights is None or not str(weights).strip():
        return None
    path = Path(str(weights))
    if path.is_dir() and path.resolve() == settings.weights_dir.resolve():
        return None
    return str(weights)


class Service:
    """Models loaded once at setup; one `predict` per request."""

    def __init__(self, variant: Variant, settings: Settings, baked_lora: str | None) -> None:
        import torch

        from flux_lora.fast import should_compile
        from flux_lora.pipelines import load_fast_pipelines, load_pipelines, pick_device

        self.variant = variant
        self.settings = settings
        self.baked_lora = baked_lora
        device, dtype = pick_device(settings.device)
        torch.set_grad_enabled(False)
        self.pipelines = load_pipelines(settings.weights_dir, device, dtype)
        # Both variants offer go_fast: fp8 copies are built (or read pre-quantized) and warmed at setup.
        load_fast_pipelines(self.pipelines, settings.weights_dir, compile_=should_compile(device, settings.compile))
        if baked_lora is not None:
            raise UserError("COG_WEIGHTS: LoRA loading is not available yet in this build (see README status)")

    @classmethod
    def start(cls, variant: Variant, weights: str | Path | None = None) -> Service:
        _configure_logging()
        settings = Settings.from_env()
        start = time.perf_counter()
        service = cls(variant, settings, baked_lora_ref(weights, settings))
        log.info("Setup finished in %.1fs", time.perf_counter() - start)
        return service

    def request(self, inputs: dict[str, Any]) -> Request:
        """Turn the schema's inputs into a validated request for this variant."""
        inputs = dict(inputs)
        main = inputs.pop("replicate_weights", None) if self.variant.main_lora_per_request else self.baked_lora
        for key in ("image", "mask"):
            if inputs.get(key) is not None:
                inputs[key] = str(inputs[key])
        return build_request(main_lora=main, **inputs)

    def predict(self, **inputs: Any) -> list[Path]:
        from flux_lora.outputs import save_images
        from flux_lora.pipelines import generate, prepare_inputs

        start = time.perf_counter()
        request = self.request(inputs)
        log.info("Using seed: %d", request.seed)
        if request.main_lora or request.extra_lora:
            raise UserError("replicate_weights/extra_lora: LoRA loading is not available yet in this build")
        if request.go_fast and self.pipelines.fast is not None:
            log.info("go_fast: %s", self.pipelines.fast.fp8)
        cond = prepare_inputs(request)
        images = generate(self.pipelines, request, cond)
        paths = save_images(images, request.output_format, request.output_quality)
        log.info(
            "Generated %d image(s) at %dx%d (%s, %s) in %.2fs",
            len(paths), cond.width, cond.height, request.model, request.mode.value, time.perf_counter() - start,
        )
        return paths
