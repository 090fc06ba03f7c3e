"""go_fast on the tiny store, on CPU: torchao float8 weight-only (the path CI can run), LoRAs on top.

Bounds (measured on the tiny random store, then given ~2x headroom): one transformer call under
fp8 weight-only is within 8% relative L2 of the plain output (measured 3.5%); decoded images differ
by at most 3 of 255 levels on average (measured 0.07).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import isolate_compile_cache_env
from PIL import Image

from flux_lora.generation import fast
from flux_lora.generation.fast import Fp8Mode, WarmupShape
from flux_lora.generation.inputs import prepare_inputs
from flux_lora.generation.pipelines import generate, load_fast_pipelines, load_pipelines
from flux_lora.generation.tiny import make_tiny_store
from flux_lora.request import Mode, PipelineKey, build_request
from flux_lora.settings import Settings

CPU = torch.device("cpu")
REL_L2_BOUND = 0.08
IMAGE_MEAN_ABS_BOUND = 3.0


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_store(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def pipelines(store: Path):
    pipelines = load_pipelines(store, CPU, torch.float32)
    load_fast_pipelines(pipelines, store)
    return pipelines


SMALL = WarmupShape(1, 64, 8)


def call(transformer: torch.nn.Module, shape: WarmupShape = SMALL) -> torch.Tensor:
    with torch.inference_mode():
        return transformer(**fast.dummy_inputs(transformer, shape, CPU, torch.float32))[0]


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def block_linears(transformer: torch.nn.Module) -> list[str]:
    return [
        name
        for name, m in transformer.named_modules()
        if isinstance(m, torch.nn.Linear) and name.split(".", 1)[0] in fast.BLOCK_LISTS and "lora_" not in name
        and not name.endswith("base_layer")
    ]


# ----------------------------------------------------------------------------- choosing the fp8


@pytest.mark.parametrize(
    ("device", "capability", "expected"),
    [
        ("cuda", (9, 0), Fp8Mode.DYNAMIC),  # H100
        ("cuda", (8, 9), Fp8Mode.DYNAMIC),  # L40S / RTX 4090
        ("cuda", (8, 0), Fp8Mode.WEIGHT_ONLY),  # A100: no fp8 tensor cores
        ("cpu", None, Fp8Mode.WEIGHT_ONLY),
    ],
)
def test_fp8_mode_follows_compute_capability(device: str, capability: tuple[int, int] | None, expected: Fp8Mode):
    assert fast.fp8_mode(torch.device(device), capability) is expected


def test_without_torchao_go_fast_is_the_plain_model_with_a_notice(
    store: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)  # import fails as if not installed
    assert fast.fp8_mode(CPU) is Fp8Mode.NONE
    plain = load_pipelines(store, CPU, torch.float32)
    with caplog.at_level(logging.WARNING, logger="flux_lora"):
        fast_ = load_fast_pipelines(plain, store)
    assert "fp8 is not available" in caplog.text
    assert fast_.fp8 == "plain"
    assert fast_.text2img["dev"].transformer is plain.text2img["dev"].transformer


def test_fp8_that_fails_to_build_falls_back_with_a_notice(caplog: pytest.LogCaptureFixture):
    """Dynamic fp8 forced onto a CPU (as if the capability check had said yes): torchao refuses it."""
    from flux_lora.generation.tiny import tiny_transformer

    with caplog.at_level(logging.WARNING, logger="flux_lora"):
        ran = fast.quantize_transformer(tiny_transformer(True), Fp8Mode.DYNAMIC)
    assert ran is Fp8Mode.NONE
    assert "fp8-dynamic is not supported here" in caplog.text


def test_running_out_of_memory_while_quantizing_fails_setup(monkeypatch: pytest.MonkeyPatch):
    """An OOM is not "no fp8 here": serving plain weights under the go_fast name would hide it."""
    import torchao.quantization

    from flux_lora.generation.tiny import tiny_transformer

    def out_of_memory(*args: object, **kwargs: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 72.00 MiB")

    monkeypatch.setattr(torchao.quantization, "quantize_", out_of_memory)
    transformer = tiny_transformer(True)
    with pytest.raises(RuntimeError, match="fp8-weight-only quantization failed: CUDA out of memory"):
        fast.quantize_transformer(transformer, Fp8Mode.WEIGHT_ONLY)


# ----------------------------------------------------------------------------- the fast pipelines


def test_go_fast_quantizes_every_block_linear_and_shares_the_rest(pipelines):
    fast_ = pipelines.fast
    assert fast_.fp8 == Fp8Mode.WEIGHT_ONLY.value
    for model in ("dev", "schnell"):
        plain_t, fast_t = pipelines.text2img[model].transformer, fast_.text2img[model].transformer
        assert fast_t is not plain_t
        assert fast.quantized_linears(fast_t) == len(block_linears(fast_t)) > 0
        assert fast.quantized_linears(plain_t) == 0  # the plain path keeps its weights
        for mode in Mode:
            pipe = pipelines.get(PipelineKey(model, go_fast=True), mode)
            assert pipe.transformer is fast_t
            assert pipe.vae is pipelines.text2img["dev"].vae
            assert pipe.text_encoder_2 is pipelines.text2img["dev"].text_encoder_2
    assert fast_.text2img["schnell"].scheduler.config.shift == 1.0  # schnell keeps its own scheduler


def test_fp8_transformer_output_is_close_to_plain(pipelines):
    for model in ("dev", "schnell"):
        plain = call(pipelines.text2img[model].transformer)
        quick = call(pipelines.fast.text2img[model].transformer)
        assert 0 < rel_l2(quick, plain) < REL_L2_BOUND


def _image(path: Path, size: tuple[int, int], seed: int) -> str:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.mark.parametrize("case", ["txt2img", "custom", "img2img", "inpaint"])
def test_go_fast_runs_every_mode_close_to_plain(pipelines, tmp_path: Path, case: str):
    # The smallest sizes keep the tiny VAE cheap; sizes come from the same request rules either way.
    inputs: dict[str, object] = dict(
        prompt="a photo of a cat", seed=7, num_inference_steps=3, aspect_ratio="custom", width=256, height=256
    )
    if case == "custom":
        inputs.update(width=272, height=336)
    if case in ("img2img", "inpaint"):
        inputs["image"] = _image(tmp_path / "in.png", (200, 150), 1)
    if case == "inpaint":
        mask = np.zeros((150, 200), dtype=np.uint8)
        mask[:, 100:] = 255
        Image.fromarray(mask).save(tmp_path / "mask.png")
        inputs["mask"] = str(tmp_path / "mask.png")
    plain_req = build_request(**inputs)
    fast_req = build_request(go_fast=True, **inputs)
    plain_img = np.asarray(generate(pipelines, plain_req, prepare_inputs(plain_req))[0], dtype=np.float64)
    fast_img = np.asarray(generate(pipelines, fast_req, prepare_inputs(fast_req))[0], dtype=np.float64)
    assert plain_img.shape == fast_img.shape
    assert np.abs(plain_img - fast_img).mean() <= IMAGE_MEAN_ABS_BOUND


def test_prequantized_copy_is_saved_once_and_reloaded_identically(store: Path, pipelines):
    files = sorted((store / fast.FAST_DIR).glob("*.pt"))
    assert {f.name.split("-", 1)[0] for f in files} == {"dev", "schnell"}
    assert not list((store / fast.FAST_DIR).glob("*.incomplete"))
    stamp = {f: f.stat().st_mtime_ns for f in files}
    again = load_pipelines(store, CPU, torch.float32)
    load_fast_pipelines(again, store)
    assert {f: f.stat().st_mtime_ns for f in files} == stamp  # read, not rewritten
    reloaded = again.fast.text2img["dev"].transformer
    assert fast.quantized_linears(reloaded) > 0
    assert torch.equal(call(reloaded), call(pipelines.fast.text2img["dev"].transformer))


def test_replaced_base_weights_are_quantized_anew(tiny_store: Path, tmp_path: Path):
    import shutil

    from safetensors.torch import load_file, save_file

    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    first = load_pipelines(store, CPU, torch.float32)
    load_fast_pipelines(first, store)
    old_copy = {f.name for f in (store / fast.FAST_DIR).glob("dev-*.pt")}
    weights = next((store / "FLUX.1-dev" / "transformer").glob("*.safetensors"))
    save_file({k: v * 3 for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
    second = load_pipelines(store, CPU, torch.float32)
    load_fast_pipelines(second, store)
    new_copy = {f.name for f in (store / fast.FAST_DIR).glob("dev-*.pt")}
    assert len(new_copy) == 1 and new_copy != old_copy, "a stale copy would run the old weights"
    plain, quantized = second.text2img["dev"].transformer, second.fast.text2img["dev"].transformer
    assert rel_l2(call(quantized), call(plain)) <= REL_L2_BOUND


# ----------------------------------------------------------------------------- LoRAs under fp8


def random_lora(transformer: torch.nn.Module, seed: int, rank: int = 4) -> dict[str, torch.Tensor]:
    """A peft-format LoRA on every block linear of `transformer`'s architecture."""
    gen = torch.Generator().manual_seed(seed)
    modules = dict(transformer.named_modules())
    sd = {}
    for name in block_linears(transformer):
        linear = modules[name]
        sd[f"{name}.lora_A.weight"] = torch.randn(rank, linear.in_features, generator=gen) * 0.2
        sd[f"{name}.lora_B.weight"] = torch.randn(linear.out_features, rank, generator=gen) * 0.2
    return sd


