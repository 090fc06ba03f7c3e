"""Compiled go_fast under real LoRA traffic: after setup nothing compiles again, nothing fails.

The Service is built as production builds it with FLUX_LORA_COMPILE=1, on dynamo's eager backend
(`FLUX_LORA_TEST_BACKEND=inductor pytest tests/test_compiled.py` compiles for real, by hand: 117 s on
the 2-core machine, the server's cold start then reading the saved compile cache): graph capture and
guards, which decide every recompile, are the same; only the kernels differ. Twelve LoRAs of
different targets, ranks and formats go through the packed adapter, one or two at a time; each image is
compared with the same request on the uncompiled go_fast path, and dynamo's graph counter must not move.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import lora_samples as S
import numpy as np
import pytest
import torch
from conftest import isolate_compile_cache_env
from fakes import FakeServer
from PIL import Image

from flux_lora.generation import fast
from flux_lora.generation.tiny import make_tiny_store
from flux_lora.service import HOTSWAP, TRAINED, Service
from flux_lora.settings import Settings

pytestmark = pytest.mark.slow  # compiles at setup, starts a server: `pytest -m "not slow"` skips it

BACKEND = os.environ.get("FLUX_LORA_TEST_BACKEND", "eager")
RANK = 8  # the largest rank of these LoRAs
BUDGET = 2 * RANK  # the compiled transformers' rank budget per layer in these tests (FLUX_LORA_MAX_RANK)
# Compiled and uncompiled go_fast differ only in float rounding order (zero padding adds exact zeros).
MAX_LEVELS = 2


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    store = make_tiny_store(tmp_path_factory.mktemp("store"))
    base = Settings.from_env()
    return dataclasses.replace(
        base, weights_dir=store, cache_dir=tmp_path_factory.mktemp("cache"), allow_private_urls=True,
        compile=True, compile_backend=BACKEND, lora_max_rank=BUDGET,
    )


def _loras(transformer: torch.nn.Module, text_encoder: torch.nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Twelve LoRAs whose target layer sets and ranks all differ, in trainers' own key spellings."""
    attn, mlp, single = ("img_attn", "txt_attn"), ("img_mlp", "txt_mlp"), ("single_blocks",)
    mixed = {**S.random_lora(transformer, 20, rank=2, only=attn), **S.random_lora(transformer, 21, rank=6, only=mlp)}
    return {
        "attn_r1": S.as_peft(S.random_lora(transformer, 1, rank=1, only=attn), transformer),
        "mlp_r2": S.as_peft(S.random_lora(transformer, 2, rank=2, only=mlp), transformer),
        "single_r3": S.as_kohya(S.random_lora(transformer, 3, rank=3, only=single)),
        "all_r4": S.as_peft(S.random_lora(transformer, 4, rank=4), transformer),
        "all_r8_kohya": S.as_kohya(S.random_lora(transformer, 5, rank=RANK)),
        "img_only_r5": S.as_comfyui(S.random_lora(transformer, 6, rank=5, only=("img_",))),
        "txt_only_r6": S.as_peft(S.random_lora(transformer, 7, rank=6, strength=1.5, only=("txt_",)), transformer),
        "per_layer_ranks": S.as_peft(mixed, transformer),  # a rank pattern (peft's rank/alpha_pattern)
        "clip": S.clip_lora(text_encoder, 8),
        "xlabs_r7": S.as_xlabs(S.random_lora(transformer, 9, rank=7, only=attn)),
        "mixture_r3": S.as_mixture(S.random_lora(transformer, 10, rank=3), transformer),
        "single_r8": S.as_peft(S.random_lora(transformer, 11, rank=RANK, only=single), transformer),
        "above_rank": S.as_peft(S.random_lora(transformer, 12, rank=BUDGET + 4), transformer),  # plain path
    }


@pytest.fixture(scope="module")
def plain(settings: Settings) -> Service:
    """The same deployment uncompiled: the reference each compiled image is held to."""
    return Service(HOTSWAP, dataclasses.replace(settings, compile=False), None)


