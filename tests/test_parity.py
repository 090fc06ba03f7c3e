"""Issue #13, what a Replicate user sees: seeds, empty prompts, failure messages, parameters in each file.

Through the real cog server (coglet on loopback) and `flux-lora predict`, on the tiny store.
"""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import CogServer, data_uri
from fakes import FakeServer
from PIL import ExifTags, Image

from flux_lora.serving.cli import main

pytestmark = pytest.mark.slow  # the cog server and flux-lora predict end to end: `pytest -m "not slow"` skips it

FAST = {"num_inference_steps": 2, "megapixels": "0.25"}
COGLET_PREFIX = "Prediction failed: Async prediction failed: "  # coglet's own (see flux_lora.errors.Failure)
CLASS_NAME = re.compile(r"\b[A-Z][a-zA-Z]*(Error|Exception|Refused|NotFound|TooLarge|Unreachable)\b")


def read_parameters(image: Image.Image) -> str | None:
    """The A1111 `parameters` text: PNG text chunk, else EXIF UserComment (UNICODE, big-endian here)."""
    if "parameters" in image.info:
        return image.info["parameters"]
    comment = image.getexif().get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.UserComment)
    return None if comment is None else comment[8:].decode("utf-16-be")


def decode(uri: str) -> Image.Image:
    """An output data: URI as a Pillow image, metadata included."""
    return Image.open(io.BytesIO(base64.b64decode(uri.partition(",")[2])))


@pytest.fixture(scope="module")
def lora_host(tiny_store: Path) -> Iterator[FakeServer]:
    """A loopback host serving a LoRA for the tiny transformer (as a CDN would, behind a signed URL)."""
    from diffusers import FluxTransformer2DModel
    from lora_samples import as_peft, random_lora
    from safetensors.torch import save

    transformer = FluxTransformer2DModel.from_pretrained(tiny_store / "FLUX.1-dev", subfolder="transformer")
    lora = as_peft(random_lora(transformer, 3), transformer)
    with FakeServer() as host:
        host.add_file("/style.safetensors", save({k: v.contiguous() for k, v in lora.items()}))
        yield host


@pytest.fixture
def server(hotswap_server: CogServer) -> CogServer:
    """The session's hot-swap server (conftest.py), which may fetch from `lora_host` on loopback."""
    return hotswap_server


def _ok(response: requests.Response) -> dict:
    assert response.status_code == 200, response.text[:2000]
    body = response.json()
    assert body["status"] == "succeeded", body.get("error")
    return body


def _error(response: requests.Response) -> str:
    """The failed prediction's `error`, without coglet's prefix; checks what every failure must hold."""
    assert response.status_code == 200, response.text[:2000]
    body = response.json()
    assert body["status"] == "failed"
    error = body["error"]
    assert error.startswith(COGLET_PREFIX), error[:300]
    shown = error.removeprefix(COGLET_PREFIX)
    assert "Prediction failed" not in shown and "Traceback" not in error
    assert not CLASS_NAME.search(error), error[:300]
    assert max(len(word) for word in error.split()) <= 200
    return shown


# --------------------------------------------------------------------------- seeds (point 2)


def test_a_negative_seed_draws_one_logs_it_and_writes_it_into_each_file(server: CogServer) -> None:
    inputs = dict(prompt="a cat", num_outputs=2, output_format="png", disable_safety_checker=True, **FAST)
    body = _ok(server.predict(seed=-1, **inputs))
    seed = int(re.search(r"Using seed: (\d+)", body["logs"])[1])
    assert 0 <= seed < 2**31
    images = [decode(uri) for uri in body["output"]]
    texts = [read_parameters(im) for im in images]
    assert all(f"Seed: {seed}," in t and "Batch size: 2," in t for t in texts)
    assert [f"Batch pos: {i}," in t for i, t in enumerate(texts)] == [True, True]
    # The file alone reproduces the image: its seed and batch size give the same pixels again.
    again = [decode(uri) for uri in _ok(server.predict(seed=seed, **inputs))["output"]]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, again, strict=True))
    other = int(re.search(r"Using seed: (\d+)", _ok(server.predict(seed=-7, **inputs))["logs"])[1])
    assert other != seed


# --------------------------------------------------------------------------- empty prompts (point 3)


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t "])
def test_empty_and_blank_prompts_run(server: CogServer, prompt: str) -> None:
    body = _ok(server.predict(prompt=prompt, output_format="png", **FAST))
    assert read_parameters(decode(body["output"][0])).startswith(f"{prompt}\nSteps: 2,")


def test_img2img_with_an_empty_prompt(server: CogServer) -> None:
    source = data_uri(Image.new("RGB", (160, 96), (200, 30, 30)))
    body = _ok(server.predict(prompt="", image=source, prompt_strength=0.9, num_inference_steps=2))
    assert decode(body["output"][0]).size == (160, 96)


