"""FLUX.1 dev and schnell, loaded once, sharing text encoders, tokenizers and VAE.

Six entry points (2 models x txt2img/img2img/inpaint) over two transformers: the img2img and
inpaint pipelines are built with `from_pipe`, which shares every component.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import (
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxImg2ImgPipeline,
    FluxInpaintPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
)
from PIL import Image

from flux_lora import cancel
from flux_lora.generation.inputs import Conditioning
from flux_lora.request import Mode, PipelineKey, Request
from flux_lora.weights.store import DEV_DIR, SCHNELL_DIR

if TYPE_CHECKING:
    from flux_lora.generation.memory import Residency

log = logging.getLogger(__name__)


def quiet_loading_bars() -> None:
    """diffusers' and transformers' loading bars off (and with them huggingface_hub's): setup logs, cog's
    /health-check and a container's output, are read as text, and tqdm redraws with carriage returns and
    cursor moves. Setup says what it loaded in log lines; denoising draws its own bar (progress.py)."""
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def pick_device(preferred: str | None = None) -> tuple[torch.device, torch.dtype]:
    """CUDA in bf16 when present, else CPU in float32 (bf16 matmuls are slow on most CPUs)."""
    name = preferred or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    return device, torch.bfloat16 if device.type == "cuda" else torch.float32


@dataclass
class Pipelines:
    """The loaded models; `get(key, mode)` picks the entry point for a request."""

    text2img: dict[str, FluxPipeline]
    img2img: dict[str, FluxImg2ImgPipeline]
    inpaint: dict[str, FluxInpaintPipeline]
    device: torch.device
    dtype: torch.dtype
    fast: Pipelines | None = None  # go_fast entry points (fp8 + compile), sharing everything else
    fp8: str = "plain"  # which fp8 the transformers run (fast.Fp8Mode value)
    residency: Residency | None = field(default=None, repr=False)  # a GPU too small for both: the one bf16 slot

    @property
    def transformers(self) -> dict[str, FluxTransformer2DModel]:
        return {name: pipe.transformer for name, pipe in self.text2img.items()}

    def get(self, key: PipelineKey, mode: Mode) -> DiffusionPipeline:
        """The entry point for a request; go_fast covers every mode and size."""
        source = self.fast if key.go_fast and self.fast is not None else self
        table = {Mode.TXT2IMG: source.text2img, Mode.IMG2IMG: source.img2img, Mode.INPAINT: source.inpaint}[mode]
        return table[key.model]


def entry_points(text2img: dict[str, FluxPipeline], device: torch.device, dtype: torch.dtype) -> Pipelines:
    """img2img and inpaint for each text2img pipeline, every component shared through from_pipe.

    The shared VAE decodes a batch one image at a time and large images in tiles, so four 1440x1440
    images never hold the whole batch's decoder activations at once (docs/memory-plan.md).
    """
    pipelines = Pipelines(
        text2img=text2img,
        img2img={name: FluxImg2ImgPipeline.from_pipe(pipe, dtype=dtype) for name, pipe in text2img.items()},
        inpaint={name: FluxInpaintPipeline.from_pipe(pipe, dtype=dtype) for name, pipe in text2img.items()},
        device=device,
        dtype=dtype,
    )
    for table in (pipelines.text2img, pipelines.img2img, pipelines.inpaint):
        for pipe in table.values():
            pipe.set_progress_bar_config(disable=True)
            decode_in_parts(pipe.vae)
    return pipelines


VAE_TILE_MIN_PIXELS = 1024  # images up to 1024 px a side decode whole; tiles (and their seams) only above


def decode_in_parts(vae: torch.nn.Module) -> None:
    """Slicing for batches, tiling above `VAE_TILE_MIN_PIXELS`: the VAE's own threshold is its config's
    `sample_size`, which real checkpoints set to 1024 and the tiny store to 32, so it is set here."""
    vae.enable_slicing()
    vae.enable_tiling()
    vae.tile_sample_min_size = VAE_TILE_MIN_PIXELS
    vae.tile_latent_min_size = VAE_TILE_MIN_PIXELS // 2 ** (len(vae.config.block_out_channels) - 1)


def architecture(store: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """FLUX.1-dev's transformer and CLIP on the meta device (names and shapes, no weights): the store's
    configs where it has them, else the real FLUX.1-dev's. What reading a LoRA needs, without loading 24 GB."""
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(store) / DEV_DIR
    with torch.device("meta"):
        if (folder / "transformer" / "config.json").is_file():
            transformer = FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(folder / "transformer"))
        else:
            transformer = FluxTransformer2DModel(guidance_embeds=True)  # diffusers' defaults are FLUX.1's widths
        if (folder / "text_encoder" / "config.json").is_file():
            config = CLIPTextConfig.from_pretrained(folder / "text_encoder")
        else:  # CLIP ViT-L/14's text tower, as FLUX.1 ships it
            config = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                    num_attention_heads=12, projection_dim=768)
        clip = CLIPTextModel(config)
    return transformer, clip


