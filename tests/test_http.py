"""The real cog HTTP server (coglet) on loopback, serving both variants on the tiny store."""

from __future__ import annotations

import json

import numpy as np
import pytest
import requests
from conftest import CogServer, data_uri, decode_output
from PIL import Image

from flux_lora.serving.schema import schema_json

pytestmark = pytest.mark.slow  # starts servers or subprocesses: `pytest -m "not slow"` skips it

FAST = {"num_inference_steps": 2, "megapixels": "0.25"}


def _ok(response: requests.Response) -> dict:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "succeeded", body.get("error")
    return body


def _failed(response: requests.Response) -> str:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "failed"
    assert "Traceback" not in body["error"]
    return body["error"]


@pytest.mark.parametrize("variant", ["hotswap", "trained"])
def test_health_and_openapi(variant: str, request: pytest.FixtureRequest) -> None:
    server: CogServer = request.getfixturevalue(f"{variant}_server")
    assert requests.get(f"{server.url}/health-check", timeout=5).json()["status"] == "READY"
    served = requests.get(f"{server.url}/openapi.json", timeout=5)
    assert served.status_code == 200
    assert served.json() == json.loads(schema_json(variant))
    assert "DeprecationWarning" not in server.log.read_text(), "the SDK's current API (BaseRunner.run) is used"


def test_txt2img_batch_png(hotswap_server: CogServer) -> None:
    body = _ok(hotswap_server.predict(prompt="a red car", aspect_ratio="16:9", num_outputs=2, output_format="png",
                                      seed=7, **FAST))
    images = [decode_output(uri) for uri in body["output"]]
    assert [(im.format, im.size) for im in images] == [("PNG", (672, 384))] * 2
    assert "Using seed: 7" in body["logs"]
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1])), "a batch holds distinct images"


def test_seed_reproduces_over_http(hotswap_server: CogServer) -> None:
    inputs = dict(prompt="a cat", seed=1234, output_format="png", **FAST)
    first, second = (decode_output(_ok(hotswap_server.predict(**inputs))["output"][0]) for _ in range(2))
    assert np.array_equal(np.asarray(first), np.asarray(second))
    other = decode_output(_ok(hotswap_server.predict(**{**inputs, "seed": 1235}))["output"][0])
    assert not np.array_equal(np.asarray(first), np.asarray(other))


def test_random_seed_is_logged(hotswap_server: CogServer) -> None:
    body = _ok(hotswap_server.predict(prompt="a cat", model="schnell", **FAST))
    assert "Using seed: " in body["logs"]


def test_img2img_follows_the_input_size(hotswap_server: CogServer) -> None:
    source = Image.new("RGB", (200, 120), (200, 30, 30))
    body = _ok(hotswap_server.predict(prompt="a cat", image=data_uri(source), output_format="jpg",
                                      prompt_strength=0.9, aspect_ratio="21:9", num_inference_steps=2))
    image = decode_output(body["output"][0])
    assert (image.format, image.size) == ("JPEG", (192, 112))


def test_inpaint_with_a_mask(hotswap_server: CogServer) -> None:
    source = Image.new("RGB", (256, 320), (20, 120, 220))
    mask = Image.new("L", (64, 80), 0)
    mask.paste(255, (0, 0, 32, 80))  # repaint the left half, keep the right
    body = _ok(hotswap_server.predict(prompt="a dog", image=data_uri(source), mask=data_uri(mask),
                                      num_inference_steps=2, seed=3))
    image = decode_output(body["output"][0])
    assert (image.format, image.size) == ("WEBP", (256, 320))


@pytest.mark.parametrize(
    ("inputs", "field"),
    [
        ({"num_outputs": 5}, "num_outputs"),
        ({"aspect_ratio": "7:3"}, "aspect_ratio"),
        ({"num_inference_steps": "many"}, "num_inference_steps"),
        ({"guidance_scale": 11}, "guidance_scale"),
        ({"output_format": "gif"}, "output_format"),
        ({"width": 100}, "width"),
    ],
)
def test_schema_violations_get_422(hotswap_server: CogServer, inputs: dict, field: str) -> None:
    response = hotswap_server.predict(prompt="x", **inputs)
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["body", "input", field]


def test_missing_prompt_gets_422(hotswap_server: CogServer) -> None:
    response = hotswap_server.predict(num_outputs=1)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"][-1] == "prompt"


def test_bad_requests_fail_clearly_and_the_server_keeps_serving(hotswap_server: CogServer) -> None:
    error = _failed(hotswap_server.predict(prompt="x", aspect_ratio="custom", height=512, **FAST))
    assert "width: is required when aspect_ratio is 'custom'" in error
    not_an_image = "data:image/png;base64,aGVsbG8gd29ybGQ="
    error = _failed(hotswap_server.predict(prompt="x", image=data_uri(Image.new("RGB", (64, 64))),
                                           mask=not_an_image, num_inference_steps=2))
    assert "mask: must be an image file" in error
    body = _ok(hotswap_server.predict(prompt="x", aspect_ratio="custom", width=300, height=260, **FAST))
    assert decode_output(body["output"][0]).size == (304, 256)


def test_trained_variant_has_no_replicate_weights(trained_server: CogServer) -> None:
    # cog's server strips unknown fields and warns in its own log
    body = _ok(trained_server.predict(prompt="x", replicate_weights="owner/model", output_format="png", **FAST))
    assert decode_output(body["output"][0]).size == (512, 512)
    log = trained_server.log.read_text()
    assert "Stripped unknown input fields" in log and "replicate_weights" in log
