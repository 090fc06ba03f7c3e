"""The prediction service both Cog variants hand off to: request -> weights -> pipeline -> safety -> files."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flux_lora import log_setup_stage
from flux_lora.errors import LoraError, UserError
from flux_lora.request import LoraSpec, PipelineKey, Request, build_request, effective_scale
from flux_lora.settings import Settings
from flux_lora.weights.refs import shown

if TYPE_CHECKING:
    from flux_lora.generation.pipelines import Pipelines
    from flux_lora.generation.safety import SafetyChecker
    from flux_lora.lora.adapters import Wanted
    from flux_lora.lora.formats import ConvertedLora

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
MULTI = Variant("multi", main_lora_per_request=False)  # `hf_loras`: any number of LoRAs per request
VARIANTS = {variant.name: variant for variant in (HOTSWAP, TRAINED, MULTI)}


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


def request_for(variant: Variant, baked_lora: str | None, inputs: dict[str, Any]) -> Request:
    """The schema's inputs as a validated request for `variant`: pure rules, so `flux-lora predict` checks a
    command line with them before seconds of setup."""
    inputs = dict(inputs)
    if variant.main_lora_per_request:
        main, main_field = inputs.pop("replicate_weights", None), "replicate_weights"
    else:  # the trained variant's LoRA (and a multi-LoRA deployment's, if it was given one)
        main, main_field = baked_lora, "COG_WEIGHTS"
    for key in ("image", "mask"):
        if inputs.get(key) is not None:
            inputs[key] = str(inputs[key])
    return build_request(main_lora=main, main_field=main_field, **inputs)


@dataclass(frozen=True)
class LoraFile:
    """A LoRA the request names, fetched: the input it came from, its reference, the local file and the
    user's scale (before go_fast)."""

    field: str
    ref: str
    path: Path
    scale: float
    seconds: float = 0.0  # fetching it took
    downloaded: bool = False  # False: a cache hit (or a local file)


@dataclass
class Modules:
    """What setup otherwise loads from the store, built in memory: the benchmark's real-shape random weights."""

    pipelines: Pipelines
    safety: SafetyChecker


