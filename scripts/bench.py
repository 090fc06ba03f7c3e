"""Benchmark whole predictions: `Service.predict` on real-shape FLUX.1 (GPU) or the tiny store (CPU).

GPU: FLUX.1 dev and schnell of the real shapes (transformers 19+38 blocks, T5-XXL, CLIP-L, VAE, both
safety checkers) with random weights, built directly in bf16 on the device (no download is possible;
same shapes, same FLOPs), handed to the real `Service` (`Service.from_modules`). Every timed call is
`Service.predict()` itself: request, LoRA cache and adapters, denoising, VAE, safety checkers, WebP.
CPU: the tiny store, compiled with dynamo's eager backend behind a counter of compiled-graph calls: it
proves the code path and counts recompiles, not speed.

    bash scripts/gpu_first_call.sh                   # the first GPU call: --quick --aten-gemm --budget 540
    python scripts/bench.py --rows 'dev|switch'      # a subset (regular expression on row names)
    python scripts/bench.py --resume                 # after a timeout: go on from the next row

Rows run in order of value (ROWS), so a run cut short by `--budget` loses the least: rows not started
by then are recorded as "skipped: budget". Each setup stage prints its seconds as it ends. Each row is
written to `OUT/bench.jsonl` as it finishes (OUT: --out, else $OUT, else ./bench-out); an exception in
one row is that row's error. A row past its time limit ends the process (the device may be in any
state); `--resume` skips the rows already recorded. `OUT/bench.md` is the table, `OUT/env.json` the
environment and the go_fast mode that ran. Seconds are medians of the timed repeats, after one untimed call.
"""

from __future__ import annotations

import time

STARTED = time.monotonic()  # --budget counts from here, before the imports of torch and diffusers (~20 s)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass, field, replace  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from flux_lora import SETUP_LOGGER, log_setup_stage  # noqa: E402
from flux_lora.generation import fast  # noqa: E402
from flux_lora.lora.adapters import adapters_bypassed  # noqa: E402
from flux_lora.service import HOTSWAP, Modules, Service  # noqa: E402
from flux_lora.settings import Settings  # noqa: E402

TFLOP_PER_DEV_STEP = 74.0  # FLUX.1-dev transformer, 1024x1024, one step (NOTES.md)
# Dense (no sparsity) fp8 tensor-core peaks, TFLOP/s, from NVIDIA's datasheets; the first name found in the
# device's name wins, so the variants come before the plain names. Other GPUs: the floor is "unknown".
FP8_DENSE_TFLOPS = (
    ("H100 PCIe", 1513.0), ("H100 NVL", 1671.0), ("H200 NVL", 1671.0), ("H100", 1979.0), ("H200", 1979.0),
)
TARGETS = {  # seconds, one H100, whole predict (the GPU issue's targets)
    "dev 28 steps go_fast, one LoRA": 2.5,
    "dev 28 steps bf16, no LoRA": 4.0,
    "schnell 4 steps go_fast, no LoRA": 0.4,
    "LoRA switch: main (cached file)": 0.3,
    "cold start: fp8 dev from the pre-quantized copy": 60.0,
}
NA_ON_CPU = "n/a on cpu"
SKIPPED = "skipped: budget"
# A row started just before --budget may run this long: the 600 s device command, less the default
# budget of 540 s, less the seconds that writing the table and leaving take.
LAST_ROW_GRACE = 45
SETUP_STAGES = ("build", "pin", "quantize", "reserve", "compile", "warm-up")
COUNTING_BACKEND = "counting"  # dynamo's eager backend behind a call counter (the CPU default)

graph_calls: Counter[str] = Counter()  # calls of graphs compiled by COUNTING_BACKEND


def counting_backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
    """Run each compiled graph as dynamo's eager backend does, counting its calls: proof of which rows ran
    compiled graphs and which did not (the adapter-cost row must not)."""

    def run(*args: object) -> object:
        graph_calls["calls"] += 1
        return gm.forward(*args)

    return run


if COUNTING_BACKEND not in torch._dynamo.list_backends(exclude_tags=()):  # once per process
    torch._dynamo.register_backend(counting_backend, name=COUNTING_BACKEND)