def load_pipelines(store: Path, device: torch.device, dtype: torch.dtype) -> Pipelines:
    """Load dev from the store, then schnell's transformer and scheduler on top of dev's components."""
    start = time.perf_counter()
    # On an accelerator, safetensors load straight onto it (no host copy of the 33 GB first); shards
    # load in parallel (HF_ENABLE_PARALLEL_LOADING, set in flux_lora/__init__.py).
    device_map = None if device.type == "cpu" else device.type
    dev = FluxPipeline.from_pretrained(store / DEV_DIR, dtype=dtype, device_map=device_map)
    schnell_transformer = FluxTransformer2DModel.from_pretrained(
        store / SCHNELL_DIR, subfolder="transformer", dtype=dtype
    )
    schnell_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(store / SCHNELL_DIR, subfolder="scheduler")
    pipelines = assemble(dev, schnell_transformer, schnell_scheduler, device, dtype)
    log.info("Loaded FLUX.1 dev and schnell on %s (%s) in %.1fs", device, dtype, time.perf_counter() - start)
    return pipelines


def assemble(
    dev: FluxPipeline,
    schnell_transformer: FluxTransformer2DModel | None,
    schnell_scheduler: FlowMatchEulerDiscreteScheduler,
    device: torch.device,
    dtype: torch.dtype,
) -> Pipelines:
    """The six entry points over dev's pipeline and schnell's transformer and scheduler (loaded from the
    store, or built in memory by the benchmark, which may leave schnell out). On a GPU that holds both bf16
    transformers beside their fp8 copies (an H200) both stay on it; on a smaller one they share one GPU slot."""
    from flux_lora.generation.memory import Residency, fits_without_swap, module_bytes

    pipes = {"dev": dev}
    if schnell_transformer is not None:
        pipes["schnell"] = FluxPipeline.from_pipe(
            dev, transformer=schnell_transformer, scheduler=schnell_scheduler, dtype=dtype
        )
    plain = {name: pipe.transformer for name, pipe in pipes.items()}
    residency = None
    if device.type == "cuda" and len(plain) > 1:
        shared = sum(module_bytes(m) for m in (dev.text_encoder, dev.text_encoder_2, dev.vae))
        total = torch.cuda.get_device_properties(device).total_memory
        if not fits_without_swap(sum(module_bytes(t) for t in plain.values()), shared, total):
            residency = Residency(device, plain, resident="dev")
        log.info("bf16 transformers: %s (%.0f GB GPU)", "one GPU slot, swapped" if residency else "all resident",
                 total / 1e9)
    if residency is None and device.type != "cpu":
        for transformer in plain.values():
            transformer.to(device)
    pipelines = entry_points(pipes, device, dtype)
    pipelines.residency = residency
    return pipelines


def load_fast_pipelines(
    pipelines: Pipelines,
    store: Path | None,
    *,
    capability: tuple[int, int] | None = None,
    save_quantized: bool = True,
) -> Pipelines:
    """go_fast: per model an fp8 transformer, all else shared with the plain path. Sets `pipelines.fast`.

    `store` None: the modules were built in memory (the benchmark), so the fp8 copies are quantized
    from them and nothing is saved. Compilation is a later step (`compile_fast_pipelines`), once the
    LoRA slots are in place; the entry points are built here, before it (their `from_pipe` moves
    modules, which a compiled module's parameters no longer allow). Where no fp8 can run, go_fast
    shares the plain transformers, after a logged notice.
    """
    from flux_lora.generation import fast

    start = time.perf_counter()
    device, dtype = pipelines.device, pipelines.dtype
    mode = fast.fp8_mode(device, capability)
    transformers: dict[str, FluxTransformer2DModel] = {}
    ran = set()
    for name, pipe in pipelines.text2img.items():
        if mode is fast.Fp8Mode.NONE:
            ran.add(fast.quantize_transformer(pipe.transformer, mode))  # the notice; nothing changes
            transformers[name] = pipe.transformer
            continue
        if store is None:
            if pipelines.residency is not None:  # quantize a host copy onto the device block by block, as
                pipelines.residency.park(name)  # from the store: never a second bf16 copy on the GPU
            transformer, got = fast.quantized_copy(pipe.transformer, mode, device)
        else:
            source = store / (DEV_DIR if name == "dev" else SCHNELL_DIR)
            config = pipe.transformer.config
            transformer, got = fast.build_fast_transformer(
                lambda config=config: FluxTransformer2DModel.from_config(config).to(dtype),
                lambda source=source: FluxTransformer2DModel.from_pretrained(
                    source, subfolder="transformer", dtype=dtype
                ),
                model=name, store=store, source=source / "transformer", device=device, dtype=dtype, mode=mode,
                save=save_quantized,
            )
        transformers[name] = transformer if got is not fast.Fp8Mode.NONE else pipe.transformer
        ran.add(got)
    if store is None and pipelines.residency is not None:
        pipelines.residency.ensure(next(iter(pipelines.text2img)))  # dev holds the bf16 slot, as after loading
    text2img = {
        name: FluxPipeline.from_pipe(pipe, transformer=transformers[name], dtype=dtype)
        for name, pipe in pipelines.text2img.items()
    }
    result = entry_points(text2img, device, dtype)
    result.fp8 = "+".join(sorted(m.value for m in ran))
    pipelines.fast = result
    log.info("go_fast ready: %s in %.1fs", result.fp8, time.perf_counter() - start)
    return result