class _Stages:
    """Seconds per setup stage, each logged as it ends, and the one-line cold-start breakdown in the logs."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = time.perf_counter() - start
            log_setup_stage(name, self.seconds[name])

    def __str__(self) -> str:
        return ", ".join(f"{name} {sec:.2f}s" for name, sec in self.seconds.items())


class Service:
    """Models loaded once at setup; one `predict` per request."""

    def __init__(
        self,
        variant: Variant,
        settings: Settings,
        baked_lora: str | None,
        modules: Modules | None = None,
        warmup: list[tuple[str, str, int]] | None = None,
    ) -> None:
        """Load the store (or take `modules` built in memory), then go_fast, LoRA slots, compilation; `warmup`:
        the sizes compiled go_fast is warmed up at (None: every graph a prediction can need)."""
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
            from flux_lora.lora.adapters import LoraManager
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
        # The last KEEP_OUTPUTS predictions' files stay while the service does (cog reads them after predict
        # returns); the folder goes with the service, or at the process's exit.
        weakref.finalize(self, shutil.rmtree, self.outputs_dir, ignore_errors=True)
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
        with stages("quantize"):  # go_fast's fp8 copies (read pre-quantized when the store has them)
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
            max_rank=settings.lora_max_rank,
        )
        files: list[LoraFile] = []
        if baked_lora is not None:  # read now: a broken COG_WEIGHTS fails setup
            with stages("COG_WEIGHTS LoRA"):
                files = self.fetch_loras([LoraSpec(baked_lora, 1.0, "COG_WEIGHTS")])
        compiled = should_compile(device, settings.compile)
        # go_fast's fp8 transformers (and any that will be compiled) hold the rank budget on every linear from
        # now on: later LoRAs are written in and never recompile, and compiled or not they compute alike.
        baked_rank = max((self._converted(f).max_rank for f in files), default=0)
        with stages("reserve"):
            for key in self.transformers:
                if key.go_fast and (compiled or self._has_plain_twin(key)):
                    self.loras.reserve(key, max(self.loras.max_rank, baked_rank))
        for key in self.transformers if files else ():  # the baked LoRA stays resident everywhere
            self.apply_loras(key, files)
        self.cache.release()
        if compiled:
            # compile and warm-up log their own lines, per model
            stages.seconds.update(compile_fast_pipelines(self.pipelines, store, settings.compile_backend, warmup))
        self.setup_seconds = stages.seconds  # the benchmark's setup rows
        log.info("Setup on %s: %s", device, stages)

    @classmethod
    def from_modules(
        cls,
        variant: Variant,
        settings: Settings,
        modules: Modules,
        baked_lora: str | None = None,
        warmup: list[tuple[str, str, int]] | None = None,
    ) -> Service:
        """A service over modules built in memory, nothing read from the store: what the benchmark times
        (warmed up at `warmup`'s sizes only, when given)."""
        return cls(variant, settings, baked_lora, modules, warmup)

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
        return request_for(self.variant, self.baked_lora, inputs)

    def fetch_loras(self, specs: Sequence[LoraSpec]) -> list[LoraFile]:
        """The weights stage: each LoRA the request names as a verified local file, through the cache.

        Only the deployment's own COG_WEIGHTS, the command line's requests and files under
        FLUX_LORA_LOCAL_LORA_DIRS may be local paths; the cache's errors name the input."""
        out: list[LoraFile] = []
        for spec in specs:
            local = self.local_loras or (self.baked_lora is not None and spec.ref.strip() == self.baked_lora.strip())
            start, downloads = time.perf_counter(), self.cache.downloads
            try:
                path = self.cache.fetch(spec.ref, allow_local=local)
            except UserError as exc:  # the cache's own message, tied to the input it came from
                self.cache.release()  # this request will read none of its files
                raise LoraError(f"{spec.field}: {exc}") from None
            seconds = time.perf_counter() - start
            out.append(LoraFile(spec.field, spec.ref, path, spec.scale, seconds, self.cache.downloads > downloads))
        return out

    @staticmethod
    def wanted(files: list[LoraFile], go_fast: bool) -> list[Wanted]:
        """The adapters to run: files and the scales they run at (go_fast's multiplier applied)."""
        from flux_lora.lora.adapters import Wanted

        return [Wanted(f.field, f.path, effective_scale(f.scale, go_fast), shown(f.ref)) for f in files]

    def _converted(self, file: LoraFile) -> ConvertedLora:
        """A fetched LoRA read and converted (kept in memory for its adapters); a refusal names its input."""
        try:
            return self.loras.converted(file.path, shown(file.ref))[1]
        except LoraError as exc:
            raise LoraError(f"{file.field}: {exc}") from None

    def apply_loras(self, key: PipelineKey, files: list[LoraFile]) -> None:
        """The adapters stage: `key`'s transformer runs exactly these files; a failure names its input."""
        from flux_lora.lora.adapters import AdapterError, RankBudgetError

        try:
            self.loras.apply(key, self.wanted(files, key.go_fast))
        except AdapterError as exc:
            if isinstance(exc, RankBudgetError) and self._has_plain_twin(key):
                raise  # `use_loras` runs the request on the plain transformer instead
            raise LoraError(f"{exc.label}: {exc}") from None

    def use_loras(self, request: Request, files: list[LoraFile]) -> Request:
        """The adapters stage, on the transformer the request runs on (the plain one first goes into the bf16
        slot: its adapters move with it). LoRAs above a compiled transformer's rank budget run this request
        on the plain transformer instead, logged: the compiled one never changes shape."""
        from flux_lora.lora.adapters import RankBudgetError

        try:
            self._place(request.key)
            self.apply_loras(request.key, files)
        except RankBudgetError as exc:
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

        start, timings = time.perf_counter(), _Stages()
        request = self.request(inputs)
        log.info("Using seed: %d", request.seed)
        cond = prepare_inputs(request)  # a bad image fails before any LoRA is fetched
        files = self.fetch_loras(request.loras)
        for file in files:
            timings.seconds[f"{file.field} {'download' if file.downloaded else 'cache hit'}"] = file.seconds
        request = self._with_trigger_words(request, files)
        with timings("adapters"):
            request = self.use_loras(request, files)
        if request.go_fast and self.pipelines.fast is not None:
            log.info("go_fast: %s", self.pipelines.fast.fp8)
        with timings("denoise+decode"):
            images = generate(self.pipelines, request, cond)
        with timings("safety"):
            kept = safe_images(images, self.safety, disabled=request.disable_safety_checker)
        with timings("encode"):
            if self.settings.output_metadata:
                label_batch(kept, request, cond.width, cond.height, batch=images)
            paths = save_images(kept, request.output_format, request.output_quality, parent=self.outputs_dir)
            prune_outputs(self.outputs_dir, keep=KEEP_OUTPUTS)
        log.info(
            "Generated %d image(s) at %dx%d (%s, %s) in %.2fs",
            len(paths), cond.width, cond.height, request.model, request.mode.value, time.perf_counter() - start,
        )
        log.info("Timings: %s", timings)
        return paths

    def _with_trigger_words(self, request: Request, files: list[LoraFile]) -> Request:
        """Log the LoRAs' trigger words, warn when the prompt lacks one (FLUX_LORA_AUTO_TRIGGER prepends it)."""
        from flux_lora.lora.triggers import check_prompt

        loras = [(f.field, shown(f.ref), self.cache.trigger_words(f.path)) for f in files]
        prompt = check_prompt(request.prompt, loras, self.settings.auto_trigger)
        return request if prompt == request.prompt else replace(request, prompt=prompt)