class RowTimeout(Exception):
    """A row ran past its time limit (--row-timeout, or the budget's end)."""


@dataclass
class Result:
    name: str = ""
    seconds: float | None = None
    error: str | None = None
    recompiles: int | None = None  # graphs compiled + eager fallbacks while the row ran (must be 0 after setup)
    graph_calls: int | None = None  # compiled-graph calls while the row ran (counting backend only)
    peak_gib: float | None = None
    go_fast: str | None = None  # the fp8 mode and compile backend that ran, on go_fast rows
    modeled: float | None = None  # seconds a cost model expects (--modeled)
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
    fp8_peak: float | None = None
    steps: int | None = None  # --steps: every prediction's denoising steps (the CPU test's shortcut)
    results: dict[str, Result] = field(default_factory=dict)

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"

    def steps_for(self, model: str) -> int:
        """The denoising steps the row names (dev 28, schnell 4) unless --steps says otherwise."""
        return self.steps or (28 if model == "dev" else 4)

    def inputs(self, model: str, go_fast: bool, lora: str | None = None, **more: object) -> dict:
        """Default inputs (WebP quality 80, safety checker on, one output) at the benchmark's size."""
        return {
            "prompt": "a photo of a cat", "model": model, "go_fast": go_fast, "seed": 1, "aspect_ratio": "custom",
            "width": self.size, "height": self.size, "num_inference_steps": self.steps_for(model),
            "output_format": "webp", "output_quality": 80, "replicate_weights": lora, **more,
        }

    def use_loras(self, inputs: dict) -> float:
        """The weights and adapters stages alone for these inputs (no prediction); seconds of the adapters stage."""
        request = self.service.request(inputs)
        files = self.service.fetch_loras(request.loras)
        sync(self.device)
        start = time.perf_counter()
        self.service.use_loras(request, files)
        sync(self.device)
        return time.perf_counter() - start

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


def fp8_peak(device_name: str) -> float | None:
    """The dense fp8 peak of the GPU named `device_name`, TFLOP/s; None when it is not in the table."""
    return next((tflops for kind, tflops in FP8_DENSE_TFLOPS if kind in device_name), None)


def fp8_error(ran: str, intended: fast.Fp8Mode) -> str | None:
    """A go_fast row that ran another fp8 than this device supports (a quantization that fell back to plain
    weights, say) timed another path: that is its error. On compute capability >= 8.9: fp8-dynamic or error."""
    if ran == intended.value:
        return None
    return f"go_fast ran {ran}, not {intended.value} as this device supports"


# --------------------------------------------------------------------------- modules


@dataclass(frozen=True)
class Shapes:
    """The architectures of the benchmark's modules: FLUX.1's real ones (`REAL`), or tiny widths (tests)."""

    transformer: dict  # FluxTransformer2DModel keyword arguments (its defaults are FLUX.1's)
    t5: dict  # T5Config
    clip: dict  # CLIPTextConfig
    vae: dict  # flux_vae

    def build(self, models: tuple[str, ...]) -> dict[str, nn.Module]:
        """The modules, built as their classes build them: VAE, CLIP, T5, then the FLUX transformers in `models`."""
        from diffusers import FluxTransformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

        from flux_lora.generation.tiny import flux_vae

        parts: dict[str, nn.Module] = {
            "vae": flux_vae(**self.vae),
            "clip": CLIPTextModel(CLIPTextConfig(**self.clip)),
            "t5": T5EncoderModel(T5Config(**self.t5)),
        }
        for model in models:
            parts[model] = FluxTransformer2DModel(guidance_embeds=model == "dev", **self.transformer)
        return parts


REAL = Shapes(
    transformer={},
    t5=dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
            feed_forward_proj="gated-gelu"),
    clip=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, vocab_size=49408),
    vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32),
)
SEEDS = {"vae": 0, "clip": 1, "t5": 2, "dev": 3, "schnell": 4}


