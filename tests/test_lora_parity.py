"""LoRAs as a Replicate user meets them (issue #13): strength under go_fast, CLIP LoRAs as files spell them.

Strength: the reference merges its LoRA into fp8 weights, which weakens it, and multiplies the scale by
1.5 to make up for it (the schema's "for go_fast we apply a 1.5x multiplier"). Here adapters stay unmerged
in the compute dtype on top of the fp8 linears, so the same `lora_scale`/`extra_lora_scale` must change the
image as much under go_fast as without: the norm of the change a LoRA makes against the base image (same
seed and inputs) under go_fast within 0.85-1.15 of the plain path's. With the old 1.5x it was ~1.5.

CLIP: trainers write CLIP keys with the `text_model.` prefix transformers < 5 gave CLIPTextModel's modules
(kohya `lora_te1_text_model_encoder_layers_0_...`, diffusers `text_encoder.text_model.encoder...`);
transformers 5 dropped it. The fixtures are literal key strings (tests/lora_samples.py `clip_as`), never
the loaded model's names, and each must change the CLIP output, and so the image, the same way.

Images are 64x64 img2img at prompt strength 1 (the input only sets the size), 4 steps, PNG.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import lora_samples as S
import numpy as np
import pytest
import torch
from fakes import FakeServer
from PIL import Image
from torch import nn

from flux_lora.lora.formats import ModelNames, convert_lora
from flux_lora.service import HOTSWAP, TRAINED, Service
from flux_lora.settings import Settings

pytestmark = pytest.mark.slow  # a Service per module and many predictions: `pytest -m "not slow"` skips it

RATIO_BOUNDS = (0.85, 1.15)
SCALES = (0.5, 1.0, -1.0)
COMMON = {"prompt": "a cat", "prompt_strength": 1.0, "num_inference_steps": 4, "seed": 11, "output_format": "png",
          "disable_safety_checker": True}


@pytest.fixture(scope="module")
def settings(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    saved = dict(os.environ)
    os.environ.update(FLUX_LORA_WEIGHTS=str(tiny_store), FLUX_LORA_CACHE=str(tmp_path_factory.mktemp("cache")),
                      FLUX_LORA_ALLOW_PRIVATE_URLS="1")
    yield Settings.from_env()
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def input_image(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("img") / "in.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    return str(path)


def run(service: Service, image: str, **inputs: object) -> np.ndarray:
    paths = service.predict(image=image, **{**COMMON, **inputs})
    return np.asarray(Image.open(paths[0])).astype(np.float64)


def cli(out: Path, image: str, *inputs: str, predictor: str = "hotswap") -> np.ndarray:
    """The same prediction through `flux-lora predict` (a fresh Service, cog's input validation)."""
    from flux_lora.serving.cli import main

    args = ["predict", "--predictor", predictor, "-o", str(out), "-i", f"image=@{image}"]
    for item in (*(f"{k}={str(v).lower()}" for k, v in COMMON.items()), *inputs):
        args += ["-i", item]
    assert main(args) == 0
    return np.asarray(Image.open(next(out.rglob("*.png")))).astype(np.float64)


def pooled(service: Service) -> torch.Tensor:
    """CLIP's pooled output for the prompt, as the pipeline feeds it to the transformer."""
    dev = service.pipelines.text2img["dev"]
    ids = dev.tokenizer(COMMON["prompt"], padding="max_length", max_length=dev.tokenizer_max_length,
                        truncation=True, return_tensors="pt").input_ids
    with torch.inference_mode():
        return dev.text_encoder(ids).pooler_output.clone()


@pytest.fixture(scope="module")
def service(settings: Settings, input_image: str) -> Service:
    svc = Service(HOTSWAP, settings, None)
    svc.base = run(svc, input_image)  # before any LoRA touched these pipelines
    svc.base_pooled = pooled(svc)
    return svc


@pytest.fixture(scope="module")
def files(service: Service) -> dict[str, dict[str, torch.Tensor]]:
    dev = service.pipelines.text2img["dev"]
    tr = dev.transformer
    clip = S.random_clip_lora(dev.text_encoder.config, 31)
    attention = S.as_kohya(S.random_lora(tr, 32, only=("img_attn", "txt_attn")))
    return {
        # strength: a peft main and a kohya extra (different formats, different adapters)
        "main": S.as_peft(S.random_lora(tr, 21, strength=0.3), tr),
        "extra": S.as_kohya(S.random_lora(tr, 22, strength=0.3)),
        # CLIP: one adapter in each trainer's spelling
        **{spelling: S.clip_as(clip, spelling) for spelling in S.CLIP_SPELLINGS},
        # sd-scripts training the text encoders too: transformer, CLIP and T5 parts in one file
        "kohya_full": {**attention, **S.clip_as(clip, "kohya"), **S.t5_kohya(33)},
        "kohya_transformer": attention,
    }


@pytest.fixture(scope="module")
def server(files: dict[str, dict[str, torch.Tensor]]):
    from safetensors.torch import save

    with FakeServer() as srv:
        for name, tensors in files.items():
            srv.add_file(f"/{name}.safetensors", save({k: v.contiguous() for k, v in tensors.items()}))
        yield srv


def url(server: FakeServer, name: str) -> str:
    return f"{server.url}/{name}.safetensors"


def differs(a: np.ndarray, b: np.ndarray) -> bool:
    return float(np.abs(a - b).mean()) > 0.5


# --------------------------------------------------------------------------- strength under go_fast


def change(service: Service, image: str, go_fast: bool, base: dict[str, object], lora: dict[str, object]) -> float:
    """Norm of what the LoRA inputs change in the image against the base inputs, same seed and path."""
    with_lora = run(service, image, go_fast=go_fast, **lora)
    return float(np.linalg.norm(with_lora - run(service, image, go_fast=go_fast, **base)))


def ratio(service: Service, image: str, base: dict[str, object], lora: dict[str, object]) -> tuple[float, float]:
    plain = change(service, image, False, base, lora)
    assert plain > 100, "the LoRA must visibly change the image for the ratio to mean anything"
    return change(service, image, True, base, lora) / plain, plain


@pytest.mark.filterwarnings("ignore:TorchaoLoraLinear:UserWarning")
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("slot", ["main", "extra"])
def test_hotswap_lora_is_as_strong_with_go_fast_as_without(service, server, input_image, slot, scale):
    field, scale_field = ("replicate_weights", "lora_scale") if slot == "main" else ("extra_lora", "extra_lora_scale")
    value, plain = ratio(service, input_image, {}, {field: url(server, slot), scale_field: scale})
    print(f"{slot} scale {scale:g}: plain change {plain:.0f}, go_fast/plain {value:.3f}")
    assert RATIO_BOUNDS[0] <= value <= RATIO_BOUNDS[1]


@pytest.mark.filterwarnings("ignore:TorchaoLoraLinear:UserWarning")
def test_trained_variant_baked_and_extra_loras_are_as_strong_with_go_fast(settings, files, server, input_image,
                                                                           tmp_path):
    """COG_WEIGHTS is loaded at setup on both paths; `lora_scale` 0 gives its base image."""
    trained = Service(TRAINED, settings, str(S.save(files["main"], tmp_path / "main.safetensors")))
    for scale in SCALES:
        value, plain = ratio(trained, input_image, {"lora_scale": 0.0}, {"lora_scale": scale})
        print(f"COG_WEIGHTS scale {scale:g}: plain change {plain:.0f}, go_fast/plain {value:.3f}")
        assert RATIO_BOUNDS[0] <= value <= RATIO_BOUNDS[1], scale
    extra = {"extra_lora": url(server, "extra"), "extra_lora_scale": -1.0}
    value, _ = ratio(trained, input_image, {"lora_scale": 0.0}, {"lora_scale": 0.0, **extra})
    assert RATIO_BOUNDS[0] <= value <= RATIO_BOUNDS[1]


@pytest.mark.filterwarnings("ignore:TorchaoLoraLinear:UserWarning")
def test_flux_lora_predict_trained_variant_same_strength_with_and_without_go_fast(
    settings, files, input_image, tmp_path, monkeypatch
):
    """End to end: `flux-lora predict --predictor trained` with COG_WEIGHTS, go_fast on (its default) and off."""
    monkeypatch.setenv("COG_WEIGHTS", str(S.save(files["main"], tmp_path / "main.safetensors")))
    fast = np.linalg.norm(cli(tmp_path / "a", input_image, "lora_scale=1", predictor="trained")
                          - cli(tmp_path / "b", input_image, "lora_scale=0", predictor="trained"))
    plain = np.linalg.norm(cli(tmp_path / "c", input_image, "lora_scale=1", "go_fast=false", predictor="trained")
                           - cli(tmp_path / "d", input_image, "lora_scale=0", "go_fast=false", predictor="trained"))
    assert plain > 100
    assert RATIO_BOUNDS[0] <= fast / plain <= RATIO_BOUNDS[1]


# --------------------------------------------------------------------------- CLIP LoRAs as files spell them


class _OldClip(nn.Module):
    """CLIP named as transformers < 5 named it: every module under `text_model.`."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.text_model = inner


def _module(model: nn.Module, relative: str) -> str:
    """The loaded CLIP's name for `layers.0.self_attn.q_proj`, whichever spelling it uses."""
    names = dict(model.named_modules())
    return next(n for n in (f"encoder.{relative}", f"text_model.encoder.{relative}") if n in names)


@pytest.mark.parametrize("spelling", S.CLIP_SPELLINGS)
def test_each_trainer_spelling_converts_onto_clip_named_either_way(service, spelling):
    dev = service.pipelines.text2img["dev"]
    lora = S.random_clip_lora(dev.text_encoder.config, 41, rank=2)
    for text_encoder in (dev.text_encoder, _OldClip(dev.text_encoder)):
        converted = convert_lora(S.clip_as(lora, spelling), ModelNames.of(dev.transformer, text_encoder))
        assert not converted.transformer
        assert len(converted.text_encoder) == 2 * len(lora)  # every module, nothing dropped
        for relative, (down, up) in lora.items():
            name = _module(text_encoder, relative)
            torch.testing.assert_close(converted.text_encoder[f"{name}.lora_A.weight"], down)
            torch.testing.assert_close(converted.text_encoder[f"{name}.lora_B.weight"], up)
    old_names = ModelNames.of(dev.transformer, _OldClip(dev.text_encoder))
    assert all(k.startswith("text_model.encoder.") for k in convert_lora(S.clip_as(lora, spelling), old_names)
               .text_encoder)


@pytest.mark.parametrize("spelling", S.CLIP_SPELLINGS)
def test_each_spelling_changes_the_clip_output_and_the_image_the_same_way(service, server, input_image, spelling):
    image = run(service, input_image, replicate_weights=url(server, spelling))
    changed = pooled(service)  # the adapter stays active after the prediction
    assert float((changed - service.base_pooled).norm()) > 0.05 * float(service.base_pooled.norm())
    assert differs(image, service.base)
    reference = run(service, input_image, replicate_weights=url(server, "diffusers"))
    assert np.abs(image - reference).max() <= 1  # the same adapter in every spelling
    assert np.array_equal(run(service, input_image), service.base)
    torch.testing.assert_close(pooled(service), service.base_pooled)


def test_a_full_kohya_file_applies_transformer_and_clip_and_skips_t5(service, server, input_image, caplog):
    with caplog.at_level(logging.WARNING, logger="flux_lora.lora.formats"):
        full = run(service, input_image, replicate_weights=url(server, "kohya_full"))
    assert "T5" in caplog.text and "match no FLUX module" not in caplog.text
    transformer_only = run(service, input_image, replicate_weights=url(server, "kohya_transformer"))
    assert differs(full, transformer_only)  # the CLIP part is applied, not dropped
    assert differs(transformer_only, service.base)


def test_flux_lora_predict_applies_comfyui_and_kohya_clip_loras(service, server, input_image, tmp_path):
    image = cli(tmp_path / "out", input_image, f"replicate_weights={url(server, 'comfyui')}",
                f"extra_lora={url(server, 'kohya')}", "extra_lora_scale=0.5")
    assert differs(image, service.base)
    expected = run(service, input_image, replicate_weights=url(server, "comfyui"), extra_lora=url(server, "kohya"),
                   extra_lora_scale=0.5)
    assert np.array_equal(image, expected)
