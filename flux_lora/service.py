"""The prediction service both Cog variants hand off to: request -> weights -> pipeline -> safety -> files."""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flux_lora.errors import LoraError, UserError
from flux_lora.request import LoraSpec, PipelineKey, Request, build_request, effective_scale
from flux_lora.settings import Settings
from flux_lora.weights.refs import shown

if TYPE_CHECKING:
    from flux_lora.generation.pipelines import Pipelines
    from flux_lora.generation.safety import SafetyChecker
    from flux_lora.lora.adapters import Wanted

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
        logging.basicConfig(level=Settings.log_level(), format="%(message)s")


def baked_lora_ref(weights: str | Path | None, settings: Settings) -> str | None:
    """The trained variant's LoRA reference; cog hands setup the store directory when COG_WEIGHTS is unset."""
    if weights is None or not str(weights).strip():
        return None
    path = Path(str(weights))
    if path.is_dir() and path.resolve() == settings.weights_dir.resolve():
        return None
    return str(weights)


@dataclass(frozen=True)
class LoraFile:
    """A LoRA the request names, fetched: its slot, the input it came from, its reference, the local
    file and the user's scale (before go_fast)."""

    slot: str
    field: str
    ref: str
    path: Path
    scale: float


@dataclass
class Modules:
    """What setup otherwise loads from the store, built in memory: the benchmark's real-shape random weights."""

    pipelines: Pipelines
    safety: SafetyChecker


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

    def __init__(
        self, variant: Variant, settings: Settings, baked_lora: str | None, modules: Modules | None = None
    ) -> None:
        """Load the store (or take `modules` built in memory), then go_fast, LoRA slots, compilation."""
        stages = _Stages()
        with stages("imports"):  # torch and diffusers: the largest part of a warm cold start
            import torch

            from flux_lora.generation.fast import should_compile
            from flux_lora.generation.pipelines import (
                compile_fast_pipelines,
                load_fast_pipelines,
                load_pipelines,
                pick_device,
                quiet_loading_bars,
            )
            from flux_lora.generation.safety import SafetyChecker
            from flux_lora.lora.adapters import DEFAULT_HOTSWAP_RANK, LoraManager
            from flux_lora.weights.cache import WeightCache
            from flux_lora.weights.store import ensure_store

        quiet_loading_bars()
        self.variant = variant
        self.settings = settings
        self.baked_lora = baked_lora
        # Requests may name any local LoRA file: only for `flux-lora predict`, run by the machine's own user.
        # A server reads local files only under FLUX_LORA_LOCAL_LORA_DIRS.
        self.local_loras = False
        self.outputs_dir = Path(tempfile.mkdtemp(prefix="flux-lora-outputs-"))
        torch.set_grad_enabled(False)
        store: Path | None = settings.weights_dir
        if modules is None:
            device, dtype = pick_device(settings.device)
            with stages("store check"):
                ensure_store(settings.weights_dir, offline=settings.offline)
            with stages("pipelines"):
                self.pipelines = load_pipelines(settings.weights_dir, device, dtype)
            with stages("safety"):
                safety_dtype = torch.float16 if device.type == "cuda" else dtype
                self.safety = SafetyChecker.load(settings.weights_dir, device, safety_dtype)
        else:
            self.pipelines, self.safety, store = modules.pipelines, modules.safety, None
            device = self.pipelines.device
        # Both variants offer go_fast: fp8 copies are built (or read pre-quantized) at setup.
        with stages("go_fast"):
            fast = load_fast_pipelines(self.pipelines, store)
        # One manager over the plain and the go_fast transformers and the shared CLIP; where no fp8 runs,
        # the go_fast key holds the plain module itself.
        self.transformers = {
            **{PipelineKey(n, False): t for n, t in self.pipelines.transformers.items()},
            **{PipelineKey(n, True): t for n, t in fast.transformers.items()},
        }
        self.cache = WeightCache.from_settings(settings)
        self.loras = LoraManager(
            self.transformers,
            self.pipelines.text2img["dev"].text_encoder,
            memory_bytes=settings.lora_memory_bytes,
            hotswap_rank=settings.lora_hotswap_rank or DEFAULT_HOTSWAP_RANK,
        )
        files: list[LoraFile] = []
        if baked_lora is not None:  # read now: a broken COG_WEIGHTS fails setup
            with stages("COG_WEIGHTS LoRA"):
                files = self.fetch_loras(LoraSpec(baked_lora, 1.0), None, "COG_WEIGHTS")
        compiled = should_compile(device, settings.compile)
        if compiled:
            # Both LoRA slots on every linear before compiling: later LoRAs are copied in, never recompile.
            baked_rank = max((self.loras.converted(f.path, shown(f.ref))[1].max_rank for f in files), default=0)
            for key in self.transformers:
                if key.go_fast:
                    self.loras.reserve(key, max(self.loras.hotswap_rank or 0, baked_rank))
        for key in self.transformers if files else ():  # the baked LoRA stays resident everywhere
            self.apply_loras(key, files)
        self.cache.release()
        if compiled:
            stages.seconds.update(compile_fast_pipelines(self.pipelines, store, settings.compile_backend))
        self.setup_seconds = stages.seconds  # the benchmark's setup rows
        log.info("Setup on %s: %s", device, stages)

    @classmethod
    def from_modules(
        cls, variant: Variant, settings: Settings, modules: Modules, baked_lora: str | None = None
    ) -> Service:
        """A service over modules built in memory, nothing read from the store: what the benchmark times."""
        return cls(variant, settings, baked_lora, modules)

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

    def fetch_loras(self, main: LoraSpec | None, extra: LoraSpec | None, main_field: str) -> list[LoraFile]:
        """The weights stage: each LoRA the request names as a verified local file, through the cache.

        Only the deployment's own COG_WEIGHTS, the command line's requests and files under
        FLUX_LORA_LOCAL_LORA_DIRS may be local paths; the cache's errors name the input."""
        out: list[LoraFile] = []
        for slot, field, spec in (("main", main_field, main), ("extra", "extra_lora", extra)):
            if spec is None:
                continue
            local = self.local_loras or (self.baked_lora is not None and spec.ref.strip() == self.baked_lora.strip())
            try:
                path = self.cache.fetch(spec.ref, allow_local=local)
            except UserError as exc:  # the cache's own message, tied to the input it came from
                self.cache.release()  # this request will read none of its files
                raise LoraError(f"{field}: {exc}") from None
            out.append(LoraFile(slot, field, spec.ref, path, spec.scale))
        return out

    @staticmethod
    def wanted(files: list[LoraFile], go_fast: bool) -> list[Wanted]:
        """The adapters to run: files and the scales they run at (go_fast's multiplier applied)."""
        from flux_lora.lora.adapters import Wanted

        return [Wanted(f.slot, f.path, effective_scale(f.scale, go_fast), shown(f.ref)) for f in files]

    def apply_loras(self, key: PipelineKey, files: list[LoraFile]) -> None:
        """The adapters stage: `key`'s transformer runs exactly these files; a failure names its input."""
        from flux_lora.lora.adapters import ReservedRankError, SlotError

        try:
            self.loras.apply(key, self.wanted(files, key.go_fast))
        except SlotError as exc:
            if isinstance(exc, ReservedRankError) and self._has_plain_twin(key):
                raise  # `use_loras` runs the request on the plain transformer instead
            field = next(f.field for f in files if f.slot == exc.slot)
            raise LoraError(f"{field}: {exc}") from None

    def use_loras(self, request: Request, files: list[LoraFile]) -> Request:
        """The adapters stage, on the transformer the request runs on (the plain one first goes into the bf16
        slot: its adapters move with it). A LoRA above a compiled transformer's slot rank runs this request
        on the plain transformer instead, logged: the compiled one never changes shape."""
        from flux_lora.lora.adapters import ReservedRankError

        try:
            self._place(request.key)
            self.apply_loras(request.key, files)
        except ReservedRankError as exc:
            log.warning("go_fast: %s; this request runs on the plain transformer, uncompiled", exc)
            request = replace(request, go_fast=False)
            self._place(request.key)
            self.apply_loras(request.key, files)
        finally:
            self.cache.release()  # the files are read: other replicas' eviction may take them now
        return request

    def _has_plain_twin(self, key: PipelineKey) -> bool:
        """A go_fast key whose transformer is not the plain one (where no fp8 runs, they are one module)."""
        return key.go_fast and self.transformers[key] is not self.transformers[PipelineKey(key.model, False)]

    def _place(self, key: PipelineKey) -> None:
        residency = self.pipelines.residency
        if residency is not None and self.transformers[key] is residency.modules.get(key.model):
            residency.ensure(key.model)

    def predict(self, **inputs: Any) -> list[Path]:
        """request -> inputs -> LoRA files (cache) -> adapters -> generate -> safety -> files."""
        from flux_lora.generation.inputs import prepare_inputs
        from flux_lora.generation.outputs import label_batch, prune_outputs, save_images
        from flux_lora.generation.pipelines import generate
        from flux_lora.generation.safety import safe_images

        start = time.perf_counter()
        request = self.request(inputs)
        log.info("Using seed: %d", request.seed)
        cond = prepare_inputs(request)  # a bad image fails before any LoRA is fetched
        main_field = "replicate_weights" if self.variant.main_lora_per_request else "COG_WEIGHTS"
        files = self.fetch_loras(request.main_lora, request.extra_lora, main_field)
        request = self._with_trigger_words(request, files)
        request = self.use_loras(request, files)
        if request.go_fast and self.pipelines.fast is not None:
            log.info("go_fast: %s", self.pipelines.fast.fp8)
        images = generate(self.pipelines, request, cond)
        kept = safe_images(images, self.safety, disabled=request.disable_safety_checker)
        if self.settings.output_metadata:
            label_batch(kept, request, cond.width, cond.height, batch=images)
        paths = save_images(kept, request.output_format, request.output_quality, parent=self.outputs_dir)
        prune_outputs(self.outputs_dir, keep=KEEP_OUTPUTS)
        log.info(
            "Generated %d image(s) at %dx%d (%s, %s) in %.2fs",
            len(paths), cond.width, cond.height, request.model, request.mode.value, time.perf_counter() - start,
        )
        return paths

    def _with_trigger_words(self, request: Request, files: list[LoraFile]) -> Request:
        """Log the LoRAs' trigger words, warn when the prompt lacks one (FLUX_LORA_AUTO_TRIGGER prepends it)."""
        from flux_lora.lora.triggers import check_prompt

        loras = [(f.field, shown(f.ref), self.cache.trigger_words(f.path)) for f in files]
        prompt = check_prompt(request.prompt, loras, self.settings.auto_trigger)
        return request if prompt == request.prompt else replace(request, prompt=prompt)
