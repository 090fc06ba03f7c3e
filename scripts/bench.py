"""Benchmark whole predictions: `Service.predict` on real-shape FLUX.1 (GPU) or the tiny store (CPU).

GPU: FLUX.1 dev and schnell of the real shapes (transformers 19+38 blocks, T5-XXL, CLIP-L, VAE, both
safety checkers) with random weights, built directly in bf16 on the device (no download is possible;
same shapes, same FLOPs), handed to the real `Service` (`Service.from_modules`). Every timed call is
`Service.predict()` itself: request, LoRA cache and adapters, denoising, VAE, safety checkers, WebP.
CPU: the tiny store, compiled with dynamo's eager backend: it proves the code path and counts
recompiles, not speed.

    python scripts/bench.py --quick                  # first: inside one 10-minute GPU command
    python scripts/bench.py --rows 'dev|switch'      # a subset (regular expression on row names)
    python scripts/bench.py --resume                 # after a timeout: go on from the next row

Each row is written to `OUT/bench.jsonl` as it finishes (OUT: --out, else $OUT, else ./bench-out); an
exception or a timeout in one row is recorded in that row. A timeout ends the process (the device
may be in any state); `--resume` skips the rows already recorded. `OUT/bench.md` is the table.
Seconds are medians of the timed repeats, after one untimed call.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import re
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from flux_lora.generation import fast  # noqa: E402
from flux_lora.service import HOTSWAP, Modules, Service  # noqa: E402
from flux_lora.settings import Settings  # noqa: E402

TFLOP_PER_DEV_STEP = 74.0  # FLUX.1-dev transformer, 1024x1024, one step (NOTES.md)
H100_FP8_TFLOPS = 1600.0  # dense fp8 tensor-core peak of an H100 SXM (about twice bf16)
TARGETS = {  # seconds, one H100, whole predict (the GPU issue's targets)
    "dev 28 steps go_fast, one LoRA": 2.5,
    "dev 28 steps bf16, no LoRA": 4.0,
    "schnell 4 steps go_fast, no LoRA": 0.4,
    "LoRA switch: main (cached file)": 0.3,
    "cold start: fp8 dev from the pre-quantized copy": 60.0,
}
NA_ON_CPU = "n/a on cpu"


class RowTimeout(Exception):
    """A row ran past --row-timeout."""


@dataclass
class Result:
    name: str
    seconds: float | None = None
    error: str | None = None
    recompiles: int | None = None
    peak_gib: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)

    def line(self) -> str:
        data = {k: v for k, v in self.__dict__.items() if k != "extra"} | self.extra
        return json.dumps(data)


@dataclass
class Bench:
    """What every row needs: the service, the device, sizes, LoRA references, repeats."""

    service: Service
    modules: Modules
    device: torch.device
    size: int
    repeats: int
    loras: list[str]
    workdir: Path
    results: dict[str, Result] = field(default_factory=dict)

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"

    def inputs(self, model: str, go_fast: bool, lora: str | None = None, **more: object) -> dict:
        """Default inputs (WebP quality 80, safety checker on, one output) at the benchmark's size."""
        return {
            "prompt": "a photo of a cat", "model": model, "go_fast": go_fast, "seed": 1, "aspect_ratio": "custom",
            "width": self.size, "height": self.size, "num_inference_steps": 28 if model == "dev" else 4,
            "output_format": "webp", "output_quality": 80, "replicate_weights": lora, **more,
        }

    def predict(self, inputs: dict) -> list[Path]:
        paths = self.service.predict(**inputs)
        if not paths:
            raise RuntimeError("every image was dropped by the safety checkers")
        return paths

    def median(self, fn: Callable[[], object]) -> float:
        fn()  # untimed: loads a LoRA, moves the bf16 slot, fills allocator pools
        times = []
        for _ in range(self.repeats):
            sync(self.device)
            start = time.perf_counter()
            fn()
            sync(self.device)
            times.append(time.perf_counter() - start)
        return statistics.median(times)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- modules