def test_a_request_without_prompt_still_gets_422(server: CogServer) -> None:
    response = server.predict(**FAST)
    assert response.status_code == 422 and response.json()["detail"][0]["loc"][-1] == "prompt"


# --------------------------------------------------------------------------- failure messages (point 6)


def test_failures_name_the_field_without_class_names(server: CogServer, lora_host: FakeServer) -> None:
    shown = _error(server.predict(prompt="x", aspect_ratio="custom", height=512, **FAST))
    assert shown == "width: is required when aspect_ratio is 'custom' (an integer from 256 to 1440)"
    shown = _error(server.predict(prompt="x", seed=2**63, **FAST))
    assert shown.startswith("seed: must be an integer up to")
    shown = _error(server.predict(prompt="x", extra_lora=f"{lora_host.url}/missing.safetensors?token=SECRET",
                                  **FAST))
    assert shown.startswith("extra_lora: ") and "SECRET" not in shown


@pytest.mark.parametrize("kind", ["unparsable", "url"])
def test_a_huge_reference_is_echoed_shortened_and_redacted(server: CogServer, lora_host: FakeServer, kind: str) -> None:
    path = "a" * 100_000
    ref = f"{path}!" if kind == "unparsable" else f"{lora_host.url}/{path}.safetensors?token=SECRET"  # loopback only
    shown = _error(server.predict(prompt="x", replicate_weights=ref, **FAST))
    assert shown.startswith("replicate_weights: ") and "SECRET" not in shown
    assert "aaaaaaaaaa" in shown and len(shown) < 1000


def test_one_prediction_failed_at_most(server: CogServer) -> None:
    body = server.predict(prompt="x", aspect_ratio="custom", height=512, **FAST).json()
    assert body["error"].count("Prediction failed") <= 1


# --------------------------------------------------------------------------- parameters in each file (point 10)


def test_loras_in_the_file_are_redacted_and_input_images_absent(server: CogServer, lora_host: FakeServer) -> None:
    source = data_uri(Image.new("RGB", (160, 96), (20, 120, 220)))
    lora = f"{lora_host.url}/style.safetensors?X-Amz-Signature=SECRET"
    body = _ok(server.predict(prompt="a dog, by night", image=source, prompt_strength=0.75, seed=5,
                              replicate_weights=lora, lora_scale=0.6, extra_lora=lora, extra_lora_scale=-1,
                              go_fast=True, output_format="jpg", num_inference_steps=4))
    text = read_parameters(decode(body["output"][0]))
    prompt, line = text.rsplit("\n", 1)
    assert prompt == "a dog, by night"
    fields = dict(re.findall(r'(\w[\w ]*): ("[^"]*"|[^,]*)(?:, |$)', line))
    shown = f'"{lora_host.url}/style.safetensors?…"'
    assert fields == {
        "Steps": "4", "Sampler": "Euler", "Schedule type": "Simple", "CFG scale": "1", "Distilled CFG Scale": "3",
        "Seed": "5", "Size": "160x96", "Model": "dev", "Mode": "img2img", "Prompt strength": "0.75",
        "go_fast": "True", "Batch size": "1", "Batch pos": "0", "Lora": shown, "Lora scale": "0.6",
        "Extra lora": shown, "Extra lora scale": "-1", "Version": "flux-lora-cog",
    }
    assert "SECRET" not in text and "data:" not in text and "base64" not in text


def _predict(out: Path, *inputs: str) -> list[Path]:
    args = ["predict", "-o", str(out), "-i", "num_inference_steps=2", "-i", "megapixels=0.25"]
    for item in inputs:
        args += ["-i", item]
    assert main(args) == 0
    return sorted(out.glob("prediction-*/out-*"))


@pytest.mark.parametrize("fmt", ["png", "jpg", "webp"])
def test_flux_lora_predict_writes_the_seed_into_each_format(
    store_env: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, fmt: str
) -> None:
    caplog.set_level("INFO")
    paths = _predict(tmp_path, "prompt=a cat: 猫", "seed=-1", f"output_format={fmt}", "num_outputs=2")
    seed = int(re.search(r"Using seed: (\d+)", caplog.text)[1])
    for index, path in enumerate(paths):
        with Image.open(path) as image:
            assert image.format == {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}[fmt]
            text = read_parameters(image)
        assert text.startswith("a cat: 猫\n") and f"Seed: {seed}," in text and f"Batch pos: {index}," in text


def test_output_metadata_can_be_turned_off(store_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLUX_LORA_OUTPUT_METADATA", "0")
    for fmt in ("png", "jpg", "webp"):
        (path,) = _predict(tmp_path / fmt, "prompt=a cat", "seed=3", f"output_format={fmt}")
        with Image.open(path) as image:
            assert read_parameters(image) is None and "xmp" not in image.info