@pytest.mark.filterwarnings("ignore:TorchaoLoraLinear:UserWarning")  # merge() refused: we never merge
def test_lora_effect_under_fp8_points_the_same_way_as_plain(store: Path):
    fresh = load_pipelines(store, CPU, torch.float32)
    load_fast_pipelines(fresh, store)
    plain_t, fast_t = fresh.text2img["dev"].transformer, fresh.fast.text2img["dev"].transformer
    lora = random_lora(plain_t, seed=1)
    quantized = fast.quantized_linears(fast_t)
    base_plain, base_fast = call(plain_t), call(fast_t)
    for transformer in (plain_t, fast_t):
        transformer.load_lora_adapter(dict(lora), prefix=None, adapter_name="main")
    delta_plain = (call(plain_t) - base_plain).flatten()
    delta_fast = (call(fast_t) - base_fast).flatten()
    assert delta_plain.norm() > 0.05 * base_plain.norm()  # the LoRA does something
    cosine = torch.nn.functional.cosine_similarity(delta_plain, delta_fast, dim=0)
    assert cosine >= 0.95
    # The adapter sits unfused on the fp8 layer: its weights are full precision, the base stays fp8.
    layer = fast_t.transformer_blocks[0].attn.to_q
    assert layer.lora_A["main"].weight.dtype == torch.float32
    assert fast.quantized_linears(fast_t) == quantized > 0


