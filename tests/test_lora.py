"""LoRAs on the tiny FLUX through the Service (as cog runs it), `flux-lora predict` and the HTTP server.

LoRA files are written from the tiny transformer's real names and shapes in every format and served
from a loopback HTTP server through the real weight cache. Images are 64x64 img2img (the input size
sets the output size) or 256x256 txt2img, 2 steps, PNG: pixel-exact comparisons.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
from pathlib import Path

import lora_samples as S
import numpy as np
import pytest
import torch
from fakes import FakeServer
from PIL import Image

from flux_lora.errors import LoraError, UserError
from flux_lora.generation.tiny import make_tiny_store
from flux_lora.lora.adapters import LoraManager, Wanted, _Lru
from flux_lora.lora.formats import ModelNames, convert_lora
from flux_lora.request import LoraSpec, PipelineKey, effective_scale
from flux_lora.service import HOTSWAP, TRAINED, LoraFile, Service
from flux_lora.settings import Settings

pytestmark = pytest.mark.slow  # a Service per module and many predictions: `pytest -m "not slow"` skips it


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_tiny_store(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def env(store, tmp_path_factory):
    saved = dict(os.environ)
    os.environ.update(
        FLUX_LORA_WEIGHTS=str(store),
        FLUX_LORA_CACHE=str(tmp_path_factory.mktemp("cache")),
        FLUX_LORA_ALLOW_PRIVATE_URLS="1",
    )
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def settings(env) -> Settings:
    return Settings.from_env()


@pytest.fixture(scope="module")
def input_image(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("img") / "in.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    return str(path)


def run(service: Service, image: str | None = None, **inputs) -> np.ndarray:
    """One prediction; 64x64 img2img when `image` is given, else 256x256 txt2img."""
    size = {"image": image, "prompt_strength": 1.0} if image else {"aspect_ratio": "custom", "width": 256,
                                                                   "height": 256}
    paths = service.predict(prompt="a cat", num_inference_steps=2, seed=7, output_format="png",
                            disable_safety_checker=True, **size, **inputs)
    return np.asarray(Image.open(paths[0])).astype(np.int16)


def differs(a: np.ndarray, b: np.ndarray) -> bool:
    return float(np.abs(a - b).mean()) > 0.5


@pytest.fixture(scope="module")
def service(settings, input_image):
    svc = Service(HOTSWAP, settings, None)
    svc.base = run(svc, input_image)  # before any LoRA ever touched these pipelines
    return svc


@pytest.fixture(scope="module")
def loras(service) -> dict[str, dict[str, torch.Tensor]]:
    dev = service.pipelines.text2img["dev"]
    tr, te = dev.transformer, dev.text_encoder
    a, b = S.random_lora(tr, 1), S.random_lora(tr, 2)
    attn = S.random_lora(tr, 3, only=("img_attn", "txt_attn"))
    return {
        "peft": S.as_peft(a, tr),
        "peft_noprefix": S.as_peft(a, tr, prefix=""),
        "kohya": S.as_kohya(a),
        "comfyui": S.as_comfyui(a),
        "comfyui_model": S.as_comfyui(a, prefix="model.diffusion_model."),
        "comfyui_extracted": S.as_comfyui_extracted(a),
        "mixture": S.as_mixture(a, tr),
        "xlabs": S.as_xlabs(attn),
        "xlabs_as_peft": S.as_peft(attn, tr),
        "attn_b": S.as_peft(S.random_lora(tr, 6, only=("img_attn", "txt_attn")), tr),
        "clip": S.clip_lora(te, 4),
        "clip_kohya": S.clip_lora(te, 4, kohya=True),
        "b": S.as_peft(b, tr),
        "refused": S.as_peft(S.random_lora(tr, 7), tr),  # only ever loaded by the peft-refusal test
        "sdxl": S.sdxl_lora(),
        "sd15": S.sd15_lora(),
        "unmatched": S.unmatched_lora(),
        "dora": S.dora_lora(tr),
        "big": S.as_peft(S.random_lora(_wide_transformer(), 5), _wide_transformer()),
    }


def _wide_transformer():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
                                  pooled_projection_dim=32, axes_dims_rope=(4, 4, 8))


@pytest.fixture(scope="module")
def server(loras):
    from safetensors.torch import save

    with FakeServer() as srv:
        for name, tensors in loras.items():
            srv.add_file(f"/{name}.safetensors", save({k: v.contiguous() for k, v in tensors.items()}))
        srv.add_file("/empty.safetensors", save({}))
        yield srv


def url(server: FakeServer, name: str) -> str:
    return f"{server.url}/{name}.safetensors"


# --------------------------------------------------------------------------- one request, read top to bottom

STAGES = {"request": 0, "inputs": 0, "cache": 1, "sources": 1, "adapters": 2, "formats": 2, "pipelines": 3,
          "safety": 4, "outputs": 5}


def test_a_prediction_runs_its_stages_in_order(service, server, input_image):
    """request and inputs -> the LoRA files (cache, sources) -> adapters -> pipelines -> safety -> outputs:
    the first call into each flux_lora module during one prediction, recorded as it happens."""
    import sys

    package = str(Path(__file__).resolve().parent.parent / "flux_lora")
    first: list[str] = []

    def record(frame, event, arg) -> None:
        name = frame.f_code.co_filename
        if event == "call" and name.startswith(package):
            module = Path(name).stem
            if module not in first:
                first.append(module)

    sys.setprofile(record)
    try:
        run(service, input_image, replicate_weights=url(server, "mixture"))
    finally:
        sys.setprofile(None)
    order = [STAGES[m] for m in first if m in STAGES]
    assert order == sorted(order), " -> ".join(first)
    assert set(STAGES) - {"formats"} <= set(first), first  # formats: only when not converted before

# --------------------------------------------------------------------------- formats


@pytest.mark.parametrize(
    ("fmt", "same_as"),
    [("peft", None), ("peft_noprefix", "peft"), ("kohya", "peft"), ("comfyui", "peft"), ("comfyui_model", "peft"),
     ("comfyui_extracted", "peft"), ("mixture", "peft"),
     ("xlabs", "xlabs_as_peft"), ("clip", None), ("clip_kohya", "clip")],
)
def test_each_format_changes_the_image_and_means_the_same(service, server, input_image, fmt, same_as):
    image = run(service, input_image, replicate_weights=url(server, fmt))
    assert differs(image, service.base)
    if same_as:  # the same adapter written in another format must give the same image
        other = run(service, input_image, replicate_weights=url(server, same_as))
        assert np.abs(image - other).max() <= 1


def test_no_lora_and_scale_zero_give_the_base_image(service, server, input_image):
    run(service, input_image, replicate_weights=url(server, "peft"), extra_lora=url(server, "clip"))
    assert np.array_equal(run(service, input_image), service.base)
    zero = run(service, input_image, replicate_weights=url(server, "peft"), lora_scale=0.0,
               extra_lora=url(server, "clip"), extra_lora_scale=0.0)
    assert np.array_equal(zero, service.base)


def test_switching_back_returns_the_exact_image_without_reading_files_again(service, server, input_image):
    a = run(service, input_image, replicate_weights=url(server, "peft"))
    b = run(service, input_image, replicate_weights=url(server, "b"))
    assert differs(a, b)
    fetched = server.count("GET", "/peft.safetensors")
    assert np.array_equal(run(service, input_image, replicate_weights=url(server, "peft")), a)
    assert server.count("GET", "/peft.safetensors") == fetched  # from memory, not even the disk cache


def test_main_plus_extra_differs_from_each_alone(service, server, input_image):
    main = run(service, input_image, replicate_weights=url(server, "peft"))
    extra = run(service, input_image, extra_lora=url(server, "b"))
    both = run(service, input_image, replicate_weights=url(server, "peft"), extra_lora=url(server, "b"))
    assert differs(both, main) and differs(both, extra) and differs(main, extra)


def test_same_lora_as_main_and_extra_runs_once_at_the_sum_of_their_scales(service, server, input_image, caplog):
    double = run(service, input_image, replicate_weights=url(server, "peft"), lora_scale=2.0)
    with caplog.at_level(logging.WARNING, logger="flux_lora.lora.adapters"):
        twice = run(service, input_image, replicate_weights=url(server, "peft"), extra_lora=url(server, "peft"))
    assert np.array_equal(double, twice)
    assert differs(twice, run(service, input_image, replicate_weights=url(server, "peft")))
    assert "same LoRA" in caplog.text and "sum of their scales" in caplog.text


def test_scale_only_change_changes_the_image_without_reloading(service, server, input_image):
    one = run(service, input_image, replicate_weights=url(server, "kohya"), lora_scale=1.0)
    loads = service.loras.loads
    half = run(service, input_image, replicate_weights=url(server, "kohya"), lora_scale=0.5)
    assert differs(one, half)
    assert service.loras.loads == loads
    assert np.array_equal(run(service, input_image, replicate_weights=url(server, "kohya"), lora_scale=1.0), one)
    assert service.loras.loads == loads


def test_go_fast_keeps_the_requested_scales(service):
    """Issue #13: adapters stay unmerged on the fp8 linears, so no 1.5x (the reference's fp8-merge make-up)."""
    wanted = Service.wanted([LoraFile("replicate_weights", "a", Path("a"), 0.8),
                             LoraFile("extra_lora", "b", Path("b"), -1.0)], go_fast=True)
    assert [(w.label, w.scale) for w in wanted] == [("replicate_weights", 0.8), ("extra_lora", -1.0)]
    assert effective_scale(0.8, go_fast=False) == effective_scale(0.8, go_fast=True) == 0.8