def _random(module: torch.nn.Module, device: torch.device, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """Materialise a meta-device module in `dtype` on `device` (no fp32 copy first) with small random weights."""
    module = module.to(dtype).to_empty(device=device)
    gen = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0 if "norm" in name or name.endswith("scale") else 0.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return module.eval()


def real_shape_modules(device: torch.device, dtype: torch.dtype) -> Modules:
    """FLUX.1 dev + schnell and both safety checkers of the real shapes, random weights, safe verdicts."""
    from bench_safety import full_size
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from flux_lora.generation.pipelines import assemble
    from flux_lora.generation.tiny import (
        dev_scheduler,
        flux_vae,
        schnell_scheduler,
        tiny_clip_tokenizer,
        tiny_t5_tokenizer,
    )

    with torch.device("meta"):
        dev_t = FluxTransformer2DModel(guidance_embeds=True)
        schnell_t = FluxTransformer2DModel(guidance_embeds=False)
        t5 = T5EncoderModel(T5Config(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
                                     vocab_size=32128, feed_forward_proj="gated-gelu"))
        clip = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                            num_attention_heads=12, projection_dim=768, vocab_size=49408))
        vae = flux_vae((128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)
    with tempfile.TemporaryDirectory() as tmp:
        clip_tokenizer = tiny_clip_tokenizer(Path(tmp))
    dev = FluxPipeline(
        scheduler=dev_scheduler(), vae=_random(vae, device, dtype, 0), tokenizer=clip_tokenizer,
        text_encoder=_random(clip, device, dtype, 1), tokenizer_2=tiny_t5_tokenizer(),
        text_encoder_2=_random(t5, device, dtype, 2), transformer=_random(dev_t, device, dtype, 3),
    )
    schnell = _random(schnell_t, device, dtype, 4).to("cpu")  # random on the GPU (fast), then parked
    pipelines = assemble(dev, schnell, schnell_scheduler(), device, dtype)
    return Modules(pipelines, full_size(device, torch.float16, flag="never"))


def tiny_modules(store: Path, device: torch.device, dtype: torch.dtype) -> Modules:
    from flux_lora.generation.pipelines import load_pipelines
    from flux_lora.generation.safety import SafetyChecker

    return Modules(load_pipelines(store, device, dtype), SafetyChecker.load(store, device, dtype))


def write_loras(service: Service, folder: Path, rank: int, count: int) -> list[Path]:
    """peft-format LoRAs on every block linear of dev (the widest a real LoRA targets)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    transformer = service.pipelines.text2img["dev"].transformer
    linears = {
        name: m for name, m in transformer.named_modules()
        if isinstance(m, torch.nn.Linear) and name.split(".", 1)[0] in fast.BLOCK_LISTS and "lora_" not in name
    }
    paths = []
    for index in range(count):
        gen = torch.Generator().manual_seed(10 + index)
        state = {}
        for name, m in linears.items():
            name = name.removesuffix(".base_layer")
            state[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=gen) * 0.01
            state[f"transformer.{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=gen) * 0.01
        path = folder / f"lora{index}.safetensors"
        save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, path)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- rows


def timed_predict(name: str, model: str, go_fast: bool, lora: bool) -> Callable[[Bench], Result]:
    def row(b: Bench) -> Result:
        inputs = b.inputs(model, go_fast, b.loras[0] if lora else None)
        return Result(name, seconds=b.median(lambda: b.predict(inputs)))

    return row


def diffusers_baseline(b: Bench) -> Result:
    """The stock FluxPipeline call on the same plain modules: denoising and VAE only (no safety, no file)."""
    b.service.use_loras(b.service.request(b.inputs("dev", False)), [])  # dev into the bf16 slot, no adapters
    pipe = b.modules.pipelines.text2img["dev"]

    def call() -> None:
        pipe(prompt="a photo of a cat", height=b.size, width=b.size, num_inference_steps=28, guidance_scale=3.5,
             generator=torch.Generator("cpu").manual_seed(1))

    return Result("diffusers FluxPipeline bf16, dev 28 steps (baseline)", seconds=b.median(call))


def compiled_diffusers_baseline(b: Bench) -> Result:
    """The same stock call with diffusers' own regional compile of the plain transformer (last: it stays so)."""
    name = "diffusers FluxPipeline bf16 compiled, dev 28 steps (baseline)"
    if not b.gpu:
        return Result(name, error=f"{NA_ON_CPU}: inductor on 2 cores takes minutes")
    b.service.use_loras(b.service.request(b.inputs("dev", False)), [])
    pipe = b.modules.pipelines.text2img["dev"]
    pipe.transformer.compile_repeated_blocks(fullgraph=True)

    def call() -> None:
        pipe(prompt="a photo of a cat", height=b.size, width=b.size, num_inference_steps=28, guidance_scale=3.5,
             generator=torch.Generator("cpu").manual_seed(1))

    start = time.perf_counter()
    call()
    compile_seconds = time.perf_counter() - start
    return Result(name, seconds=b.median(call), note=f"first call (compile) {compile_seconds:.1f}s")


def slot_switch(b: Bench) -> Result:
    name = "bf16 slot switch dev <-> schnell"
    residency = b.modules.pipelines.residency
    if residency is None:
        return Result(name, error=f"{NA_ON_CPU}: both transformers stay in memory")
    times = []
    for _ in range(max(2, b.repeats)):
        times.append(residency.ensure("schnell"))
        times.append(residency.ensure("dev"))
    return Result(name, seconds=statistics.median(times), note="host (pinned) -> GPU copy of one bf16 transformer")


def lora_switch(kind: str) -> Callable[[Bench], Result]:
    """Switch through the adapters stage on the compiled go_fast transformer, then predict: recompiles counted."""
    name = f"LoRA switch: {kind}" + (" (cached file)" if kind == "main" else "")

    def row(b: Bench) -> Result:
        service = b.service
        first = b.inputs("dev", True, b.loras[0])
        b.predict(first)  # the starting state: lora0 in main, nothing in extra
        variants = {
            "main": [b.inputs("dev", True, b.loras[1]), first],
            "extra": [b.inputs("dev", True, b.loras[0], extra_lora=b.loras[1]), first],
            "scale only": [b.inputs("dev", True, b.loras[0], lora_scale=0.5), first],
        }[kind]
        graphs, fallbacks = fast.compiled_graphs(), sum(fast.eager_fallbacks.values())
        times = []
        for _ in range(b.repeats):
            for inputs in variants:
                request = service.request(inputs)
                files = service.fetch_loras(request.loras)
                sync(b.device)
                start = time.perf_counter()
                service.use_loras(request, files)
                sync(b.device)
                times.append(time.perf_counter() - start)
                b.predict(inputs)
        recompiles = fast.compiled_graphs() - graphs + sum(fast.eager_fallbacks.values()) - fallbacks
        return Result(name, seconds=statistics.median(times), recompiles=recompiles,
                      note="adapters stage only; a prediction after each switch counts recompiles")

    return row


def slot_cost(b: Bench) -> Result:
    """What the zero-filled LoRA slots of a compiled transformer cost per step: one dev transformer call at
    the benchmark's size with the slots (both at scale 0) and with adapters switched off, both eager."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from flux_lora.request import PipelineKey

    name = "reserved LoRA slots: one dev step (eager)"
    rank = b.service.loras.reserved_rank(PipelineKey("dev", True))
    if rank is None:
        return Result(name, error="no reserved slots: go_fast is not compiled here")
    b.predict(b.inputs("dev", True))  # no LoRA: both slots at scale 0
    transformer = b.service.pipelines.fast.transformers["dev"]
    shape = fast.WarmupShape(1, (b.size // 16) ** 2, 512)
    inputs = fast.dummy_inputs(transformer, shape, b.device, b.modules.pipelines.dtype)
    layers = [m for m in transformer.modules() if isinstance(m, BaseTunerLayer)]

    def call() -> None:
        transformer(**inputs)

    with torch._dynamo.config.patch(disable=True), torch.inference_mode():
        with_slots = b.median(call)
        for layer in layers:
            layer.enable_adapters(False)
        try:
            without = b.median(call)
        finally:
            for layer in layers:
                layer.enable_adapters(True)
    ratio = with_slots / without
    return Result(name, seconds=with_slots, extra={"ratio_vs_no_adapters": round(ratio, 3)},
                  note=f"{ratio:.3f}x the same call without adapters (both slots, rank {rank})")


def determinism(b: Bench) -> Result:
    inputs = b.inputs("dev", True, b.loras[0], output_format="png")
    start = time.perf_counter()
    first, second = (np.asarray(Image.open(b.predict(inputs)[0])).astype(np.int16) for _ in range(2))
    diff = int(np.abs(first - second).max())
    return Result("go_fast determinism (same request twice)", seconds=(time.perf_counter() - start) / 2,
                  note="bit-identical" if diff == 0 else f"largest pixel difference {diff}",
                  extra={"max_pixel_diff": diff})


def compute_floor(b: Bench) -> Result:
    name = "compute floor: dev 28 steps at fp8 peak"
    if not b.gpu:
        return Result(name, error=f"{NA_ON_CPU}: the floor is an H100's")
    floor = 28 * TFLOP_PER_DEV_STEP / H100_FP8_TFLOPS
    got = b.results.get("dev 28 steps go_fast, one LoRA")
    ratio = f"go_fast + LoRA is {got.seconds / floor:.2f}x the floor" if got and got.seconds else ""
    return Result(name, seconds=floor, note=ratio)


def cold_start(b: Bench) -> Result:
    """The fp8 dev transformer read back from a pre-quantized copy on local disk, as a replica's setup does."""
    from diffusers import FluxTransformer2DModel

    transformer = b.service.pipelines.fast.transformers["dev"] if b.service.pipelines.fast else None
    if transformer is None or fast.quantized_linears(transformer) == 0:
        return Result("cold start: fp8 dev from the pre-quantized copy", error="no fp8 here")
    store, source = b.workdir / "store", b.workdir / "store" / "dev-source"
    source.mkdir(parents=True, exist_ok=True)
    (source / "config.json").write_text("{}")  # what the copy's name is fingerprinted from
    state = {k.replace(".base_layer.", "."): v for k, v in transformer.state_dict().items() if "lora_" not in k}
    mode = fast.fp8_mode(b.device)
    path = fast.prequantized_path(store, "dev", mode, b.modules.pipelines.dtype, source)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    sync(b.device)
    start = time.perf_counter()
    loaded, _ = fast.build_fast_transformer(
        lambda: FluxTransformer2DModel.from_config(transformer.config).to(b.modules.pipelines.dtype),
        lambda: None, model="dev", store=store, source=source, device=b.device, dtype=b.modules.pipelines.dtype,
        mode=mode,
    )
    sync(b.device)
    seconds = time.perf_counter() - start
    size = path.stat().st_size / 2**30
    del loaded
    return Result("cold start: fp8 dev from the pre-quantized copy", seconds=seconds, note=f"{size:.1f} GiB read")


ROWS: list[tuple[str, Callable[[Bench], Result], bool]] = [  # (name, row, full run only)
    ("diffusers FluxPipeline bf16, dev 28 steps (baseline)", diffusers_baseline, False),
    ("dev 28 steps bf16, no LoRA", timed_predict("dev 28 steps bf16, no LoRA", "dev", False, False), False),
    ("dev 28 steps bf16, one LoRA", timed_predict("dev 28 steps bf16, one LoRA", "dev", False, True), False),
    ("dev 28 steps go_fast, no LoRA", timed_predict("dev 28 steps go_fast, no LoRA", "dev", True, False), False),
    ("dev 28 steps go_fast, one LoRA", timed_predict("dev 28 steps go_fast, one LoRA", "dev", True, True), False),
    ("schnell 4 steps bf16, no LoRA", timed_predict("schnell 4 steps bf16, no LoRA", "schnell", False, False),
     False),
    ("schnell 4 steps go_fast, no LoRA",
     timed_predict("schnell 4 steps go_fast, no LoRA", "schnell", True, False), False),
    ("bf16 slot switch dev <-> schnell", slot_switch, False),
    ("LoRA switch: main (cached file)", lora_switch("main"), False),
    ("LoRA switch: extra", lora_switch("extra"), False),
    ("LoRA switch: scale only", lora_switch("scale only"), False),
    ("reserved LoRA slots: one dev step (eager)", slot_cost, False),
    ("go_fast determinism (same request twice)", determinism, False),
    ("compute floor: dev 28 steps at fp8 peak", compute_floor, False),
    ("cold start: fp8 dev from the pre-quantized copy", cold_start, False),
    ("diffusers FluxPipeline bf16 compiled, dev 28 steps (baseline)", compiled_diffusers_baseline, True),
]


# --------------------------------------------------------------------------- running


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    def expire(signum: int, frame: object) -> None:
        raise RowTimeout(f"timeout after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_row(name: str, fn: Callable[[], Result], device: torch.device, limit: int) -> Result:
    """One row on its own: its exception or timeout is its result; peak memory is this row's."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with time_limit(limit):
            result = fn()
    except RowTimeout as exc:
        result = Result(name, error=str(exc))
    except Exception as exc:  # recorded, and the next row runs
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        result = Result(name, error=f"{type(exc).__name__}: {first}")
    if device.type == "cuda" and result.peak_gib is None:
        result.peak_gib = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return result


def versions() -> dict[str, str]:
    import diffusers
    import peft
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
           "transformers": transformers.__version__, "peft": peft.__version__}
    try:
        import torchao

        out["torchao"] = torchao.__version__
    except ImportError:
        out["torchao"] = "missing"
    return out


def write_table(out: Path, device_name: str, header: dict) -> Path:
    latest: dict[str, dict] = {}
    for line in (out / "bench.jsonl").read_text().splitlines():
        row = json.loads(line)
        latest[row["name"]] = row
    lines = [
        f"# Benchmark {time.strftime('%Y-%m-%d')}: {device_name}",
        "",
        ", ".join(f"{k} {v}" for k, v in header.items()),
        "",
        "| row | seconds | target | recompiles | peak GiB | note |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for row in latest.values():
        seconds = f"{row['seconds']:.3f}" if row["seconds"] is not None else "-"
        note = row["error"] or row.get("note", "")
        target = TARGETS.get(row["name"])
        lines.append(
            f"| {row['name']} | {seconds} | {'' if target is None else f'<= {target:g}'} | "
            f"{'' if row.get('recompiles') is None else row['recompiles']} | "
            f"{'' if row.get('peak_gib') is None else row['peak_gib']} | {note} |"
        )
    path = out / "bench.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one timed repeat per row, no full-run-only rows")
    parser.add_argument("--rows", default=None, help="regular expression: only rows whose name matches")
    parser.add_argument("--resume", action="store_true", help="skip rows already in OUT/bench.jsonl")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "bench-out"))
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    parser.add_argument("--backend", default=None, help="torch.compile backend (inductor on GPU, eager on CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per row (default 3, --quick 1)")
    parser.add_argument("--row-timeout", type=int, default=300, help="seconds before a row is recorded as timed out")
    parser.add_argument("--lora-rank", type=int, default=16, help="rank of the benchmark's LoRAs (Replicate's default)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_grad_enabled(False)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "bench.jsonl"
    done = set()
    if args.resume and jsonl.exists():
        done = {json.loads(line)["name"] for line in jsonl.read_text().splitlines() if line.strip()}
    elif jsonl.exists():
        jsonl.unlink()
    workdir = Path(tempfile.mkdtemp(prefix="flux-lora-bench-"))
    device_name = torch.cuda.get_device_name(device) if gpu else f"CPU ({platform.machine()}, tiny store)"
    header = {**versions(), "dtype": str(dtype).removeprefix("torch."), "fp8": fast.fp8_mode(device).value,
              "size": 1024 if gpu else 256}
    from gpu_env import describe

    (out / "env.json").write_text(json.dumps(describe(), indent=2))  # versions, GPU, torchao's kernels
    print((out / "env.json").read_text(), flush=True)
    print(f"# {device_name}: " + ", ".join(f"{k} {v}" for k, v in header.items()), flush=True)

    def record(result: Result) -> Result:
        with jsonl.open("a") as f:
            f.write(result.line() + "\n")
        shown = f"{result.seconds:.3f}s" if result.seconds is not None else result.error
        print(f"{result.name}: {shown}" + (f" ({result.note})" if result.note else ""), flush=True)
        return result

    # Setup rows: always run (a resumed run needs the state); a failure here ends the run.
    store = None
    if not gpu:
        from flux_lora.generation.tiny import make_tiny_store

        store = make_tiny_store(workdir / "tiny")
    built: dict[str, Modules] = {}
    setup = record(run_row("setup: build modules", lambda: _build(built, store, device, dtype), device, 900))
    if setup.error:
        write_table(out, device_name, header)
        return 1
    settings = replace(
        Settings.from_env(), weights_dir=workdir / "store", cache_dir=workdir / "cache", compile=True,
        compile_backend=args.backend or ("inductor" if gpu else "eager"), local_lora_dirs=(workdir / "loras",),
    )
    holder: dict[str, Service] = {}
    graphs_before = fast.compiled_graphs()
    made = record(run_row("setup: Service (fp8, slots, compile, warm-up)",
                          lambda: _service(holder, built["modules"], settings), device, 1800))
    if made.error:
        write_table(out, device_name, header)
        return 1
    service = holder["service"]
    for stage in ("compile", "warm-up"):
        record(Result(f"setup: {stage}", seconds=service.setup_seconds.get(stage),
                      error=None if stage in service.setup_seconds else "not compiled",
                      recompiles=fast.compiled_graphs() - graphs_before if stage == "compile" else None))
    if gpu:
        record(Result("resident GPU memory after setup", note="allocated, in peak_gib",
                      peak_gib=round(torch.cuda.memory_allocated(device) / 2**30, 2)))
    else:
        record(Result("resident GPU memory after setup", error=f"{NA_ON_CPU}: no GPU memory"))
    loras = [str(p) for p in write_loras(service, workdir / "loras", args.lora_rank, 2)]
    bench = Bench(service, built["modules"], device, size=1024 if gpu else 256,
                  repeats=args.repeats or (1 if args.quick else 3), loras=loras, workdir=workdir)

    pattern = re.compile(args.rows) if args.rows else None
    for name, fn, full_only in ROWS:
        if name in done or (full_only and args.quick) or (pattern and not pattern.search(name)):
            continue
        result = record(run_row(name, lambda fn=fn: fn(bench), device, args.row_timeout))
        bench.results[name] = result
        if result.error and result.error.startswith("timeout"):
            write_table(out, device_name, header)
            print("a row timed out: the process ends; --resume goes on from the next row", flush=True)
            return 3
    table = write_table(out, device_name, header)
    print(table.read_text())
    return 0


def _build(built: dict[str, Modules], store: Path | None, device: torch.device, dtype: torch.dtype) -> Result:
    start = time.perf_counter()
    built["modules"] = real_shape_modules(device, dtype) if store is None else tiny_modules(store, device, dtype)
    return Result("setup: build modules", seconds=time.perf_counter() - start,
                  note="real shapes, random weights" if store is None else "tiny store")


def _service(holder: dict[str, Service], modules: Modules, settings: Settings) -> Result:
    start = time.perf_counter()
    holder["service"] = Service.from_modules(HOTSWAP, settings, modules)
    seconds = time.perf_counter() - start
    return Result("setup: Service (fp8, slots, compile, warm-up)", seconds=seconds,
                  note=", ".join(f"{k} {v:.1f}s" for k, v in holder["service"].setup_seconds.items()))


if __name__ == "__main__":
    raise SystemExit(main())