def compile_fast_pipelines(
    pipelines: Pipelines,
    store: Path | None,
    backend: str = "inductor",
    sizes: list[tuple[str, str, int]] | None = None,
) -> dict[str, float]:
    """Compile go_fast's transformers, warm every graph up through `generate`, then freeze them.

    Call once the transformers' structure is final (their LoRA slots reserved). The warm-up is real
    requests, one step, latents only: dynamo decides recompiles by guards on exactly what the
    pipelines pass (grad mode, dtypes, `joint_attention_kwargs`, shapes), so a hand-made call would
    warm other graphs. `sizes` (aspect ratio, megapixels, batch): every graph a prediction can need
    (`fast.warmup_sizes`) unless the caller knows it needs fewer (the benchmark's quick run: one size,
    batch 1). Frozen, a transformer never compiles again (`fast.freeze_compiled`). The
    compile cache lives under `store` and is saved for the next cold start. Returns the seconds spent
    compiling (the first call of each model, which traces and builds the graphs) and warming up (the rest);
    each model's are logged as they end (`log_setup_stage`).
    """
    from flux_lora import log_setup_stage
    from flux_lora.generation import fast
    from flux_lora.generation.inputs import prepare_inputs
    from flux_lora.request import build_request

    assert pipelines.fast is not None, "load_fast_pipelines first"
    start = time.perf_counter()
    fast_pipes = pipelines.fast
    sizes = sizes or fast.warmup_sizes()
    tag = f"{fast_pipes.fp8}-{str(pipelines.dtype).removeprefix('torch.')}"
    if store is not None:
        fast.configure_compile_cache(store)
        fast.load_compile_artefacts(store, tag)
    graphs = fast.compiled_graphs()
    for transformer in fast_pipes.transformers.values():
        fast.compile_transformer(transformer, backend=backend)
    seconds = {"compile": 0.0, "warm-up": 0.0}
    for name in fast_pipes.text2img:
        model_seconds = {"compile": 0.0, "warm-up": 0.0}
        for index, (ratio, megapixels, batch) in enumerate(sizes):
            request = build_request(
                prompt="warm-up", model=name, go_fast=True, aspect_ratio=ratio, megapixels=megapixels,
                num_outputs=batch, num_inference_steps=1, seed=0,
            )
            call_start = time.perf_counter()
            generate(fast_pipes, request, prepare_inputs(request), output_type="latent")
            model_seconds["compile" if index == 0 else "warm-up"] += time.perf_counter() - call_start
            if index == 0:
                log_setup_stage("compile", model_seconds["compile"], f"{name} ({backend}, first warm-up call)")
        if len(sizes) > 1:
            log_setup_stage("warm-up", model_seconds["warm-up"], f"{name} ({len(sizes) - 1} more sizes)")
        for stage, value in model_seconds.items():
            seconds[stage] += value
    for name, transformer in fast_pipes.transformers.items():
        fast.freeze_compiled(transformer, name)
    if store is not None and backend == "inductor":
        fast.save_compile_artefacts(store, tag)
    log.info(
        "go_fast compiled (%s) and warmed %d sizes x %d models in %.1fs: %d graphs",
        backend, len(sizes), len(fast_pipes.text2img), time.perf_counter() - start,
        fast.compiled_graphs() - graphs,
    )
    return seconds


def _stop_if_cancelled(pipe: object, step: int, timestep: object, tensors: dict) -> dict:
    """diffusers' per-step callback: where the denoising stage checks the prediction's cancel, between steps."""
    cancel.check()
    return tensors


def generate(pipelines: Pipelines, request: Request, cond: Conditioning, **extra: object) -> list[Image.Image]:
    """Run one batch of `num_outputs` images; the CPU generator makes seeds portable across runs."""
    pipe = pipelines.get(request.key, request.mode)
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
    )
    kwargs.update(extra)
    cancel.check()  # cancelled on the way here: not one step
    kwargs.setdefault("callback_on_step_end", _stop_if_cancelled)
    if request.mode is not Mode.TXT2IMG:
        kwargs.update(image=cond.image, strength=request.prompt_strength)
    if request.mode is Mode.INPAINT:
        kwargs["mask_image"] = cond.mask
    with torch.inference_mode():
        return list(pipe(**kwargs).images)
