"""The real cog HTTP server (coglet) on loopback, serving both variants on the tiny store."""

from __future__ import annotations

import base64
import json
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import CogServer, data_uri, decode_output, server_env
from fakes import FakeServer
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


# --- the trained variant as deployed: its LoRA in COG_WEIGHTS -------------------------------------------------


@pytest.fixture(scope="module")
def lora_files(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two LoRAs of the tiny transformer: the deployment's own ("baked") and one a request adds ("extra")."""
    import lora_samples as S
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(tiny_store / "FLUX.1-dev", subfolder="transformer")
    folder = tmp_path_factory.mktemp("loras")
    return {name: S.save(S.as_peft(S.random_lora(transformer, seed), transformer), folder / f"{name}.safetensors")
            for name, seed in (("baked", 11), ("extra", 12))}


@pytest.fixture(scope="module")
def baked_server(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory,
                 lora_files: dict[str, Path]) -> Iterator[CogServer]:
    """The trained variant with COG_WEIGHTS naming a LoRA file on the server; LoRA URLs on loopback allowed."""
    workdir = tmp_path_factory.mktemp("baked")
    env = server_env(tiny_store, workdir, COG_WEIGHTS=str(lora_files["baked"]), FLUX_LORA_ALLOW_PRIVATE_URLS="1")
    server = CogServer("trained", workdir, env)
    yield server
    server.stop()


def _inline(path: Path) -> str:
    return "data:application/octet-stream;base64," + base64.b64encode(path.read_bytes()).decode()


def test_the_trained_variant_runs_its_baked_lora_and_an_extra_one_on_top(
    baked_server: CogServer, hotswap_server: CogServer, lora_files: dict[str, Path]
) -> None:
    """The same image as the hot-swap variant given the same LoRAs: the baked one is really applied."""
    inputs = dict(prompt="a cat", seed=5, output_format="png", go_fast=False, disable_safety_checker=True,
                  num_inference_steps=2, aspect_ratio="custom", width=256, height=256)

    def image(server: CogServer, **more: str) -> np.ndarray:
        return np.asarray(decode_output(_ok(server.predict(**inputs, **more))["output"][0]))

    baked, extra = _inline(lora_files["baked"]), _inline(lora_files["extra"])
    base = image(hotswap_server)
    trained = image(baked_server)
    assert not np.array_equal(trained, base), "the baked LoRA changes the image"
    assert np.array_equal(trained, image(hotswap_server, replicate_weights=baked))
    both = image(baked_server, extra_lora=extra)
    assert not np.array_equal(both, trained), "the extra LoRA changes it again"
    assert np.array_equal(both, image(hotswap_server, replicate_weights=baked, extra_lora=extra))


def test_a_cancel_during_a_lora_download_stops_it_within_a_second(baked_server: CogServer) -> None:
    """The download stops and its partial file is gone within a second of the cancel; the server serves on."""
    tmp = baked_server.log.parent / "lora-cache" / "tmp"
    with FakeServer() as source:
        url = source.add_file("/slow.safetensors", b"\0" * (8 << 20))
        source.state.chunk_delay = 0.05  # 64 KiB every 50 ms: two minutes to the end
        prediction_id = f"download-{uuid.uuid4().hex[:8]}"
        answer: dict[str, requests.Response] = {}
        body = {"id": prediction_id, "input": {"prompt": "x", "extra_lora": url, "disable_safety_checker": True,
                                                "num_inference_steps": 1, "megapixels": "0.25"}}
        put = threading.Thread(target=lambda: answer.setdefault("put", requests.put(
            f"{baked_server.url}/predictions/{prediction_id}", json=body, timeout=120)))
        put.start()
        deadline = time.monotonic() + 60
        while source.state.sent < 4 * 65536:  # the download is under way
            assert time.monotonic() < deadline and put.is_alive(), "the download never started"
            time.sleep(0.02)
        assert list(tmp.iterdir()), "its partial file is in the cache's tmp/"
        cancelled_at = time.monotonic()
        assert requests.post(f"{baked_server.url}/predictions/{prediction_id}/cancel", timeout=10).status_code == 200
        while list(tmp.iterdir()):
            assert time.monotonic() - cancelled_at < 1.0, "the partial file outlived the cancel by a second"
            time.sleep(0.01)
        stopped = source.state.sent
        put.join()
        assert answer["put"].json()["status"] == "canceled"
        time.sleep(0.5)
        assert source.state.sent - stopped <= 2 * 65536, "the source is still being read"
    after = _ok(baked_server.predict(prompt="x", disable_safety_checker=True, **FAST))
    assert len(after["output"]) == 1


def test_a_setup_failure_is_setup_failed_with_a_one_line_reason(tiny_store: Path, tmp_path: Path) -> None:
    """A damaged store (a model file cut short): /health-check says SETUP_FAILED, its setup logs say why."""
    store = shutil.copytree(tiny_store, tmp_path / "store")
    damaged = next((store / "FLUX.1-dev" / "transformer").glob("*.safetensors"))
    damaged.write_bytes(damaged.read_bytes()[:100])
    server = CogServer("hotswap", tmp_path, server_env(store, tmp_path, FLUX_LORA_OFFLINE="1"), wait=False)
    try:
        health = server.health()
    finally:
        server.stop()
    assert health["status"] == "SETUP_FAILED", health
    logs = health["setup"]["logs"].strip()
    assert "\n" not in logs and "Traceback" not in logs, logs
    assert f"FLUX.1-dev (transformer/{damaged.name}: it is truncated" in logs, logs
    assert "flux-lora weights download-base" in logs, "it says how to mend the store"