@pytest.mark.filterwarnings("ignore:TorchaoLoraLinear:UserWarning")
def test_twenty_lora_switches_leave_the_fp8_base_unchanged(store: Path):
    fresh = load_pipelines(store, CPU, torch.float32)
    load_fast_pipelines(fresh, store)
    fast_t = fresh.fast.text2img["schnell"].transformer
    base = call(fast_t)
    outputs = []
    for i in range(20):
        fast_t.load_lora_adapter(random_lora(fast_t, seed=100 + i), prefix=None, adapter_name="main")
        outputs.append(call(fast_t))
        fast_t.delete_adapters("main")
    assert not torch.equal(outputs[0], outputs[1])  # the switches really changed the output
    assert torch.equal(call(fast_t), base)


# ----------------------------------------------------------------------------- compilation


@pytest.mark.parametrize(
    ("device", "requested", "expected"),
    [("cpu", None, False), ("cpu", True, True), ("cuda", None, True), ("cuda", False, False)],
)
def test_compile_is_off_on_cpu_unless_asked(device: str, requested: bool | None, expected: bool):
    assert fast.should_compile(torch.device(device), requested) is expected


@pytest.mark.parametrize(("value", "expected"), [(None, None), ("1", True), ("0", False), ("", None)])
def test_compile_setting(monkeypatch: pytest.MonkeyPatch, value: str | None, expected: bool | None):
    if value is None:
        monkeypatch.delenv("FLUX_LORA_COMPILE", raising=False)
    else:
        monkeypatch.setenv("FLUX_LORA_COMPILE", value)
    assert Settings.from_env().compile is expected


