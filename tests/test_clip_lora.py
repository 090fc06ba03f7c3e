"""CLIP text-encoder LoRAs as real files spell them (issue #13, point 5).

Trainers write CLIP keys with the `text_model.` prefix transformers < 5 gave CLIPTextModel's modules
(kohya `lora_te1_text_model_encoder_layers_0_...`, diffusers `text_encoder.text_model.encoder...`);
transformers 5 dropped it. The fixtures here are literal key strings (tests/lora_samples.py `clip_as`),
never the loaded model's names, and each must change the CLIP output and so the image, the same way.
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

from flux_lora.lora import ModelNames, convert_lora
from flux_lora.service import HOTSWAP, Service
from flux_lora.settings import Settings


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
    Image.fromarray(np.random.default_rng(5).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    return str(path)


def run(service: Service, image: str, **inputs: object) -> np.ndarray:
    paths = service.predict(prompt="a cat", image=image, prompt_strength=1.0, num_inference_steps=2, seed=7,
                            output_format="png", disable_safety_checker=True, **inputs)
    return np.asarray(Image.open(paths[0])).astype(np.int16)


def pooled(service: Service) -> torch.Tensor:
    """CLIP's pooled output for the prompt, as the pipeline feeds it to the transformer."""
    dev = service.pipelines.text2img["dev"]
    ids = dev.tokenizer("a cat", padding="max_length", max_length=dev.tokenizer_max_length, truncation=True,
                        return_tensors="pt").input_ids
    with torch.inference_mode():
        return dev.text_encoder(ids, output_hidden_states=False).pooler_output.clone()


@pytest.fixture(scope="module")
def service(settings: Settings, input_image: str) -> Service:
    svc = Service(HOTSWAP, settings, None)
    svc.base = run(svc, input_image)
    svc.base_pooled = pooled(svc)
    return svc


@pytest.fixture(scope="module")
def files(service: Service) -> dict[str, dict[str, torch.Tensor]]:
    dev = service.pipelines.text2img["dev"]
    clip = S.random_clip_lora(dev.text_encoder.config, 31)
    transformer = S.as_kohya(S.random_lora(dev.transformer, 32, only=("img_attn", "txt_attn")))
    out = {spelling: S.clip_as(clip, spelling) for spelling in S.CLIP_SPELLINGS}
    # sd-scripts with --network_train_unet_only off: transformer, CLIP and T5 parts in one file.
    out["kohya_full"] = {**transformer, **S.clip_as(clip, "kohya"), **S.t5_kohya(33)}
    out["kohya_transformer"] = transformer
    return out


@pytest.fixture(scope="module")
def server(files: dict[str, dict[str, torch.Tensor]]):
    from safetensors.torch import save

    with FakeServer() as srv:
        for name, tensors in files.items():
            srv.add_file(f"/{name}.safetensors", save({k: v.contiguous() for k, v in tensors.items()}))
        yield srv


def url(server: FakeServer, name: str) -> str:
    return f"{server.url}/{name}.safetensors"


def _module(model: nn.Module, relative: str) -> str:
    """The loaded CLIP's name for `layers.0.self_attn.q_proj`, whichever spelling this transformers uses."""
    names = dict(model.named_modules())
    return next(n for n in (f"encoder.{relative}", f"text_model.encoder.{relative}") if n in names)


class _OldClip(nn.Module):
    """CLIP named as transformers < 5 named it: every module under `text_model.`."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.text_model = inner


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
    names = ModelNames.of(dev.transformer, _OldClip(dev.text_encoder))
    assert any(k.startswith("text_model.encoder.") for k in convert_lora(S.clip_as(lora, spelling), names).text_encoder)


@pytest.mark.parametrize("spelling", S.CLIP_SPELLINGS)
def test_each_spelling_changes_the_clip_output_and_the_image_the_same_way(service, server, input_image, spelling):
    image = run(service, input_image, replicate_weights=url(server, spelling))
    changed = pooled(service)  # the adapter stays active after the prediction
    assert float((changed - service.base_pooled).norm()) > 0.05 * float(service.base_pooled.norm())
    assert float(np.abs(image - service.base).mean()) > 0.5
    reference = run(service, input_image, replicate_weights=url(server, "diffusers"))
    assert np.abs(image - reference).max() <= 1  # the same adapter in every spelling
    assert np.array_equal(run(service, input_image), service.base)
    torch.testing.assert_close(pooled(service), service.base_pooled)


def test_a_full_kohya_file_applies_transformer_and_clip_and_skips_t5(service, server, input_image, caplog):
    with caplog.at_level(logging.WARNING, logger="flux_lora.lora"):
        full = run(service, input_image, replicate_weights=url(server, "kohya_full"))
    assert "T5" in caplog.text and "match no FLUX module" not in caplog.text
    transformer_only = run(service, input_image, replicate_weights=url(server, "kohya_transformer"))
    assert float(np.abs(full - transformer_only).mean()) > 0.5  # the CLIP part is applied, not dropped
    assert float(np.abs(transformer_only - service.base).mean()) > 0.5


def test_flux_lora_predict_applies_a_comfyui_clip_lora(service, server, input_image, tmp_path):
    from flux_lora.cli import main

    args = ["predict", "-i", "prompt=a cat", "-i", f"image=@{input_image}", "-i", "prompt_strength=1.0",
            "-i", "num_inference_steps=2", "-i", "seed=7", "-i", "output_format=png",
            "-i", "disable_safety_checker=true", "-o", str(tmp_path / "out"),
            "-i", f"replicate_weights={url(server, 'comfyui')}", "-i", "extra_lora_scale=0.5",
            "-i", f"extra_lora={url(server, 'kohya')}"]
    assert main(args) == 0
    image = np.asarray(Image.open(next((tmp_path / "out").rglob("*.png")))).astype(np.int16)
    assert float(np.abs(image - service.base).mean()) > 0.5
    expected = run(service, input_image, replicate_weights=url(server, "comfyui"), extra_lora=url(server, "kohya"),
                   extra_lora_scale=0.5)
    assert np.array_equal(image, expected)
