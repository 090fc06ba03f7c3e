"""go_fast benchmark: seconds per image, bf16 vs go_fast, with/without a LoRA, switch and warm-up cost.

GPU: real-shape FLUX.1 modules (transformer 19+38 blocks, T5-XXL, CLIP-L, VAE) with random weights
(no download is possible; same shapes, same FLOPs), built on the meta device and materialised on the
GPU. CPU: the tiny store at small sizes (checks the code path, not the speed).

    python scripts/bench.py            # GPU when present, else the tiny store
    python scripts/bench.py --quick    # fewer repeats, no full standard-size warm-up

Times are whole-pipeline `generate()` + saving the image (text encoders, denoising, VAE, PNG/WebP),
i.e. predict() without the safety checker. Baseline: the diffusers FluxPipeline in bf16 in the same run.
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flux_lora import fast  # noqa: E402
from flux_lora.inputs import prepare_inputs  # noqa: E402
from flux_lora.pipelines import entry_points, generate  # noqa: E402
from flux_lora.request import build_request  # noqa: E402

TFLOP_PER_DEV_STEP = 74.0  # FLUX.1-dev transformer, 1024x1024, one step (see NOTES.md)
H100_BF16_TFLOPS, H100_FP8_TFLOPS = 800.0, 1600.0  # measured bf16 matmul; fp8 ~2x


@dataclass
class Row:
    name: str
    seconds: float
    note: str = ""


def _init_random(module: torch.nn.Module, device: torch.device, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """Materialise a meta-device module on `device` with small random weights (deterministic per seed)."""
    module = module.to_empty(device=device)
    gen = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0 if "norm" in name or name.endswith("scale") else 0.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return module.to(dtype).eval()


def real_shape_pipelines(device: torch.device, dtype: torch.dtype, seed: int = 0):
    """dev + schnell FluxPipelines of real FLUX.1 shapes, random weights, the tiny store's tokenizers."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from flux_lora.tiny import dev_scheduler, flux_vae, schnell_scheduler, tiny_clip_tokenizer, tiny_t5_tokenizer

    with torch.device("meta"):
        dev_t = FluxTransformer2DModel(guidance_embeds=True)
        schnell_t = FluxTransformer2DModel(guidance_embeds=False)
        t5 = T5EncoderModel(
            T5Config(
                d_model=4096,
                d_ff=10240,
                d_kv=64,
                num_heads=64,
                num_layers=24,
                vocab_size=32128,
                feed_forward_proj="gated-gelu",
            )
        )
        clip = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                projection_dim=768,
                vocab_size=49408,
            )
        )
        vae = flux_vae((128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)
    with tempfile.TemporaryDirectory() as tmp:
        clip_tok = tiny_clip_tokenizer(Path(tmp))
    dev = FluxPipeline(
        scheduler=dev_scheduler(),
        vae=_init_random(vae, device, dtype, seed),
        tokenizer=clip_tok,
        text_encoder=_init_random(clip, device, dtype, seed),
        tokenizer_2=tiny_t5_tokenizer(),
        text_encoder_2=_init_random(t5, device, dtype, seed),
        transformer=_init_random(dev_t, device, dtype, seed),
    )
    schnell_t = _init_random(schnell_t, torch.device("cpu") if device.type == "cuda" else device, dtype, seed + 1)
    schnell = FluxPipeline.from_pipe(dev, transformer=schnell_t, scheduler=schnell_scheduler())
    return dev, schnell


def tiny_pipelines(device: torch.device, dtype: torch.dtype):
    from flux_lora.pipelines import load_pipelines
    from flux_lora.tiny import make_tiny_store

    store = make_tiny_store(Path(tempfile.mkdtemp()) / "store")
    plain = load_pipelines(store, device, dtype)
    return plain.text2img["dev"], plain.text2img["schnell"]


def random_lora(transformer: torch.nn.Module, seed: int, rank: int) -> dict[str, torch.Tensor]:
    """A peft-format LoRA on every block linear (the widest a real LoRA targets)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in transformer.named_modules():
        if isinstance(m, torch.nn.Linear) and name.split(".", 1)[0] in fast.BLOCK_LISTS:
            out[f"{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=gen) * 0.01
            out[f"{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=gen) * 0.01
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up (allocator, cuDNN plans, lazy compile)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    parser.add_argument("--quick", action="store_true", help="one timed run each; warm only 1024x1024")
    parser.add_argument("--no-compile", action="store_true", help="go_fast without torch.compile")
    parser.add_argument("--lora-rank", type=int, default=16)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("torchao", "torch.utils._pytree", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    torch.set_grad_enabled(False)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    repeats = 1 if args.quick else 2
    size = 1024 if gpu else 256
    rows: list[Row] = []
    workdir = Path(tempfile.mkdtemp())

    start = time.perf_counter()
    dev, schnell = real_shape_pipelines(device, dtype) if gpu else tiny_pipelines(device, dtype)
    rows.append(Row("build modules (random weights)", time.perf_counter() - start))
    plain = entry_points({"dev": dev, "schnell": schnell}, device, dtype)
    if gpu:
        from flux_lora.memory import Residency

        plain.residency = Residency(device, {"dev": dev.transformer, "schnell": schnell.transformer}, "dev")

    def run(model: str, steps: int, go_fast: bool) -> None:
        req = build_request(
            prompt="a photo of a cat",
            model=model,
            num_inference_steps=steps,
            seed=1,
            aspect_ratio="custom",
            width=size,
            height=size,
            go_fast=go_fast,
        )
        from flux_lora.outputs import save_images

        save_images(generate(plain, req, prepare_inputs(req)), "webp", 80)

    # 1. Baseline: the stock diffusers pipeline in bf16, same modules, same run.
    baseline = timed(
        lambda: dev(
            prompt="a photo of a cat",
            height=size,
            width=size,
            num_inference_steps=28,
            guidance_scale=3.5,
            generator=torch.Generator("cpu").manual_seed(1),
        ),
        device,
        repeats,
    )
    rows.append(Row(f"diffusers FluxPipeline {str(dtype)[6:]}, dev 28 steps", baseline, "baseline"))
    rows.append(Row("plain path, dev 28 steps", timed(lambda: run("dev", 28, False), device, repeats)))
    rows.append(
        Row("plain path, schnell 4 steps (bf16 slot switch)", timed(lambda: run("schnell", 4, False), device, repeats))
    )
    if plain.residency is not None:
        rows.append(Row("bf16 slot switch schnell -> dev", plain.residency.ensure("dev"), "host->GPU copy"))

    # 2. go_fast: fp8 copies (same seeds as the plain weights), LoRA-ready, compiled, warmed.
    start = time.perf_counter()
    mode = fast.fp8_mode(device)
    fast_t = {}
    for name, pipe in plain.text2img.items():
        if gpu:
            plain.residency.ensure(name)  # quantize from the GPU copy, block by block
        clone, ran = fast.quantized_copy(pipe.transformer, mode)
        fast_t[name] = clone.to(device)
    rows.append(Row(f"quantize both transformers ({ran.value})", time.perf_counter() - start))
    lora_files = []
    for i in range(2):
        from safetensors.torch import save_file

        path = workdir / f"lora{i}.safetensors"
        save_file({k: v.to(dtype) for k, v in random_lora(fast_t["dev"], 10 + i, args.lora_rank).items()}, path)
        lora_files.append(path)
    from safetensors.torch import load_file

    for t in fast_t.values():
        t.enable_lora_hotswap(target_rank=max(64, args.lora_rank), check_compiled="ignore")
        t.load_lora_adapter(load_file(lora_files[0], device=str(device)), prefix=None, adapter_name="main")
    compile_ = not args.no_compile and (gpu or fast.should_compile(device, None))
    start = time.perf_counter()
    if compile_:
        fast.configure_compile_cache(workdir)
        for name, t in fast_t.items():
            fast.compile_transformer(t)
            shapes = fast.standard_shapes(512 if name == "dev" else 256)
            fast.warm_up(t, shapes[:1] + shapes[-1:] if args.quick else shapes, device, dtype)
    rows.append(Row("compile + warm-up (standard sizes)" if compile_ else "compile: off", time.perf_counter() - start))
    from diffusers import FluxPipeline

    plain.fast = entry_points(
        {n: FluxPipeline.from_pipe(p, transformer=fast_t[n]) for n, p in plain.text2img.items()}, device, dtype
    )
    plain.fast.fp8 = ran.value

    def set_lora(scale: float) -> None:
        for t in fast_t.values():
            t.set_adapters(["main"], [scale])

    set_lora(0.0)
    rows.append(Row("go_fast dev 28 steps, no LoRA", timed(lambda: run("dev", 28, True), device, repeats)))
    rows.append(Row("go_fast schnell 4 steps, no LoRA", timed(lambda: run("schnell", 4, True), device, repeats)))
    set_lora(1.5)
    rows.append(
        Row("go_fast dev 28 steps, one LoRA", timed(lambda: run("dev", 28, True), device, repeats), "target <= 2.5 s")
    )
    rows.append(
        Row(
            "go_fast schnell 4 steps, one LoRA",
            timed(lambda: run("schnell", 4, True), device, repeats),
            "target <= 0.5 s",
        )
    )
    sync(device)
    start = time.perf_counter()
    fast_t["dev"].load_lora_adapter(
        load_file(lora_files[1], device=str(device)), prefix=None, adapter_name="main", hotswap=True
    )
    sync(device)
    rows.append(Row("LoRA switch (cached file, hot-swap)", time.perf_counter() - start, "target <= 0.5 s"))
    rows.append(
        Row(
            "go_fast dev 28 steps after switch",
            timed(lambda: run("dev", 28, True), device, repeats),
            "no recompile expected",
        )
    )

    # 3. Report.
    print(f"\n# go_fast benchmark {time.strftime('%Y-%m-%d')}: {device_name(device)}, {size}x{size}")
    print(
        f"torch {torch.__version__}, {versions()}, python {platform.python_version()}, fp8 {ran.value}, "
        f"compile {'on' if compile_ else 'off'}\n"
    )
    print("| measurement | seconds | note |\n|---|---:|---|")
    for row in rows:
        print(f"| {row.name} | {row.seconds:.3f} | {row.note} |")
    if gpu:
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        print(f"| peak GPU memory allocated | {peak:.1f} GiB | |")
        floor_bf16 = 28 * TFLOP_PER_DEV_STEP / H100_BF16_TFLOPS
        floor_fp8 = 28 * TFLOP_PER_DEV_STEP / H100_FP8_TFLOPS
        got = next(r.seconds for r in rows if r.name.startswith("go_fast dev 28 steps, one LoRA"))
        print(
            f"| compute floor dev 28 steps (bf16 / fp8) | {floor_bf16:.2f} / {floor_fp8:.2f} | "
            f"go_fast+LoRA is {got / floor_fp8:.2f}x the fp8 floor, {got / floor_bf16:.2f}x the bf16 floor |"
        )
    return 0


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'cpu'})"


def versions() -> str:
    import diffusers
    import peft
    import torchao
    import transformers

    return (
        f"diffusers {diffusers.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"torchao {torchao.__version__}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