@pytest.fixture(scope="module")
def server(plain: Service):
    from safetensors.torch import save

    dev = plain.pipelines.text2img["dev"]
    with FakeServer() as srv:
        for name, tensors in _loras(dev.transformer, dev.text_encoder).items():
            srv.add_file(f"/{name}.safetensors", save({k: v.contiguous() for k, v in tensors.items()}))
        yield srv


def url(server: FakeServer, name: str) -> str:
    return f"{server.url}/{name}.safetensors"


def run(service: Service, **inputs) -> np.ndarray:
    paths = service.predict(prompt="a cat", num_inference_steps=2, seed=7, output_format="png", go_fast=True,
                            disable_safety_checker=True, aspect_ratio="custom", width=256, height=256, **inputs)
    return np.asarray(Image.open(paths[0])).astype(np.int16)


@pytest.fixture(scope="module")
def compiled(settings: Settings) -> Iterator[Service]:
    with pytest.MonkeyPatch.context() as monkeypatch:  # compiling points the compile caches at the store
        isolate_compile_cache_env(monkeypatch)
        yield Service(HOTSWAP, settings, None)


LORAS = ["attn_r1", "mlp_r2", "single_r3", "all_r4", "all_r8_kohya", "img_only_r5", "txt_only_r6",
         "per_layer_ranks", "clip", "xlabs_r7", "mixture_r3", "single_r8"]


def test_twelve_loras_one_or_two_at_a_time_never_recompile(compiled: Service, plain: Service, server, tmp_path: Path):
    picture = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(picture)
    graphs = fast.compiled_graphs()
    base = run(compiled)
    assert np.abs(base - run(plain)).max() <= MAX_LEVELS
    previous = None
    for index, name in enumerate(LORAS):
        inputs = {"replicate_weights": url(server, name), "lora_scale": 0.9}
        if previous is not None and index % 2:  # every other request also takes an extra LoRA
            inputs.update(extra_lora=url(server, previous), extra_lora_scale=0.7)
        if index % 3 == 2:
            inputs["model"] = "schnell"
        if index == 4:
            inputs["num_outputs"] = 3  # batches of 2-4 share the batch-2 graph
        if index == 6:
            inputs.update(image=str(picture), prompt_strength=0.8)  # img2img: the same transformer graphs
        image = run(compiled, **inputs)
        assert np.abs(image - base).mean() > 0.5, f"{name}: the LoRA changed nothing"
        assert np.abs(image - run(plain, **inputs)).max() <= MAX_LEVELS, name
        previous = name
    assert run(compiled).tolist() == base.tolist()  # no LoRA: the zeroed adapters add exact zeros
    assert fast.compiled_graphs() == graphs
    assert sum(fast.eager_fallbacks.values()) == 0


def test_a_lora_above_the_rank_budget_runs_uncompiled_for_that_request(compiled: Service, plain: Service, server,
                                                                        caplog):
    graphs = fast.compiled_graphs()
    inputs = {"replicate_weights": url(server, "above_rank")}
    with caplog.at_level(logging.WARNING, logger="flux_lora"):
        image = run(compiled, **inputs)
    assert f"above the compiled go_fast rank budget {BUDGET}" in caplog.text
    assert "runs on the plain transformer" in caplog.text
    reference = plain.predict(prompt="a cat", num_inference_steps=2, seed=7, output_format="png", go_fast=False,
                              disable_safety_checker=True, aspect_ratio="custom", width=256, height=256, **inputs)
    assert np.array_equal(image, np.asarray(Image.open(reference[0])).astype(np.int16))
    run(compiled, replicate_weights=url(server, "all_r4"))  # the compiled path serves the next LoRA
    assert fast.compiled_graphs() == graphs