def test_go_fast_runs_the_fast_transformer_at_the_requested_scales(service, server, input_image, loras):
    base = run(service, input_image, go_fast=True)
    image = run(service, input_image, go_fast=True, replicate_weights=url(server, "peft"), lora_scale=1.0,
                extra_lora=url(server, "b"), extra_lora_scale=-0.4)
    assert differs(image, base)
    fast = service.loras.transformers[PipelineKey("dev", go_fast=True)]
    name = "transformer_blocks.0.attn.to_q"
    layer = fast.get_submodule(name)
    main_up, extra_up = (loras[k][f"transformer.{name}.lora_B.weight"] for k in ("peft", "b"))
    rank = main_up.shape[1]
    # issue #13: no 1.5x under go_fast; the packed adapter holds main then extra, each scale in its columns
    torch.testing.assert_close(layer.lora_up[:, :rank].float(), main_up * 1.0)
    torch.testing.assert_close(layer.lora_up[:, rank : rank + extra_up.shape[1]].float(), extra_up * -0.4)


def test_txt2img_schnell_and_inpaint_take_the_same_adapters(service, server, input_image, tmp_path):
    lora = url(server, "peft")
    assert differs(run(service, replicate_weights=lora), run(service))
    assert differs(run(service, input_image, model="schnell", replicate_weights=lora),
                   run(service, input_image, model="schnell"))
    mask = tmp_path / "mask.png"
    Image.new("L", (64, 64), 255).save(mask)
    assert differs(run(service, input_image, mask=str(mask), replicate_weights=lora),
                   run(service, input_image, mask=str(mask)))