def _random(module: nn.Module, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    """Materialise a module built under `init_empty_weights` (parameters on the meta device, buffers real) in
    `dtype` on `device`, no fp32 copy first: small random weights; every buffer keeps the value its class
    gave it (CLIP's position ids: `to_empty` alone would leave them uninitialised)."""
    module = module.to(dtype)  # meta parameters cost nothing; floating buffers cast as from_pretrained casts them
    buffers = {name: b.clone() for name, b in module.named_buffers(remove_duplicate=False)}
    module = module.to_empty(device=device)
    gen = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, value in buffers.items():
            module.get_buffer(name).copy_(value)
        for name, p in module.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0 if "norm" in name or name.endswith("scale") else 0.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return module.eval()


def real_shape_components(
    models: tuple[str, ...], device: torch.device, dtype: torch.dtype, shapes: Shapes = REAL
) -> dict[str, nn.Module]:
    """`shapes.build(models)` with random weights made straight on `device` in `dtype` (seconds, where
    initialising 40 GB on a CPU would take minutes)."""
    from accelerate import init_empty_weights

    with init_empty_weights():  # parameters on the meta device; buffers built for real
        parts = shapes.build(models)
    return {name: _random(module, device, dtype, SEEDS[name]) for name, module in parts.items()}


def real_shape_modules(device: torch.device, dtype: torch.dtype, models: tuple[str, ...]) -> Modules:
    """FLUX.1 dev (+ schnell when in `models`) and both safety checkers of the real shapes, random weights,
    safe verdicts."""
    from bench_safety import full_size
    from diffusers import FluxPipeline

    from flux_lora.generation.pipelines import assemble
    from flux_lora.generation.tiny import dev_scheduler, schnell_scheduler, tiny_clip_tokenizer, tiny_t5_tokenizer

    parts = real_shape_components(models, device, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        clip_tokenizer = tiny_clip_tokenizer(Path(tmp))
    dev = FluxPipeline(
        scheduler=dev_scheduler(), vae=parts["vae"], tokenizer=clip_tokenizer, text_encoder=parts["clip"],
        tokenizer_2=tiny_t5_tokenizer(), text_encoder_2=parts["t5"], transformer=parts["dev"],
    )
    # assemble decides where schnell's bf16 transformer lives (beside dev's, or parked in host memory)
    pipelines = assemble(dev, parts.get("schnell"), schnell_scheduler(), device, dtype)
    return Modules(pipelines, full_size(device, torch.float16, flag="never"))


def tiny_modules(store: Path, device: torch.device, dtype: torch.dtype) -> Modules:
    """The tiny store as the service loads it (both models: loading them takes a fraction of a second)."""
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


def timed_predict(model: str, go_fast: bool, lora: bool) -> Callable[[Bench], Result]:
    def row(b: Bench) -> Result:
        inputs = b.inputs(model, go_fast, b.loras[0] if lora else None)
        return Result(seconds=b.median(lambda: b.predict(inputs)))

    return row


def _stock_call(b: Bench) -> Callable[[], None]:
    """The stock FluxPipeline call on the plain dev modules (dev in the bf16 slot, no adapters)."""
    b.service.use_loras(b.service.request(b.inputs("dev", False)), [])
    pipe = b.modules.pipelines.text2img["dev"]

    def call() -> None:
        pipe(prompt="a photo of a cat", height=b.size, width=b.size, num_inference_steps=b.steps_for("dev"),
             guidance_scale=3.5, generator=torch.Generator("cpu").manual_seed(1))

    return call


def diffusers_baseline(b: Bench) -> Result:
    """The stock FluxPipeline call on the same plain modules: denoising and VAE only (no safety, no file)."""
    return Result(seconds=b.median(_stock_call(b)))


def compiled_diffusers_baseline(b: Bench) -> Result:
    """The same stock call with diffusers' own regional compile of the plain transformer (last: it stays so)."""
    if not b.gpu:
        return Result(error=f"{NA_ON_CPU}: inductor on 2 cores takes minutes")
    call = _stock_call(b)
    b.modules.pipelines.text2img["dev"].transformer.compile_repeated_blocks(fullgraph=True)
    start = time.perf_counter()
    call()
    compile_seconds = time.perf_counter() - start
    return Result(seconds=b.median(call), note=f"first call (compile) {compile_seconds:.1f}s")


def slot_switch(b: Bench) -> Result:
    residency = b.modules.pipelines.residency
    if residency is None:
        where = NA_ON_CPU if not b.gpu else "n/a"
        return Result(error=f"{where}: both bf16 transformers stay on the device (no host swap)")
    times = []
    for _ in range(max(2, b.repeats)):
        times.append(residency.ensure("schnell"))
        times.append(residency.ensure("dev"))
    return Result(seconds=statistics.median(times), note="host (pinned) -> GPU copy of one bf16 transformer")


def lora_switch(kind: str) -> Callable[[Bench], Result]:
    """Switch through the adapters stage on the compiled go_fast transformer, then predict after each switch:
    the row's `recompiles` must stay 0."""

    def row(b: Bench) -> Result:
        first = b.inputs("dev", True, b.loras[0])
        b.predict(first)  # the starting state: lora0 in main, nothing in extra
        variants = {
            "main": [b.inputs("dev", True, b.loras[1]), first],
            "extra": [b.inputs("dev", True, b.loras[0], extra_lora=b.loras[1]), first],
            "scale only": [b.inputs("dev", True, b.loras[0], lora_scale=0.5), first],
        }[kind]
        times = []
        for _ in range(b.repeats):
            for inputs in variants:
                times.append(b.use_loras(inputs))
                b.predict(inputs)
        return Result(seconds=statistics.median(times),
                      note="adapters stage only; a prediction after each switch counts recompiles")

    return row


def adapter_cost(b: Bench) -> Result:
    """What the go_fast transformer's LoRA adapters cost per step: one dev transformer call at the benchmark's
    size with one LoRA in place, and the same call with the adapters bypassed. Both run the same way, eagerly:
    past the compiled transformer's recompile guard (`fast.unguarded_forward`) under the `force_eager` stance,
    so no compiled graph runs and no eager fallback is counted; the layers' state is restored after."""
    fast_pipes = b.service.pipelines.fast
    if fast_pipes is None:
        return Result(error="no go_fast transformer")
    transformer = fast_pipes.transformers["dev"]
    b.use_loras(b.inputs("dev", True, b.loras[0]))  # one LoRA in place, as a request leaves it
    forward = fast.unguarded_forward(transformer)
    shape = fast.WarmupShape(1, (b.size // 16) ** 2, 512)
    inputs = fast.dummy_inputs(transformer, shape, b.device, b.modules.pipelines.dtype)

    def call() -> None:
        forward(**inputs)

    with torch.compiler.set_stance("force_eager"), torch.inference_mode():
        with_adapters = b.median(call)
        with adapters_bypassed(transformer):
            without = b.median(call)
    ratio = with_adapters / without
    overhead_ms = (with_adapters - without) * 1e3
    return Result(seconds=with_adapters,
                  extra={"without_adapters_s": without, "ratio_vs_bypassed": round(ratio, 3),
                         "overhead_ms": round(overhead_ms, 2)},
                  note=f"eager; {ratio:.3f}x the same call with adapters bypassed ({overhead_ms:+.1f} ms)")


def determinism(b: Bench) -> Result:
    inputs = b.inputs("dev", True, b.loras[0], output_format="png")
    start = time.perf_counter()
    first, second = (np.asarray(Image.open(b.predict(inputs)[0])).astype(np.int16) for _ in range(2))
    diff = int(np.abs(first - second).max())
    return Result(seconds=(time.perf_counter() - start) / 2,
                  note="bit-identical" if diff == 0 else f"largest pixel difference {diff}",
                  extra={"max_pixel_diff": diff})


def compute_floor(b: Bench) -> Result:
    if not b.gpu:
        return Result(error=f"{NA_ON_CPU}: the floor is a GPU's")
    if b.fp8_peak is None:
        return Result(error=f"unknown: no dense fp8 peak recorded for {torch.cuda.get_device_name(b.device)}")
    floor = b.steps_for("dev") * TFLOP_PER_DEV_STEP / b.fp8_peak
    got = b.results.get("dev 28 steps go_fast, one LoRA")
    ratio = f"go_fast + LoRA is {got.seconds / floor:.2f}x the floor" if got and got.seconds else ""
    return Result(seconds=floor, note=f"at {b.fp8_peak:g} TFLOP/s; {ratio}".rstrip("; "))


def cold_start(b: Bench) -> Result:
    """The fp8 dev transformer read back from a pre-quantized copy on local disk, as a replica's setup does."""
    from diffusers import FluxTransformer2DModel

    transformer = b.service.pipelines.fast.transformers["dev"] if b.service.pipelines.fast else None
    if transformer is None or fast.quantized_linears(transformer) == 0:
        return Result(error="no fp8 here")
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
    return Result(seconds=seconds, note=f"{size:.1f} GiB read")


@dataclass(frozen=True)
class Row:
    """One benchmark row: what it runs, the FLUX models it needs built, whether it runs go_fast."""

    name: str
    run: Callable[[Bench], Result]
    models: tuple[str, ...] = ("dev",)
    go_fast: bool = False  # its result shows the fp8 mode and backend that ran, and fails on the wrong mode
    full_only: bool = False  # not in --quick


ADAPTER_COST = "adapter cost: one dev step, one LoRA vs bypassed (eager)"
ROWS: list[Row] = [  # in order of value: a run cut short by --budget keeps the first ones
    Row("dev 28 steps go_fast, one LoRA", timed_predict("dev", True, True), go_fast=True),
    Row("compute floor: dev 28 steps at fp8 peak", compute_floor, models=()),
    Row("LoRA switch: main (cached file)", lora_switch("main"), go_fast=True),
    Row("schnell 4 steps go_fast, no LoRA", timed_predict("schnell", True, False), ("schnell",), go_fast=True),
    Row(ADAPTER_COST, adapter_cost, go_fast=True),
    Row("dev 28 steps go_fast, no LoRA", timed_predict("dev", True, False), go_fast=True),
    Row("LoRA switch: extra", lora_switch("extra"), go_fast=True),
    Row("LoRA switch: scale only", lora_switch("scale only"), go_fast=True),
    Row("dev 28 steps bf16, no LoRA", timed_predict("dev", False, False)),
    Row("dev 28 steps bf16, one LoRA", timed_predict("dev", False, True)),
    Row("schnell 4 steps bf16, no LoRA", timed_predict("schnell", False, False), ("schnell",)),
    Row("bf16 slot switch dev <-> schnell", slot_switch, ("dev", "schnell")),
    Row("diffusers FluxPipeline bf16, dev 28 steps (baseline)", diffusers_baseline),
    Row("go_fast determinism (same request twice)", determinism, go_fast=True),
    Row("cold start: fp8 dev from the pre-quantized copy", cold_start, go_fast=True),
    Row("diffusers FluxPipeline bf16 compiled, dev 28 steps (baseline)", compiled_diffusers_baseline,
        full_only=True),
]


def select_rows(quick: bool, pattern: str | None, done: set[str]) -> list[Row]:
    """ROWS in their order, less the full run's own under --quick, those not matching --rows, those done."""
    regex = re.compile(pattern) if pattern else None
    return [
        row for row in ROWS
        if row.name not in done and not (quick and row.full_only) and not (regex and not regex.search(row.name))
    ]


def needed_models(rows: list[Row]) -> tuple[str, ...]:
    """The FLUX models to build: dev always (the service's text encoders and VAE are dev's), schnell if a row
    needs it."""
    wanted = {"dev"} | {model for row in rows for model in row.models}
    return tuple(model for model in ("dev", "schnell") if model in wanted)


# --------------------------------------------------------------------------- running


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    def expire(signum: int, frame: object) -> None:
        raise RowTimeout(f"timeout after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(max(1, seconds))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"


def run_row(name: str, fn: Callable[[], Result], device: torch.device, limit: int) -> Result:
    """One row on its own: its exception or timeout is its result; peak memory, graphs compiled and eager
    fallbacks (`recompiles`) and compiled-graph calls are this row's."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    graphs, fallbacks, calls = fast.compiled_graphs(), sum(fast.eager_fallbacks.values()), graph_calls["calls"]
    try:
        with time_limit(limit):
            result = fn()
    except RowTimeout as exc:
        result = Result(error=str(exc))
    except Exception as exc:  # recorded, and the next row runs
        result = Result(error=_first_line(exc))
    result.name = name
    if result.recompiles is None:
        result.recompiles = fast.compiled_graphs() - graphs + sum(fast.eager_fallbacks.values()) - fallbacks
    if graph_calls["calls"] or calls:  # the counting backend ran: its count is this row's
        result.graph_calls = graph_calls["calls"] - calls
    if device.type == "cuda" and result.peak_gib is None:
        result.peak_gib = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return result


def run_rows(rows: list[Row], run: Callable[[Row, int], Result], elapsed: Callable[[], float], budget: float,
             row_timeout: int) -> Iterator[Result]:
    """Each row in order, given at most `row_timeout` seconds and no more than the budget's end plus
    LAST_ROW_GRACE; a row not started within `budget` seconds is "skipped: budget"."""
    for row in rows:
        now = elapsed()
        if now >= budget:
            yield Result(row.name, error=SKIPPED, note=f"not started by {budget:.0f} s")
            continue
        yield run(row, int(min(row_timeout, budget + LAST_ROW_GRACE - now)))


def start_service(make: Callable[[str], Service], backend: str) -> tuple[Service, str, str | None]:
    """The service compiled with `backend`; if that setup fails (an inductor or Triton fault), once more with
    dynamo's eager backend, so the rows still run: returns the service, the backend it runs and the failure."""
    try:
        return make(backend), backend, None
    except (RowTimeout, torch.OutOfMemoryError):
        raise  # eager would fail the same way, later
    except Exception as exc:
        if backend == "eager":
            raise
        failure = _first_line(exc)
        print(f"setup with {backend} failed ({failure}); setting up again with the eager backend", flush=True)
        return make("eager"), "eager", failure


class SetupLines(logging.Handler):
    """Prints each setup stage as it ends (flushed) and keeps its seconds for the setup rows."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seconds: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        stage = getattr(record, "stage", None)
        if stage is None:
            return
        self.seconds[stage] = self.seconds.get(stage, 0.0) + record.seconds
        print(record.getMessage(), flush=True)


def load_modeled(path: Path | None, device_name: str) -> dict[str, float]:
    """Modeled seconds by row name, for the table's "modeled" column beside the measured ones: a JSON object
    {row name: seconds} or {row name: {GPU: seconds}}, GPU a part of the device's name ("H100", "H200").
    A cost model (scripts/roofline.py) writes it; the benchmark models nothing itself."""
    if path is None:
        return {}
    out = {}
    for name, value in json.loads(path.read_text()).items():
        if isinstance(value, dict):
            value = next((v for gpu, v in value.items() if gpu in device_name), None)
        if value is not None:
            out[name] = float(value)
    return out


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
        "| row | seconds | modeled | target | go_fast | recompiles | peak GiB | note |",
        "|---|---:|---:|---:|---|---:|---:|---|",
    ]

    def cell(value: object) -> str:
        return "" if value is None else str(value)

    for row in latest.values():
        seconds = f"{row['seconds']:.3f}" if row["seconds"] is not None else "-"
        modeled = f"{row['modeled']:.3f}" if row.get("modeled") is not None else ""
        note = "; ".join(x for x in (row["error"], row.get("note", "")) if x)
        target = TARGETS.get(row["name"])
        lines.append(
            f"| {row['name']} | {seconds} | {modeled} | {'' if target is None else f'<= {target:g}'} | "
            f"{cell(row.get('go_fast'))} | {cell(row.get('recompiles'))} | {cell(row.get('peak_gib'))} | {note} |"
        )
    path = out / "bench.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="one timed repeat per row, no full-run-only rows, warm-up at one size (batch 1)")
    parser.add_argument("--rows", default=None, help="regular expression: only rows whose name matches")
    parser.add_argument("--resume", action="store_true", help="skip rows already in OUT/bench.jsonl")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "bench-out"))
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    parser.add_argument("--backend", default=None,
                        help=f"torch.compile backend (inductor on GPU, {COUNTING_BACKEND} on CPU)")
    parser.add_argument("--aten-gemm", action="store_true",
                        help="TORCHINDUCTOR_MAX_AUTOTUNE_GEMM_BACKENDS=ATEN: no Triton autotuning of the fp8 GEMMs")
    parser.add_argument("--budget", type=float, default=540.0,
                        help="seconds from the start: rows not started by then are 'skipped: budget'")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per row (default 3, --quick 1)")
    parser.add_argument("--row-timeout", type=int, default=300, help="seconds before a row is recorded as timed out")
    parser.add_argument("--steps", type=int, default=None,
                        help="denoising steps of every prediction, whatever the row's name says (CPU test: 2)")
    parser.add_argument("--lora-rank", type=int, default=16, help="rank of the benchmark's LoRAs (Replicate's default)")
    parser.add_argument("--modeled", type=Path, default=None,
                        help="JSON of modeled seconds by row name (a cost model's): the table's 'modeled' column")
    args = parser.parse_args(argv)

    def elapsed() -> float:
        return time.monotonic() - STARTED

    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stdout)
    setup_lines = SetupLines()
    setup_log = logging.getLogger(SETUP_LOGGER)
    setup_log.setLevel(logging.INFO)
    setup_log.addHandler(setup_lines)
    setup_log.propagate = False
    torch.set_grad_enabled(False)
    import torch._inductor.config as inductor_config

    if args.aten_gemm:  # the variable is read when inductor's config is imported, so the config is set too
        os.environ["TORCHINDUCTOR_MAX_AUTOTUNE_GEMM_BACKENDS"] = "ATEN"
        inductor_config.max_autotune_gemm_backends = "ATEN"

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    backend = args.backend or ("inductor" if gpu else COUNTING_BACKEND)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "bench.jsonl"
    done = set()
    if args.resume and jsonl.exists():
        done = {json.loads(line)["name"] for line in jsonl.read_text().splitlines() if line.strip()}
    elif jsonl.exists():
        jsonl.unlink()
    rows = select_rows(args.quick, args.rows, done)
    models = needed_models(rows)
    workdir = Path(tempfile.mkdtemp(prefix="flux-lora-bench-"))
    device_name = torch.cuda.get_device_name(device) if gpu else f"CPU ({platform.machine()}, tiny store)"
    intended = fast.fp8_mode(device)
    peak = fp8_peak(device_name) if gpu else None
    header = {**versions(), "dtype": str(dtype).removeprefix("torch."), "fp8": f"{intended.value} (intended)",
              "compile": backend, "gemm backends": inductor_config.max_autotune_gemm_backends,
              "size": 1024 if gpu else 256, "fp8 peak": f"{peak:g} TFLOP/s" if peak else "unknown" if gpu else "n/a",
              "budget": f"{args.budget:g} s"}
    if args.steps:
        header["steps"] = f"{args.steps} in every prediction (--steps; row names say the real counts)"
    from gpu_env import describe

    env = describe()  # versions, GPU, torchao's kernels
    (out / "env.json").write_text(json.dumps(env, indent=2))
    print(json.dumps(env, indent=2), flush=True)
    print(f"# {device_name}: " + ", ".join(f"{k} {v}" for k, v in header.items()), flush=True)
    print(f"rows: {len(rows)}; models built: {', '.join(models)}", flush=True)
    modeled = load_modeled(args.modeled, device_name)

    def record(result: Result) -> Result:
        if result.modeled is None:
            result.modeled = modeled.get(result.name)
        with jsonl.open("a") as f:
            f.write(result.line() + "\n")
        shown = f"{result.seconds:.3f}s" if result.seconds is not None else result.error
        print(f"row {result.name}: {shown}" + (f" ({result.note})" if result.note else ""), flush=True)
        return result

    def end(code: int) -> int:
        table = write_table(out, device_name, header)
        print(table.read_text(), flush=True)
        return code

    # Setup: always (a resumed run needs the state), inside the budget's end; a failure here ends the run.
    built: dict[str, Modules] = {}
    holder: dict[str, tuple[Service, str, str | None]] = {}
    settings = replace(
        Settings.from_env(), weights_dir=workdir / "store", cache_dir=workdir / "cache", compile=True,
        compile_backend=backend, local_lora_dirs=(workdir / "loras",),
    )
    warmup = fast.warmup_sizes()[:1] if args.quick else None  # --quick: the one graph its rows run (batch 1)

    def build() -> None:
        start = time.perf_counter()
        if gpu:
            built["modules"] = real_shape_modules(device, dtype, models)
            what = f"real shapes, random weights: {', '.join(models)}"
        else:
            from flux_lora.generation.tiny import make_tiny_store

            built["modules"] = tiny_modules(make_tiny_store(workdir / "tiny"), device, dtype)
            what = "tiny store"
        log_setup_stage("build", time.perf_counter() - start, what)

    def make(compile_backend: str) -> Service:
        modules = built["modules"]
        if modules.pipelines.fast is not None:  # a failed attempt's compiled copies: gone before the next
            modules.pipelines.fast = None
            torch._dynamo.reset()
            gc.collect()
            if gpu:
                torch.cuda.empty_cache()
        return Service.from_modules(HOTSWAP, replace(settings, compile_backend=compile_backend), modules,
                                    warmup=warmup)

    graphs_before = fast.compiled_graphs()
    setup_start = time.perf_counter()
    try:
        with time_limit(int(args.budget + LAST_ROW_GRACE - elapsed())):
            build()
            holder["service"] = start_service(make, backend)
    except Exception as exc:
        record(Result("setup", error=_first_line(exc), seconds=time.perf_counter() - setup_start))
        header["fp8"] = f"{intended.value} intended, setup failed"
        return end(3 if isinstance(exc, RowTimeout) else 1)
    service, ran_backend, failure = holder["service"]
    ran = service.pipelines.fast.fp8 if service.pipelines.fast else "plain"
    go_fast = f"{ran}, {ran_backend}" + (f" ({backend} failed)" if failure else "")
    header["fp8"] = ran if ran == intended.value else f"{ran} (intended {intended.value})"
    header["compile"] = ran_backend if not failure else f"{ran_backend} ({backend} failed: {failure})"
    residency = built["modules"].pipelines.residency
    header["bf16 transformers"] = "one GPU slot, host swap" if residency else "all resident"
    env["go_fast"] = {"fp8_intended": intended.value, "fp8_ran": ran, "compile_backend": ran_backend,
                      "compile_failure": failure, "gemm_backends": inductor_config.max_autotune_gemm_backends,
                      "bf16_transformers": header["bf16 transformers"]}
    (out / "env.json").write_text(json.dumps(env, indent=2))
    print(f"go_fast: {go_fast}", flush=True)
    for stage in SETUP_STAGES:
        seconds = setup_lines.seconds.get(stage)
        why = {"pin": "n/a: no bf16 transformer is parked in host memory",
               "warm-up": "n/a: one warm-up size (--quick), timed as compile"}.get(stage, "n/a: did not run")
        record(Result(f"setup: {stage}", seconds=seconds, error=None if seconds is not None else why,
                      recompiles=fast.compiled_graphs() - graphs_before if stage == "compile" else None,
                      go_fast=go_fast if stage in ("quantize", "compile") else None))
    record(Result("setup: total", seconds=time.perf_counter() - setup_start, note=f"by {elapsed():.0f} s"))
    if gpu:
        record(Result("resident GPU memory after setup", note="allocated, in peak_gib",
                      peak_gib=round(torch.cuda.memory_allocated(device) / 2**30, 2)))
    else:
        record(Result("resident GPU memory after setup", error=f"{NA_ON_CPU}: no GPU memory"))
    loras = [str(p) for p in write_loras(service, workdir / "loras", args.lora_rank, 2)]
    bench = Bench(service, built["modules"], device, size=1024 if gpu else 256,
                  repeats=args.repeats or (1 if args.quick else 3), loras=loras, workdir=workdir, fp8_peak=peak,
                  steps=args.steps)

    def run(row: Row, limit: int) -> Result:
        result = run_row(row.name, lambda: row.run(bench), device, limit)
        if row.go_fast:
            result.go_fast = go_fast
            result.error = result.error or fp8_error(ran, intended)
        return result

    for result in run_rows(rows, run, elapsed, args.budget, args.row_timeout):
        bench.results[result.name] = record(result)
        if result.error and result.error.startswith("timeout"):
            print("a row timed out: the process ends; --resume goes on from the next row", flush=True)
            return end(3)
    return end(0)


if __name__ == "__main__":
    raise SystemExit(main())