def test_trained_variant_with_its_baked_lora_then_extras_never_recompiles(settings: Settings, server):
    service = Service(TRAINED, settings, url(server, "all_r4"))
    graphs = fast.compiled_graphs()
    baked = run(service)
    for name in ("attn_r1", "clip", "single_r8", "mlp_r2"):
        assert np.abs(run(service, extra_lora=url(server, name)) - baked).mean() > 0.5
    assert run(service).tolist() == baked.tolist()
    assert fast.compiled_graphs() == graphs


def test_a_dynamo_error_after_setup_runs_that_call_eagerly(compiled: Service, caplog):
    """A call whose guards fail (here: grad mode on, never seen at warm-up) runs eagerly, logged."""
    transformer = compiled.pipelines.fast.transformers["dev"]
    inputs = fast.dummy_inputs(transformer, fast.WarmupShape(1, 64, 8), torch.device("cpu"), torch.float32)
    graphs, before = fast.compiled_graphs(), fast.eager_fallbacks["dev"]
    with caplog.at_level(logging.WARNING, logger="flux_lora"), torch.enable_grad():
        out = transformer(**inputs)[0]
    assert fast.eager_fallbacks["dev"] == before + 1 and "runs eagerly" in caplog.text
    assert fast.compiled_graphs() == graphs and torch.isfinite(out).all()


def test_every_cold_start_comes_up_in_one_state_and_compiles_nothing_new(settings: Settings, tmp_path: Path,
                                                                       server):
    """Fresh store (quantized now), then the pre-quantized copy: the second finds the first's graphs."""
    store = make_tiny_store(tmp_path / "store")
    fresh_settings = dataclasses.replace(settings, weights_dir=store)
    first = Service(HOTSWAP, fresh_settings, None)
    assert list((store / "fast").glob("dev-*.pt"))
    if BACKEND == "inductor":  # the compile cache the next cold start reads (`second`, and the server test's)
        assert list((store / "fast" / "compile-cache").glob("mega-*.bin"))
    graphs = fast.compiled_graphs()
    second = Service(HOTSWAP, fresh_settings, None)  # reads the pre-quantized copy
    assert fast.compiled_graphs() == graphs, "the pre-quantized cold start compiled again: another state"
    for service in (first, second):
        for transformer in service.pipelines.fast.transformers.values():
            assert not any(p.requires_grad for p in transformer.parameters())
        run(service, replicate_weights=url(server, "all_r4"), extra_lora=url(server, "clip"))
    assert fast.compiled_graphs() == graphs


def test_a_compiled_server_serves_loras_of_other_targets_without_compiling_again(settings: Settings, server,
                                                                                 tmp_path: Path):
    """From outside, as the production crash was seen: the real cog server with FLUX_LORA_COMPILE=1, LoRAs of
    different targets one or two at a time, every request succeeds and none logs an eager fallback. Its cold start
    is a new process on a store holding the pre-quantized copies (and, with inductor, the compile cache)."""
    from conftest import CogServer, server_env

    env = server_env(settings.weights_dir, tmp_path, FLUX_LORA_COMPILE="1", FLUX_LORA_COMPILE_BACKEND=BACKEND,
                     FLUX_LORA_MAX_RANK=str(BUDGET), FLUX_LORA_ALLOW_PRIVATE_URLS="1")
    cog = CogServer("hotswap", tmp_path, env)
    try:
        common = {"prompt": "a cat", "num_inference_steps": 2, "go_fast": True, "aspect_ratio": "custom",
                  "width": 256, "height": 256, "output_format": "png", "disable_safety_checker": True}
        for main, extra in (("attn_r1", None), ("mlp_r2", "clip"), ("single_r3", "attn_r1"), (None, "all_r4")):
            inputs = {**common, "seed": 1}
            if main:
                inputs["replicate_weights"] = url(server, main)
            if extra:
                inputs["extra_lora"] = url(server, extra)
            body = cog.predict(**inputs).json()
            assert body["status"] == "succeeded", body.get("error")
            assert "compile again" not in body["logs"] and "runs eagerly" not in body["logs"], body["logs"]
    finally:
        cog.stop()