@pytest.mark.parametrize(
    ("name", "message"),
    [("sdxl", "SDXL"), ("sd15", "Stable Diffusion"), ("empty", "no tensors"), ("unmatched", "matches no module"),
     ("dora", "DoRA"), ("big", "does not fit this model")],
)
def test_bad_loras_fail_clearly_and_the_next_request_works(service, server, input_image, name, message):
    with pytest.raises(UserError, match=message) as info:
        run(service, input_image, replicate_weights=url(server, "peft"), extra_lora=url(server, name))
    assert str(info.value).startswith("extra_lora:")
    assert np.array_equal(run(service, input_image), service.base)


# --------------------------------------------------------------------------- conversion details


def test_kohya_single_block_linear1_splits_into_q_k_v_mlp(service):
    dev = service.pipelines.text2img["dev"]
    names = ModelNames.of(dev.transformer, dev.text_encoder)
    lora = S.random_lora(dev.transformer, 11, only=("single_blocks",))
    converted = convert_lora(S.as_kohya(lora, alpha_ratio=0.25), names).transformer
    down, up = lora["single_blocks.0.linear1"]
    rows = {"attn.to_q": (0, 32), "attn.to_k": (32, 64), "attn.to_v": (64, 96), "proj_mlp": (96, 224)}
    for module, (start, stop) in rows.items():
        key = f"single_transformer_blocks.0.{module}"
        torch.testing.assert_close(converted[f"{key}.lora_A.weight"], down)
        torch.testing.assert_close(converted[f"{key}.lora_B.weight"], up[start:stop])