def test_compile_cache_lives_under_the_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    isolate_compile_cache_env(monkeypatch)
    root = fast.configure_compile_cache(tmp_path)
    assert Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]).is_relative_to(tmp_path / fast.FAST_DIR)
    assert Path(os.environ["TRITON_CACHE_DIR"]).is_relative_to(root)


def test_compile_cache_replaces_the_default_inductor_set_at_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from torch._inductor.runtime.cache_dir_utils import cache_dir, default_cache_dir

    isolate_compile_cache_env(monkeypatch)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what importing diffusers leaves
    fast.configure_compile_cache(tmp_path)
    assert Path(cache_dir()).is_relative_to(tmp_path / fast.FAST_DIR)  # where inductor itself now writes
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "operator"))  # an operator's own choice wins
    fast.configure_compile_cache(tmp_path)
    assert cache_dir() == str(tmp_path / "operator")


def test_compile_artefacts_written_by_replicas_at_once_stay_whole(tmp_path: Path):
    """Replicas starting together save their compile cache to one path on the shared store."""
    from concurrent.futures import ThreadPoolExecutor

    path = tmp_path / "fast" / "compile-cache" / "mega.bin"
    payloads = [bytes([i]) * (1 << 20) for i in range(8)]

    def save(data: bytes) -> None:
        for _ in range(5):
            fast.write_atomic(path, lambda tmp: tmp.write_bytes(data))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(save, payloads))  # a shared temp name raised here (FileNotFoundError) or mixed files
    assert path.read_bytes() in payloads
    assert [p.name for p in path.parent.iterdir()] == ["mega.bin"]


