"""go_fast: fp8 weights through torchao and regional torch.compile of the FLUX transformer.

Which fp8 runs depends on the hardware, never on the request:
- CUDA with compute capability >= 8.9 (Ada, Hopper): dynamic float8 activations and float8 weights,
  per-row scales, so the block matmuls run on fp8 tensor cores;
- anywhere else (older GPUs, CPU): float8 weight-only, half the weight memory, bf16/fp32 compute;
  CI runs this path on CPU;
- where neither can be built (torchao missing or failing): the plain weights, with a logged notice.

LoRAs stay unmerged peft layers on top of the quantized linears (their matmuls run in the compute
dtype), so a LoRA's effect is not rounded into fp8 and switching never rewrites base weights: no
merge/unmerge drift. Compilation is regional (each repeated block once) with dynamic shapes, so
every size and batch runs one graph; inductor's artefacts live under the weights store so the next
cold start reuses them.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import logging
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import torch
from filelock import FileLock
from torch import nn

log = logging.getLogger(__name__)

MIN_DYNAMIC_CAPABILITY = (8, 9)  # fp8 tensor cores: Ada Lovelace and Hopper onwards
FAST_DIR = "fast"  # under the weights store: pre-quantized transformers and compile caches
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")


class Fp8Mode(StrEnum):
    DYNAMIC = "fp8-dynamic"  # float8 activations x float8 weights (per-row scales)
    WEIGHT_ONLY = "fp8-weight-only"  # float8 weights, upcast for the matmul
    NONE = "plain"  # no fp8 could be built: the model's own dtype


def fp8_mode(device: torch.device, capability: tuple[int, int] | None = None) -> Fp8Mode:
    """The best fp8 this device supports; `capability` overrides the CUDA query (tests, planning)."""
    try:
        import torchao.quantization  # noqa: F401
    except ImportError:
        return Fp8Mode.NONE
    if device.type != "cuda":
        return Fp8Mode.WEIGHT_ONLY
    if capability is None:
        capability = torch.cuda.get_device_capability(device)
    return Fp8Mode.DYNAMIC if tuple(capability) >= MIN_DYNAMIC_CAPABILITY else Fp8Mode.WEIGHT_ONLY


def torchao_config(mode: Fp8Mode) -> object | None:
    """The torchao config for a mode (None for the plain path)."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Float8WeightOnlyConfig, PerRow

    if mode is Fp8Mode.DYNAMIC:
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    if mode is Fp8Mode.WEIGHT_ONLY:
        return Float8WeightOnlyConfig()
    return None


def _quantizable(module: nn.Module, fqn: str) -> bool:
    """Linear layers inside the repeated blocks (>99% of the FLOPs) with fp8-friendly widths.

    Embedders, norms and the final projection stay in the compute dtype: they are cheap and the
    most sensitive to rounding.
    """
    return (
        isinstance(module, nn.Linear)
        and fqn.split(".", 1)[0] in BLOCK_LISTS
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    )


def quantize_transformer(transformer: nn.Module, mode: Fp8Mode, device: torch.device | None = None) -> Fp8Mode:
    """Quantize `transformer`'s block linears in place, one block at a time; returns the mode that ran.

    On failure the module may be partly quantized: callers quantize a fresh copy and discard it.
    With `device`, each block moves there just before it is quantized (then the small rest follows),
    so a CPU-loaded bf16 copy is quantized on the GPU without ever holding all of it there.
    """
    if mode is Fp8Mode.NONE:
        log.warning("go_fast: fp8 is not available here (torchao cannot run); go_fast runs the plain weights")
        return mode
    from torchao.quantization import quantize_

    config = torchao_config(mode)
    try:
        for list_name in BLOCK_LISTS:
            for index, block in enumerate(getattr(transformer, list_name)):
                prefix = f"{list_name}.{index}."
                if device is not None:
                    block.to(device)
                quantize_(block, config, filter_fn=lambda m, fqn, p=prefix: _quantizable(m, p + fqn))
    except (RuntimeError, NotImplementedError, ValueError, AssertionError) as exc:
        if not fp8_unsupported(exc):  # out of memory, a torchao bug, bad weights: setup fails with the reason
            raise RuntimeError(f"go_fast: {mode.value} quantization failed: {_first_line(exc)}") from exc
        log.warning("go_fast: %s is not supported here (%s); go_fast runs the plain weights", mode.value, exc)
        return Fp8Mode.NONE
    if device is not None:
        for name, child in transformer.named_children():
            if name not in BLOCK_LISTS:
                child.to(device)
    return mode