def test_bfl_final_layer_modulation_swaps_shift_and_scale(service):
    dev = service.pipelines.text2img["dev"]
    names = ModelNames.of(dev.transformer, None)
    up = torch.arange(64.0).reshape(64, 1)
    converted = convert_lora({"lora_unet_final_layer_adaLN_modulation_1.lora_down.weight": torch.ones(1, 32),
                              "lora_unet_final_layer_adaLN_modulation_1.lora_up.weight": up}, names).transformer
    assert torch.equal(converted["norm_out.linear.lora_B.weight"], torch.cat([up[32:], up[:32]]))


def test_comfyui_extracted_differences_are_dropped_by_name_and_full_differences_refused(service, loras, caplog):
    dev = service.pipelines.text2img["dev"]
    names = ModelNames.of(dev.transformer, dev.text_encoder)
    with caplog.at_level(logging.WARNING, logger="flux_lora.lora.formats"):
        converted = convert_lora(loras["comfyui_extracted"], names)
    assert "weight difference(s) an adapter cannot carry" in caplog.text and ".diff_b" in caplog.text
    dropped = [key for key, why in converted.ignored if "dropped" in why]
    assert "diffusion_model.final_layer.norm_final.diff" in dropped
    assert sum(key.endswith(".diff_b") for key in dropped) == len(S.random_lora(dev.transformer, 1))
    assert converted.transformer.keys() == convert_lora(loras["peft"], names).transformer.keys()
    full = {**loras["comfyui"], "diffusion_model.double_blocks.0.img_attn.proj.diff": torch.ones(32, 32)}
    with pytest.raises(LoraError, match=r"full weight differences .*img_attn\.proj\.diff.*not a low-rank LoRA"):
        convert_lora(full, names)


def test_lycoris_is_rejected_and_t5_parts_are_skipped(service, caplog):
    dev = service.pipelines.text2img["dev"]
    names = ModelNames.of(dev.transformer, dev.text_encoder)
    lycoris = ("lora_unet_double_blocks_0_img_attn_qkv.lokr_w1", "lora_unet_single_blocks_0_linear1.hada_w1_a",
               "diffusion_model.double_blocks.0.img_attn.qkv.diff", "lora_unet_single_blocks_0_linear1.lora_mid.weight")
    for key in lycoris:
        with pytest.raises(LoraError, match="LyCORIS"):
            convert_lora({key: torch.ones(2, 2)}, names)
    lora = S.as_kohya(S.random_lora(dev.transformer, 1, only=("img_attn.proj",)))
    lora["lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight"] = torch.ones(4, 32)
    lora["lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight"] = torch.ones(32, 4)
    with caplog.at_level(logging.WARNING, logger="flux_lora.lora.formats"):
        converted = convert_lora(lora, names)
    assert len(converted.transformer) == 2 and "T5" in caplog.text


def test_memory_cache_is_bounded_and_keeps_the_newest(service):
    dev = service.pipelines.text2img["dev"]
    names = ModelNames.of(dev.transformer, None)
    items = [convert_lora(S.as_peft(S.random_lora(dev.transformer, i), dev.transformer), names) for i in range(3)]
    lru = _Lru(max_bytes=int(items[0].nbytes * 2.5))
    for i, item in enumerate(items):
        lru.put(str(i), item)
    assert "0" not in lru and "1" in lru and "2" in lru
    lru.get("1")
    lru.put("3", items[0])
    assert "1" in lru and "2" not in lru


# --------------------------------------------------------------------------- variants and modes


def test_trained_variant_keeps_its_main_lora_resident(settings, server, input_image):
    svc = Service(TRAINED, settings, url(server, "peft"))
    main = run(svc, input_image)
    loads = svc.loras.loads
    with_extra = run(svc, input_image, extra_lora=url(server, "b"))
    assert differs(with_extra, main)
    assert np.array_equal(run(svc, input_image), main)
    assert svc.loras.loads == loads + 1  # only the extra was ever loaded after the main one