def test_standard_sizes_are_all_warmed():
    from flux_lora.request import ASPECT_RATIOS, MEGAPIXELS, size_for_aspect_ratio

    def tokens(ratio: str, mp: str) -> int:
        width, height = size_for_aspect_ratio(ratio, mp)
        return (width // 16) * (height // 16)

    warmed = {tokens(ratio, mp) for ratio, mp, batch in fast.warmup_sizes() if batch == 1}
    assert warmed == {tokens(ratio, mp) for ratio in ASPECT_RATIOS for mp in MEGAPIXELS}
    assert any(batch > 1 for _, _, batch in fast.warmup_sizes())


def test_the_decoder_slices_batches_and_tiles_only_above_1024(pipelines):
    """Four 1440x1440 images never decode at once at full size; the standard 1 MP sizes are never tiled."""
    for source in (pipelines, pipelines.fast):
        for table in (source.text2img, source.img2img, source.inpaint):
            for pipe in table.values():
                assert pipe.vae.use_slicing and pipe.vae.use_tiling
                assert pipe.vae.tile_sample_min_size == 1024


# ----------------------------------------------------------------------------- the bf16 GPU slot


def test_residency_keeps_one_host_copy_per_base_weight_through_lora_injection():
    from flux_lora.generation.memory import Residency
    from flux_lora.generation.tiny import tiny_transformer

    torch.manual_seed(0)
    a, b = tiny_transformer(guidance_embeds=True), tiny_transformer(guidance_embeds=True)
    residency = Residency(torch.device("cpu"), {"a": a, "b": b}, resident="a")
    copies = len(residency._host["b"].views)
    assert copies == len(list(b.parameters())) + len(list(b.buffers()))
    before = call(b)
    b.load_lora_adapter(random_lora(b, seed=1), prefix=None, adapter_name="main")  # renames x.weight
    for _ in range(2):
        residency.ensure("b")
        residency.ensure("a")  # parks b again, LoRA injected
    assert len(residency._host["b"].views) == copies, "a second host copy of the LoRA'd weights"
    b.delete_adapters("main")
    residency.ensure("b")
    residency.ensure("a")
    assert len(residency._host["b"].views) == copies
    assert torch.equal(call(b), before)


def test_residency_packs_each_model_into_one_exact_size_host_buffer_at_setup():
    """The layout, on CPU: one buffer per model (the resident one too) of exactly the aligned sizes'
    sum, every parked base weight a view into it, LoRAs outside it. Pinning itself (cudaHostRegister)
    and a real host-to-device move need CUDA: on CPU `ensure` moves nothing and nothing is pinned."""
    from flux_lora.generation.memory import ALIGN, Residency
    from flux_lora.generation.tiny import tiny_transformer

    torch.manual_seed(0)
    a, b = tiny_transformer(guidance_embeds=True), tiny_transformer(guidance_embeds=True)
    b.register_buffer("odd", torch.arange(5, dtype=torch.int16))  # another dtype, 10 bytes
    originals = {name: {k: t.detach().clone() for k, t in m.state_dict().items()} for name, m in (("a", a), ("b", b))}
    before = call(b)
    residency = Residency(torch.device("cpu"), {"a": a, "b": b}, resident="a")

    assert set(residency._host) == {"a", "b"}  # built at setup: parking later copies nothing
    for name, module in (("a", a), ("b", b)):
        tensors = [*module.parameters(), *module.buffers()]
        exact = sum(-(-t.nbytes // ALIGN) * ALIGN for t in tensors)
        buffer = residency._host[name].buffer
        assert buffer.dtype == torch.uint8 and buffer.untyped_storage().nbytes() == exact
        assert exact & (exact - 1), "the tiny sum happens to be a power of two: the check proves nothing"
        assert all(t.untyped_storage().data_ptr() == buffer.data_ptr() for t in tensors)

    lora = random_lora(b, seed=1)
    b.load_lora_adapter(lora, prefix=None, adapter_name="main")
    for _ in range(2):
        residency.ensure("b")
        residency.ensure("a")  # parks b with its adapter
    buffer = residency._host["b"].buffer
    assert buffer.untyped_storage().nbytes() == exact  # the adapter was not packed
    for key, tensor in (*b.named_parameters(), *b.named_buffers()):
        inside = tensor.untyped_storage().data_ptr() == buffer.data_ptr()
        assert inside == ("lora_" not in key), key
    params = dict(b.named_parameters())  # peft names `x.lora_A.weight` `x.lora_A.main.weight`
    assert all(torch.equal(params[k.replace(".weight", ".main.weight")], v) for k, v in lora.items())

    b.delete_adapters("main")
    residency.ensure("b")
    residency.ensure("a")
    for name, module in (("a", a), ("b", b)):
        state = {k.replace(".base_layer.", "."): t for k, t in module.state_dict().items()}
        assert all(torch.equal(state[k], t) for k, t in originals[name].items()), name
    assert torch.equal(call(b), before)


def test_a_gpu_that_holds_both_bf16_transformers_beside_their_fp8_copies_swaps_neither():
    """FLUX.1's real transformers (sized on the meta device) and 9.9 GB of text encoders and VAE: an H200
    (about 139 GiB usable) keeps everything resident, an 80 GB H100 (about 79 GiB) needs the one bf16 slot."""
    from diffusers import FluxTransformer2DModel

    from flux_lora.generation.memory import fits_without_swap, module_bytes

    with torch.device("meta"):
        plain = sum(module_bytes(FluxTransformer2DModel(guidance_embeds=g).to(torch.bfloat16)) for g in (True, False))
    assert 47.5e9 < plain < 47.7e9  # docs/memory-plan.md: 23.8 GB each
    shared = int(9.9e9)
    assert fits_without_swap(plain, shared, 139 * 2**30)
    assert not fits_without_swap(plain, shared, 79 * 2**30)


def test_host_memory_cuda_refuses_to_pin_stays_pageable_and_pinned_memory_is_unpinned_when_freed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    from flux_lora.generation import memory

    calls = []

    class Cudart:  # CUDA's runtime as torch exposes it: an error code per call
        def __init__(self, register_code: int) -> None:
            self.register_code = register_code

        def cudaHostRegister(self, pointer: int, size: int, flags: int) -> int:
            calls.append(("register", pointer, size))
            return self.register_code

        def cudaHostUnregister(self, pointer: int) -> int:
            calls.append(("unregister", pointer))
            return 0

    def check_error(code: int) -> None:
        if code:
            raise RuntimeError(f"CUDA error: {code}")  # what torch.cuda.CudaError is

    monkeypatch.setattr(torch.cuda, "check_error", check_error)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: Cudart(register_code=2))  # cudaErrorMemoryAllocation
    buffer = torch.empty(1000, dtype=torch.uint8)
    with caplog.at_level(logging.WARNING, logger="flux_lora.generation.memory"):
        assert memory.pin(buffer) is False
    assert "it stays pageable" in caplog.text and calls == [("register", buffer.data_ptr(), 1000)]

    monkeypatch.setattr(torch.cuda, "cudart", lambda: Cudart(register_code=0))
    calls.clear()
    pinned = torch.empty(512, dtype=torch.uint8)
    pointer = pinned.data_ptr()
    assert memory.pin(pinned) is True and calls == [("register", pointer, 512)]
    del pinned
    assert calls[-1] == ("unregister", pointer)


def test_packing_each_bf16_transformer_is_a_setup_stage(caplog: pytest.LogCaptureFixture):
    from flux_lora import SETUP_LOGGER
    from flux_lora.generation.memory import Residency
    from flux_lora.generation.tiny import tiny_transformer

    with caplog.at_level(logging.INFO, logger=SETUP_LOGGER):
        Residency(CPU, {"a": tiny_transformer(True), "b": tiny_transformer(False)}, resident="a")
    pins = [r for r in caplog.records if getattr(r, "stage", None) == "pin"]
    assert len(pins) == 2 and all(0 <= r.seconds < 30 and "pageable" in r.getMessage() for r in pins)


def test_the_bf16_slot_path_of_a_service_runs_on_cpu(store: Path, tmp_path: Path):
    """The GPU's bf16 slot through the real Service: each plain request moves its transformer into the slot
    (adapters with it) and go_fast is quantized from the slot's copy (`Service.from_modules`), with the
    same images as a service without the slot (to float rounding: CPU kernels round differently on data
    at other alignments, and the slot's packed buffer aligns weights to 256 bytes)."""
    import dataclasses

    from flux_lora.generation.memory import Residency
    from flux_lora.generation.safety import SafetyChecker
    from flux_lora.service import HOTSWAP, Modules, Service

    settings = dataclasses.replace(Settings.from_env(), weights_dir=store, cache_dir=tmp_path / "cache",
                                   compile=False)
    plain = load_pipelines(store, CPU, torch.float32)
    plain.residency = Residency(CPU, plain.transformers, resident="dev")
    slotted = Service.from_modules(HOTSWAP, settings, Modules(plain, SafetyChecker.load(store, CPU, torch.float32)))
    reference = Service(HOTSWAP, settings, None)
    switches = plain.residency.switches

    def image(service: Service, **inputs: object) -> np.ndarray:
        paths = service.predict(prompt="a cat", num_inference_steps=2, seed=3, output_format="png",
                                disable_safety_checker=True, aspect_ratio="custom", width=256, height=256, **inputs)
        return np.asarray(Image.open(paths[0])).astype(np.int16)

    assert plain.residency.resident == "dev"  # as after loading; the fp8 copies were made from host copies
    for inputs in ({"model": "schnell"}, {"model": "dev"}, {"model": "schnell", "go_fast": True}):
        assert np.abs(image(slotted, **inputs) - image(reference, **inputs)).max() <= 2, inputs
    assert plain.residency.switches == switches + 2  # schnell in, dev back; go_fast never touches the slot
    assert plain.residency.resident == "dev"