def fp8_unsupported(exc: BaseException) -> bool:
    """torchao or torch refusing fp8 on this device or build: the one quantization failure that is a notice."""
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return False
    text = str(exc).lower()
    return any(phrase in text for phrase in ("capability", "not supported", "unsupported", "no kernel", "float8"))


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def quantized_linears(transformer: nn.Module) -> int:
    """How many linear layers hold torchao float8 weights (the tests and the benchmark check it)."""
    from torchao.quantization import Float8Tensor

    return sum(
        isinstance(getattr(m, "weight", None), Float8Tensor) for m in transformer.modules() if isinstance(m, nn.Linear)
    )


# --------------------------------------------------------------------------- pre-quantized copies


def fast_dir(store: Path) -> Path:
    return store / FAST_DIR


def source_fingerprint(source: Path) -> str:
    """Names, sizes and mtimes of the plain weights: a replaced or re-downloaded model changes it."""
    digest = hashlib.sha256()
    for path in sorted(source.rglob("*")):
        if path.is_file() and path.suffix in {".safetensors", ".json"}:
            stat = path.stat()
            digest.update(f"{path.relative_to(source)}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:16]


def prequantized_path(store: Path, model: str, mode: Fp8Mode, dtype: torch.dtype, source: Path) -> Path:
    """Where a quantized state dict is kept; the name pins everything that changes its bytes."""
    import torchao

    dtype_name = str(dtype).removeprefix("torch.")
    versions = f"torch{torch.__version__}-ao{torchao.__version__}"
    return fast_dir(store) / f"{model}-{mode.value}-{dtype_name}-{versions}-{source_fingerprint(source)}.pt"


def _save_atomic(state: dict[str, torch.Tensor], path: Path, model: str) -> None:
    """Write beside the target, rename when complete: a half-written file is never loaded.

    Copies of the same model made from other weights or versions are removed: they can never be
    loaded again. So are temp files an interrupted save left an hour ago; a younger one may be another
    replica's save in progress (of another version: this one's is under its lock).
    """
    write_atomic(path, lambda tmp: torch.save(state, tmp))
    cutoff = time.time() - 3600
    for stale in path.parent.glob(f"{model}-*.pt*"):
        try:
            if stale.suffix == ".incomplete" and stale.stat().st_mtime > cutoff:
                continue
        except FileNotFoundError:  # another writer renamed its temp file meanwhile
            continue
        if stale != path and stale.suffix != ".lock":
            stale.unlink(missing_ok=True)


def build_fast_transformer(
    make_empty: Callable[[], nn.Module],
    load_plain: Callable[[], nn.Module],
    *,
    model: str,
    store: Path,
    source: Path,
    device: torch.device,
    dtype: torch.dtype,
    mode: Fp8Mode,
    save: bool = True,
) -> tuple[nn.Module, Fp8Mode]:
    """The fp8 transformer for `model`: from the store's pre-quantized copy, else quantized now.

    `make_empty` builds the architecture without allocating (on the meta device); `load_plain` loads
    the plain weights from `source` (on CPU, so the GPU never holds a second bf16 copy). The quantized
    copy is named by `source`'s files, so replaced weights are quantized anew; it is
    saved after the first quantization so later cold starts skip it.
    """
    start = time.perf_counter()
    if mode is Fp8Mode.NONE:
        raise ValueError("build_fast_transformer needs an fp8 mode; the plain path reuses the plain transformer")
    path = prequantized_path(store, model, mode, dtype, source)
    with FileLock(str(path) + ".lock"):
        if not path.is_file():
            transformer = load_plain().eval()
            ran = quantize_transformer(transformer, mode, device)
            log.info("go_fast: quantized %s (%s) in %.1fs", model, ran.value, time.perf_counter() - start)
            if ran is Fp8Mode.NONE or not save:
                return transformer, ran
            _save_atomic(transformer.state_dict(), path, model)
            del transformer  # the copy on disk replaces it (below): never two on the device
        # Every cold start runs the copy on disk, the first one included, so all hold the same tensors
        # with the same layout and alignment (CPU kernels round differently on differently aligned
        # data) and the same flags: one state whatever the cold start, as compiled graphs guard on it.
        with torch.device("meta"):
            transformer = make_empty()
        state = torch.load(path, map_location=device, weights_only=True, mmap=True)
        transformer.load_state_dict(state, assign=True)
        transformer.requires_grad_(False)
        log.info("go_fast: loaded pre-quantized %s (%s) in %.1fs", model, mode.value, time.perf_counter() - start)
        return transformer.eval(), mode


def quantized_copy(
    transformer: nn.Module, mode: Fp8Mode, device: torch.device | None = None
) -> tuple[nn.Module, Fp8Mode]:
    """A quantized deep copy (modules built in memory: the benchmark, tests); the original stays plain.
    With `device`, each block of the copy moves there as it is quantized (see `quantize_transformer`)."""
    clone = copy.deepcopy(transformer).eval().requires_grad_(False)
    return clone, quantize_transformer(clone, mode, device)


# --------------------------------------------------------------------------- compilation


def should_compile(device: torch.device, requested: bool | None) -> bool:
    """On by default on CUDA; on CPU only when asked for (FLUX_LORA_COMPILE=1)."""
    if requested is not None:
        return requested
    return device.type == "cuda"


def configure_compile_cache(store: Path) -> Path:
    """Point inductor's and triton's on-disk caches into the weights store (an operator's env wins)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    root = fast_dir(store) / "compile-cache"
    root.mkdir(parents=True, exist_ok=True)
    # Importing torch/diffusers already set TORCHINDUCTOR_CACHE_DIR to inductor's shared temp default,
    # so only a different value is an operator's choice; the default is replaced.
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen is None or os.path.abspath(chosen) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "inductor")
    os.environ.setdefault("TRITON_CACHE_DIR", str(root / "triton"))
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    return root


def _artefacts_path(store: Path, tag: str) -> Path:
    device = torch.cuda.get_device_name().replace(" ", "_") if torch.cuda.is_available() else "cpu"
    return fast_dir(store) / "compile-cache" / f"mega-{tag}-{device}-torch{torch.__version__}.bin"


def load_compile_artefacts(store: Path, tag: str) -> bool:
    """Preload a previous run's compiled artefacts (torch.compiler's portable cache). True if found."""
    path = _artefacts_path(store, tag)
    if not path.is_file():
        return False
    try:
        torch.compiler.load_cache_artifacts(path.read_bytes())
    except Exception as exc:  # a cache from another build is only a missed shortcut
        log.warning("go_fast: ignoring compile cache %s (%s)", path.name, exc)
        return False
    log.info("go_fast: reusing compile cache %s", path.name)
    return True


def save_compile_artefacts(store: Path, tag: str) -> Path | None:
    """Persist what this process compiled so the next cold start skips most of it."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return None
    data, _info = saved
    path = _artefacts_path(store, tag)
    write_atomic(path, lambda tmp: tmp.write_bytes(data))
    return path


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` beside `path` under a name of this writer's own, then rename: replicas that start
    together on one shared store each write a whole file and the last rename wins; no reader sees a
    partial one, and no writer touches another's temp file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex}.incomplete")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def compile_transformer(transformer: nn.Module, backend: str = "inductor") -> None:
    """Regional compile: each block class compiles once and serves every repetition of it.

    dynamic=True makes the sequence length (image size) and batch symbolic, so the 22 standard sizes,
    custom sizes and img2img inputs all run the same graphs; fullgraph catches silent graph breaks.
    """
    kwargs = dict(fullgraph=True, dynamic=True, backend=backend)
    if hasattr(transformer, "compile_repeated_blocks"):
        transformer.compile_repeated_blocks(**kwargs)
        return
    for list_name in BLOCK_LISTS:  # older diffusers: the same regions by hand
        for block in getattr(transformer, list_name):
            block.compile(**kwargs)


# --------------------------------------------------------------------------- after setup

# Calls that would have compiled again after setup and ran eagerly instead, by transformer name.
eager_fallbacks: Counter[str] = Counter()


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far (any backend): what a recompile would raise."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def freeze_compiled(transformer: nn.Module, name: str) -> None:
    """After warm-up `transformer` never compiles again: a call whose guards fail runs eagerly, logged.

    torch's recompile limit is a hard error under fullgraph=True, and a recompile inside a prediction
    costs a minute on a GPU: one eager call is better than both. The forward is re-entered from the
    start under `force_eager` (a transformer call changes no state, so nothing is run twice).
    """
    from torch._dynamo.exc import TorchDynamoException

    forward = transformer.forward

    @functools.wraps(forward)
    def forward_without_recompiling(*args: object, **kwargs: object) -> object:
        try:
            with torch.compiler.set_stance("fail_on_recompile"):
                return forward(*args, **kwargs)
        except (TorchDynamoException, RuntimeError) as exc:
            if not isinstance(exc, TorchDynamoException) and "Detected recompile" not in str(exc):
                raise  # the model's own failure (out of memory, say): eager would only fail again
            eager_fallbacks[name] += 1
            log.warning("go_fast: compiled %s would compile again (%s); this call runs eagerly", name, _first_line(exc))
            with torch.compiler.set_stance("force_eager"):
                return forward(*args, **kwargs)

    transformer.forward = forward_without_recompiling


def unguarded_forward(transformer: nn.Module) -> Callable[..., object]:
    """`transformer`'s forward past `freeze_compiled`'s guard (or its forward, where none was set): under the
    `force_eager` stance it runs eagerly and counts no eager fallback (the benchmark's adapter-cost row)."""
    guard = vars(transformer).get("forward")  # set on the instance by freeze_compiled
    return guard.__wrapped__ if guard is not None else transformer.forward


# --------------------------------------------------------------------------- warm-up


@dataclass(frozen=True)
class WarmupShape:
    """One transformer call's shape: batch, image tokens, text tokens."""

    batch: int
    image_tokens: int
    text_tokens: int


def warmup_sizes() -> list[tuple[str, str, int]]:
    """(aspect ratio, megapixels, batch): one request per graph a prediction can need.

    One size per distinct token count of the standard sizes (11 aspect ratios x 2 megapixel
    settings; portrait and landscape share one), batch 1, then a batch of 2: dynamo specialises a
    batch of 1, and the batch-2 graph makes 2-4 symbolic. Custom and img2img sizes are other values
    of the same symbolic sequence length.
    """
    from flux_lora.request import ASPECT_RATIOS, MEGAPIXELS, size_for_aspect_ratio

    by_tokens: dict[int, tuple[str, str]] = {}
    for ratio in ASPECT_RATIOS:
        for mp in MEGAPIXELS:
            width, height = size_for_aspect_ratio(ratio, mp)
            by_tokens.setdefault((width // 16) * (height // 16), (ratio, mp))
    sizes = [(ratio, mp, 1) for ratio, mp in by_tokens.values()]
    return [*sizes, (*sizes[0][:2], 2)]


def dummy_inputs(transformer: nn.Module, shape: WarmupShape, device: torch.device, dtype: torch.dtype) -> dict:
    """Random inputs of a real call's shapes for `transformer` (tests), passed as FluxPipeline passes them."""
    config = transformer.config
    gen = torch.Generator("cpu").manual_seed(0)

    def rand(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen).to(device=device, dtype=dtype)

    inputs = dict(
        hidden_states=rand(shape.batch, shape.image_tokens, config.in_channels),
        encoder_hidden_states=rand(shape.batch, shape.text_tokens, config.joint_attention_dim),
        pooled_projections=rand(shape.batch, config.pooled_projection_dim),
        timestep=torch.full((shape.batch,), 0.5, device=device, dtype=dtype),
        img_ids=torch.zeros(shape.image_tokens, 3, device=device, dtype=dtype),
        txt_ids=torch.zeros(shape.text_tokens, 3, device=device, dtype=dtype),
        joint_attention_kwargs={},
        return_dict=False,
    )
    if config.guidance_embeds:
        inputs["guidance"] = torch.full((shape.batch,), 3.5, device=device, dtype=torch.float32)
    return inputs