def test_trained_variant_with_a_bad_cog_weights_fails_setup(settings, server):
    with pytest.raises(UserError, match="^COG_WEIGHTS: .*SDXL"):
        Service(TRAINED, settings, url(server, "sdxl"))


def test_manager_reloads_nothing_when_references_repeat(store, service, server, monkeypatch):
    from diffusers import FluxTransformer2DModel

    from flux_lora.lora import adapters

    transformer = FluxTransformer2DModel.from_pretrained(store / "FLUX.1-schnell", subfolder="transformer")
    reads: list[Path] = []
    read_lora = adapters.read_lora
    monkeypatch.setattr(adapters, "read_lora", lambda path: reads.append(path) or read_lora(path))
    manager = LoraManager({"schnell": transformer}, None)
    for ref in ("peft", "peft", "b", "peft", "b"):
        files = service.fetch_loras([LoraSpec(url(server, ref), 1.0)])
        manager.apply("schnell", service.wanted(files, go_fast=False))
    assert manager.loads == 4  # the repeat loads nothing; each switch loads from memory
    assert len(reads) == 2  # each file read and converted once


def test_manager_reads_a_file_replaced_at_the_same_path_again(store, loras, tmp_path):
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    transformer = FluxTransformer2DModel.from_pretrained(store / "FLUX.1-schnell", subfolder="transformer")
    path = tmp_path / "mine.safetensors"
    manager = LoraManager({"schnell": transformer}, None)
    wanted = [Wanted("main", path, 1.0, "mine")]
    save_file(loras["peft"], path)
    manager.apply("schnell", wanted)
    manager.apply("schnell", wanted)
    assert manager.loads == 1
    save_file(loras["b"], path)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # a later write
    manager.apply("schnell", wanted)
    assert manager.loads == 2


# --------------------------------------------------------------------------- cli and http


def test_flux_lora_predict_command_applies_the_lora(settings, server, input_image, tmp_path, service):
    from flux_lora.serving.cli import main

    args = ["predict", "-i", "prompt=a cat", "-i", f"image=@{input_image}", "-i", "prompt_strength=1.0",
            "-i", "num_inference_steps=2", "-i", "seed=7", "-i", "output_format=png",
            "-i", "disable_safety_checker=true", "-o", str(tmp_path / "out")]
    assert main([*args, "-i", f"replicate_weights={url(server, 'mixture')}"]) == 0
    image = np.asarray(Image.open(next((tmp_path / "out").rglob("*.png")))).astype(np.int16)
    assert np.array_equal(image, run(service, input_image, replicate_weights=url(server, "mixture")))
    assert main([*args, "-i", f"replicate_weights={url(server, 'sd15')}"]) == 1


def test_http_server_applies_loras_and_survives_a_bad_one(server, input_image, service, hotswap_server):
    """The session's server, on the same tiny weights as this module's service (make_tiny_store is deterministic)."""
    data_uri = "data:image/png;base64," + base64.b64encode(Path(input_image).read_bytes()).decode()
    common = {"prompt": "a cat", "image": data_uri, "prompt_strength": 1.0, "num_inference_steps": 2,
              "seed": 7, "output_format": "png", "disable_safety_checker": True}

    def predict(**inputs) -> dict:
        return hotswap_server.predict(**{**common, **inputs}).json()

    good = predict(replicate_weights=url(server, "comfyui"))
    assert good["status"] == "succeeded", good
    payload = good["output"][0].split(",", 1)[1]
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(payload)))).astype(np.int16)
    assert np.array_equal(image, run(service, input_image, replicate_weights=url(server, "comfyui")))
    bad = predict(replicate_weights=url(server, "sdxl"))
    assert bad["status"] == "failed" and "SDXL" in bad["error"], json.dumps(bad)[:500]
    after = predict()
    assert after["status"] == "succeeded", after
    payload = after["output"][0].split(",", 1)[1]
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(payload)))).astype(np.int16)
    assert np.array_equal(image, service.base)  # nothing of either LoRA stays applied


