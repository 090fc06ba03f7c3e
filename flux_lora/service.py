"""The prediction service both Cog variants hand off to: request -> weights -> pipeline -> safety -> files."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flux_lora.request import Request, build_request
from flux_lora.settings import Settings

if TYPE_CHECKING:
    from flux_lora.cache import WeightCache

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    """What differs between the two Replicate models: where the main LoRA comes from."""

    name: str
    main_lora_per_request: bool  # hot-swap: `replicate_weights`; trained: COG_WEIGHTS at setup


# Prediction directories kept on disk: cog may still be reading the newest ones after `run` returned.
KEEP_OUTPUTS = 8

HOTSWAP = Variant("hotswap", main_lora_per_request=True)
TRAINED = Variant("trained", main_lora_per_request=False)


def _configure_logging() -> None:
    """Cog captures stdout/stderr as prediction logs; make our records reach them (FLUX_LORA_LOG_LEVEL)."""
    if not logging.getLogger().handlers:  # the flux-lora command line configures its own
        level = os.environ.get("FLUX_LORA_LOG_LEVEL", "INFO").upper()
        logging.basicConfig(level=level, format="%(message)s")


def baked_lora_ref(weights: str | Path | None, settings: Settings) -> str | None:
    """The trained variant's LoRA reference; cog hands setup the store directory when COG_WEIGHTS is unset."""
    if weights is None or not str(weights).strip():
        return None
    path = Path(str(weights))
    if path.is_dir() and path.resolve() == settings.weights_dir.resolve():
        return None
    return str(weights)


def _resolver(cache: WeightCache, baked_lora: str | None) -> Callable[[str], Path]:
    """LoRA references to files; only the deployment's own COG_WEIGHTS may be a local path."""

    def resolve(ref: str) -> Path:
        return cache.fetch(ref, allow_local=baked_lora is not None and ref.strip() == baked_lora.strip())

    return resolve


class _Stages:
    """Seconds per setup stage, for the one-line cold-start breakdown in the logs."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = time.perf_counter() - start

    def __str__(self) -> str:
        return ", ".join(f"{name} {sec:.2f}s" for name, sec in self.seconds.items())


class Service:
    """Models loaded once at setup; one `predict` per request."""

    def __init__(self, variant: Variant, settings: Settings, baked_lora: str | None) -> None:
        stages = _Stages()
        with stages("imports"):  # torch and diffusers: the largest part of a warm cold start
            import torch

            from flux_lora.cache import WeightCache
            from flux_lora.fast import should_compile
            from flux_lora.lora import DEFAULT_HOTSWAP_RANK, LoraManager
            from flux_lora.pipelines import load_fast_pipelines, load_pipelines, pick_device
            from flux_lora.safety import SafetyChecker
            from flux_lora.store import ensure_store

        self.variant = variant
        self.settings = settings
        self.cache = WeightCache.from_settings(settings)
        self.baked_lora = baked_lora
        self.outputs_dir = Path(tempfile.mkdtemp(prefix="flux-lora-outputs-"))
        device, dtype = pick_device(settings.device)
        torch.set_grad_enabled(False)
        with stages("store check"):
            ensure_store(settings.weights_dir, offline=settings.offline)
        with stages("pipelines"):
            self.pipelines = load_pipelines(settings.weights_dir, device, dtype)
        with stages("safety"):
            safety_dtype = torch.float16 if device.type == "cuda" else dtype
            self.safety = SafetyChecker.load(settings.weights_dir, device, safety_dtype)
        # Both variants offer go_fast: fp8 copies are built (or read pre-quantized) and warmed at setup.
        compiled = should_compile(device, settings.compile)
        with stages("go_fast"):
            fast = load_fast_pipelines(self.pipelines, settings.weights_dir, compile_=compiled)
        # One manager over the plain and the go_fast transformers (keys "dev", "dev:fast", ...) and the
        # shared CLIP; where no fp8 runs, "dev:fast" is the plain module itself.
        transformers = {**self.pipelines.transformers, **{f"{n}:fast": t for n, t in fast.transformers.items()}}
        self.loras = LoraManager(
            transformers,
            self.pipelines.text2img["dev"].text_encoder,
            _resolver(self.cache, baked_lora),
            memory_bytes=settings.lora_memory_bytes,
            # A compiled transformer takes new LoRAs by hot-swap into padded adapters: no recompilation.
            hotswap_rank=settings.lora_hotswap_rank or (DEFAULT_HOTSWAP_RANK if compiled else None),
        )
        if baked_lora is not None:  # load now: a broken COG_WEIGHTS fails setup, and stays resident
            from flux_lora.request import LoraSpec

            with stages("COG_WEIGHTS LoRA"):
                for key in transformers:
                    go_fast = key.endswith(":fast")
                    spec = LoraSpec(baked_lora, 1.0)
                    self.loras.apply(key, self.loras.wanted(spec, None, go_fast, "COG_WEIGHTS"))
        log.info("Setup on %s: %s", device, stages)

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
        from flux_lora.outputs import label_batch, prune_outputs, save_images
        from flux_lora.pipelines import generate, prepare_inputs
        from flux_lora.safety import safe_images

        start = time.perf_counter()
        request = self.request(inputs)
        log.info("Using seed: %d", request.seed)
        cond = prepare_inputs(request)  # a bad image fails before any LoRA is fetched
        main_field = "replicate_weights" if self.variant.main_lora_per_request else "COG_WEIGHTS"
        key = f"{request.model}:fast" if request.go_fast else request.model
        self.pipelines.prepare(request.model, request.go_fast)  # the bf16 slot first: adapters move with it
        self.loras.apply(key, self.loras.wanted(request.main_lora, request.extra_lora, request.go_fast, main_field))
        request = self._with_trigger_words(request, main_field)
        if request.go_fast and self.pipelines.fast is not None:
            log.info("go_fast: %s", self.pipelines.fast.fp8)
        images = generate(self.pipelines, request, cond)
        if self.settings.output_metadata:  # before the safety checker: each image keeps its batch index
            label_batch(images, request, cond.width, cond.height)
        images = safe_images(images, self.safety, disabled=request.disable_safety_checker)
        paths = save_images(images, request.output_format, request.output_quality, parent=self.outputs_dir)
        prune_outputs(self.outputs_dir, keep=KEEP_OUTPUTS)
        log.info(
            "Generated %d image(s) at %dx%d (%s, %s) in %.2fs",
            len(paths), cond.width, cond.height, request.model, request.mode.value, time.perf_counter() - start,
        )
        return paths

    def _with_trigger_words(self, request: Request, main_field: str) -> Request:
        """Log the LoRAs' trigger words, warn when the prompt lacks one (FLUX_LORA_AUTO_TRIGGER prepends it)."""
        from flux_lora.lora import shown
        from flux_lora.triggers import check_prompt

        loras = [
            (field, shown(spec.ref), self.cache.trigger_words(self.loras.resolve(spec.ref)))
            for field, spec in ((main_field, request.main_lora), ("extra_lora", request.extra_lora))
            if spec is not None
        ]
        prompt = check_prompt(request.prompt, loras, self.settings.auto_trigger)
        return request if prompt == request.prompt else replace(request, prompt=prompt)