def _malformed(tr: torch.nn.Module) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, str] | None]]:
    """Files a trainer bug or a truncated conversion could write, each paired with header metadata."""
    kohya = S.as_kohya(S.random_lora(tr, 1, only=("img_attn.proj",)))
    stem = "lora_unet_double_blocks_0_img_attn_proj"
    peft = S.as_peft(S.random_lora(tr, 1, only=("img_attn.proj",)), tr)
    return {
        "alpha with two elements": ({**kohya, f"{stem}.alpha": torch.tensor([2.0, 2.0])}, None),
        "nan alpha": ({**kohya, f"{stem}.alpha": torch.tensor(float("nan"))}, None),
        "rank 0 with alpha": ({**kohya, f"{stem}.lora_down.weight": torch.zeros(0, 32),
                               f"{stem}.lora_up.weight": torch.zeros(32, 0)}, None),
        "rank 0 without alpha": ({"transformer.transformer_blocks.0.attn.to_out.0.lora_A.weight": torch.zeros(0, 32),
                                  "transformer.transformer_blocks.0.attn.to_out.0.lora_B.weight": torch.zeros(32, 0)},
                                 None),
        "0-d down": ({**kohya, f"{stem}.lora_down.weight": torch.tensor(1.0)}, None),
        "integer weights": ({k: v.to(torch.int32) for k, v in peft.items()}, None),
        "metadata list": (peft, {"lora_adapter_metadata": "[1]"}),
        "metadata not json": (peft, {"lora_adapter_metadata": "{"}),
        "metadata alpha string": (peft, {"lora_adapter_metadata": '{"lora_alpha": "x"}'}),
        "metadata pattern null": (peft, {"lora_adapter_metadata": '{"lora_alpha": 8, "alpha_pattern": {"a": null}}'}),
    }


def test_malformed_files_fail_with_a_lora_error(service):
    dev = service.pipelines.text2img["dev"]
    names = ModelNames.of(dev.transformer, dev.text_encoder)
    for label, (tensors, metadata) in _malformed(dev.transformer).items():
        with pytest.raises(LoraError, match="malformed|rank 0|metadata") as info:
            convert_lora(tensors, names, metadata)
        assert "\n" not in str(info.value), label


def test_an_adapter_write_failing_half_way_fails_clearly_and_leaves_nothing_behind(
    service, server, input_image, monkeypatch
):
    """A write into the adapters failing half-way (an out-of-memory, say): a LoraError naming the field, then the
    main LoRA alone and no LoRA give exactly their images again (no half-written adapter stays)."""
    from flux_lora.lora.packed import PackedLoraLinear

    main = run(service, input_image, replicate_weights=url(server, "peft"))
    real, calls = PackedLoraLinear.fill, []

    def fail_late(self, pieces):
        calls.append(self)
        if len(calls) == 5:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(self, pieces)

    monkeypatch.setattr(PackedLoraLinear, "fill", fail_late)
    with pytest.raises(UserError, match="^extra_lora: .*could not be applied.*out of memory"):
        run(service, input_image, extra_lora=url(server, "refused"), replicate_weights=url(server, "peft"))
    monkeypatch.undo()
    assert np.array_equal(run(service, input_image, replicate_weights=url(server, "peft")), main)
    assert np.array_equal(run(service, input_image), service.base)
    with_extra = run(service, input_image, replicate_weights=url(server, "peft"), extra_lora=url(server, "refused"))
    assert differs(with_extra, main)


def test_metadata_alpha_is_read_per_component(service):
    """A diffusers-saved file keeps `transformer.lora_alpha` and `text_encoder.lora_alpha` apart."""
    dev = service.pipelines.text2img["dev"]
    names = ModelNames.of(dev.transformer, dev.text_encoder)
    tensors = {**S.as_peft(S.random_lora(dev.transformer, 1, only=("img_attn.proj",)), dev.transformer),
               **S.clip_lora(dev.text_encoder, 4)}  # rank 4 everywhere
    plain = convert_lora(tensors, names)
    meta = {"transformer.lora_alpha": 8, "text_encoder.lora_alpha": 2,
            "text_encoder.alpha_pattern": {"^encoder.layers.0.self_attn.q_proj": 4}}
    scaled = convert_lora(tensors, names, {"lora_adapter_metadata": json.dumps(meta)})

    def ratio(part: str, key: str) -> float:
        return float((getattr(scaled, part)[key] / getattr(plain, part)[key]).flatten()[0])

    assert ratio("transformer", "transformer_blocks.0.attn.to_out.0.lora_B.weight") == pytest.approx(2.0)
    assert ratio("text_encoder", "encoder.layers.1.self_attn.q_proj.lora_B.weight") == pytest.approx(0.5)
    assert ratio("text_encoder", "encoder.layers.0.self_attn.q_proj.lora_B.weight") == pytest.approx(1.0)


def test_the_same_file_under_two_references_runs_once_at_the_sum_of_scales(store, loras, tmp_path):
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    transformer = FluxTransformer2DModel.from_pretrained(store / "FLUX.1-schnell", subfolder="transformer")
    path = tmp_path / "mine.safetensors"
    save_file(loras["peft"], path)
    manager = LoraManager({"schnell": transformer}, None)  # the cache gave both spellings the same file
    manager.apply("schnell", [Wanted("main", path, 1.0, "owner/model"),
                              Wanted("extra", path, 0.5, "https://replicate.com/owner/model")])
    assert manager.loads == 1
    name = "transformer_blocks.0.attn.to_q"
    up = loras["peft"][f"transformer.{name}.lora_B.weight"]
    layer = transformer.get_submodule(name)
    assert layer.lora_up.shape == up.shape  # one copy of the LoRA, not two side by side
    torch.testing.assert_close(layer.lora_up, up * 1.5)


def test_a_reserved_rank_budget_takes_main_and_extra_of_any_rank_without_recompiling(tmp_path):
    """A rank budget of 16 reserved before compiling, so switching either LoRA (ranks 2-8, together up to 16 on
    a layer) or its scale never recompiles; LoRAs above the budget are refused with RankBudgetError and leave the
    adapters as they were."""
    import torch._dynamo

    from flux_lora.generation import fast
    from flux_lora.generation.fast import WarmupShape
    from flux_lora.generation.tiny import tiny_transformer
    from flux_lora.lora.adapters import RankBudgetError

    torch._dynamo.reset()
    transformer = tiny_transformer(True).eval()
    files = {name: S.save(S.as_peft(S.random_lora(transformer, seed, rank=rank), transformer),
                          tmp_path / f"{name}.safetensors")
             for name, seed, rank in (("a", 1, 4), ("b", 2, 2), ("c", 3, 8), ("d", 4, 6), ("big", 5, 12))}
    manager = LoraManager({"dev": transformer}, None, max_rank=16)

    def both(main: str, extra: str | None, main_scale: float = 1.0, extra_scale: float = 1.0) -> list[Wanted]:
        out = [Wanted("main", files[main], main_scale, main)]
        return out + ([Wanted("extra", files[extra], extra_scale, extra)] if extra else [])

    def call() -> torch.Tensor:
        with torch.inference_mode():
            return transformer(**fast.dummy_inputs(transformer, WarmupShape(1, 64, 8), torch.device("cpu"),
                                                   torch.float32))[0]

    assert manager.reserve("dev") == 16
    manager.apply("dev", both("a", "b"))
    fast.compile_transformer(transformer, backend="eager")
    first = call()
    call()
    outputs = [first]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for wanted in (both("a", "b", 0.7), both("a", "b", 0.7, 0.3), both("c", "b", 0.7, 0.3),
                       both("c", "d", 0.7, 0.3), both("c", None, 0.7), both("a", "b")):
            manager.apply("dev", wanted)
            outputs.append(call())
        assert all(not torch.equal(x, y) for x, y in zip(outputs[:-2], outputs[1:-1], strict=True))
        torch.testing.assert_close(outputs[-1], first)  # back to a+b: the same numbers as before the swaps
        budget = r" on .*, above the compiled go_fast rank budget 16"
        with pytest.raises(RankBudgetError, match=r"'big' \(12\) \+ 'c' \(8\) need rank 20" + budget):
            manager.apply("dev", both("big", "c"))
        with pytest.raises(RankBudgetError, match=r"'d' \(6\) \+ 'big' \(12\) need rank 18" + budget):
            manager.apply("dev", both("d", "big"))
        torch.testing.assert_close(call(), first)
