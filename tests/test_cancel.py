"""A cancel reaches every stage of a prediction and each stage stops itself at a safe point (flux_lora.cancel).

In process on the tiny store: a prediction runs in a context holding its own token, as predict.py runs
it, and is cancelled from another thread or as it enters a stage. A stage's own check must stop it: the
work that stage would do next (a download, writing adapters, a denoising step, a checker, a file) never
starts. Through the real server: tests/test_http.py (a LoRA download) and tests/test_server.py (denoising).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import lora_samples as S
import pytest
from fakes import FakeServer

from flux_lora import cancel
from flux_lora.generation import outputs, pipelines, safety
from flux_lora.lora.adapters import LoraManager
from flux_lora.service import HOTSWAP, Service
from flux_lora.settings import Settings
from flux_lora.weights.cache import WeightCache
from flux_lora.weights.http import DownloadPolicy

QUICK = {"prompt": "x", "num_inference_steps": 1, "aspect_ratio": "custom", "width": 256, "height": 256,
         "seed": 1, "output_format": "png"}
CHUNK = 1 << 16  # tests/fakes.py writes a body in 64 KiB chunks
STAGES = ["fetch", "adapters", "denoise", "safety", "encode"]  # in the order a prediction runs them


def _cancel_when(token: cancel.Token, ready: Callable[[], bool]) -> dict[str, float]:
    """Cancel `token` from another thread once `ready()`; the returned dict gets the time it did."""
    at: dict[str, float] = {}

    def watch() -> None:
        deadline = time.monotonic() + 30
        while not ready() and time.monotonic() < deadline:
            time.sleep(0.01)
        at["cancel"] = time.monotonic()
        token.cancel()

    threading.Thread(target=watch, daemon=True).start()
    return at


@pytest.mark.parametrize("source", ["slow", "stalled", "ranged parts"])
def test_a_cancelled_download_stops_within_a_second_and_removes_its_partial_file(tmp_path: Path, source: str):
    """A slow source is read piece by piece, a stalled one blocks a read until the cancel shuts its socket,
    ranged parts run in threads of their own: each stops at once, and the partial file is gone before the
    run raises its cancel."""
    with FakeServer() as server:
        url = server.add_file("/big.safetensors", b"\0" * (4 << 20))
        server.state.chunk_delay = 5.0 if source == "stalled" else 0.05  # stalled: headers, then nothing
        parts = 4 if source == "ranged parts" else 1
        policy = DownloadPolicy(allow_private=True, retries=0, connections=parts, part_bytes=256 << 10)
        cache = WeightCache(tmp_path / "cache", policy, 1 << 30, 0)
        token = cancel.Token()
        if source == "stalled":
            at = _cancel_when(token, lambda: bool(list((cache.root / "tmp").glob("*/payload"))))
        else:
            at = _cancel_when(token, lambda: server.state.sent >= 3 * CHUNK)
        with pytest.raises(cancel.Cancelled):
            cancel.context_with(token).run(cache.fetch, url)
        stopped = time.monotonic() - at["cancel"]
        assert list((cache.root / "tmp").iterdir()) == [] and cache.entries() == []
        assert stopped < 1.0, f"the download went on {stopped:.2f}s after the cancel"
        if source == "ranged parts":
            assert len({r.headers.get("Range") for r in server.requests}) > 2, "the parts ran in parallel"
        sent = server.state.sent
        time.sleep(0.5)
        assert server.state.sent - sent <= 4 * CHUNK, "nobody reads the source any more"


@pytest.fixture(scope="module")
def service(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Service:
    settings = dataclasses.replace(Settings.from_env(), weights_dir=tiny_store, allow_private_urls=True,
                                   cache_dir=tmp_path_factory.mktemp("cache"))
    return Service(HOTSWAP, settings, None)


@pytest.fixture(scope="module")
def lora_source(service: Service) -> Iterator[FakeServer]:
    """A LoRA of the tiny transformer for each stage's test (`/{stage}.safetensors`): each is new to the service."""
    from safetensors.torch import save

    dev = service.pipelines.text2img["dev"]
    with FakeServer() as server:
        for seed, stage in enumerate(STAGES):
            tensors = S.as_peft(S.random_lora(dev.transformer, seed), dev.transformer)
            server.add_file(f"/{stage}.safetensors", save({k: v.contiguous() for k, v in tensors.items()}))
        yield server


@pytest.mark.parametrize("stage", STAGES)
def test_a_cancel_stops_the_stage_it_arrives_in(service: Service, lora_source: FakeServer,
                                                monkeypatch: pytest.MonkeyPatch, stage: str):
    """Cancelled as the run enters a stage: that stage's own check stops it before its work."""
    token = cancel.Token()
    entry = {
        "fetch": (WeightCache, "fetch"),
        "adapters": (LoraManager, "apply"),
        "denoise": (pipelines, "generate"),
        "safety": (safety, "safe_images"),
        "encode": (outputs, "save_images"),
    }[stage]
    original = getattr(*entry)

    def entered(*args, **kwargs):
        token.cancel()
        return original(*args, **kwargs)

    monkeypatch.setattr(*entry, entered)
    dev = service.pipelines.text2img["dev"]
    work: dict[str, list[int]] = {"denoise": [], "safety": []}
    hooks = [dev.transformer.register_forward_hook(lambda *a: work["denoise"].append(1)),
             service.safety.sd.register_forward_hook(lambda *a: work["safety"].append(1))]
    downloads, loads = lora_source.count("GET", f"/{stage}"), service.loras.loads
    before = set(service.outputs_dir.iterdir())
    lora = f"{lora_source.url}/{stage}.safetensors"
    try:
        with pytest.raises(cancel.Cancelled):
            cancel.context_with(token).run(service.predict, **QUICK, replicate_weights=lora)
    finally:
        for hook in hooks:
            hook.remove()
    stopped_before = {
        "fetch": lora_source.count("GET", f"/{stage}") == downloads,  # nothing requested
        "adapters": service.loras.loads == loads,  # read and converted, nothing written
        "denoise": work["denoise"] == [],  # not one step
        "safety": work["safety"] == [],  # no checker ran
        "encode": set(service.outputs_dir.iterdir()) == before,  # no file, no folder
    }
    assert stopped_before[stage], stage
    assert all(stopped_before[later] for later in STAGES[STAGES.index(stage) + 1:]), "no later stage ran"
    monkeypatch.undo()
    paths = service.predict(**QUICK, disable_safety_checker=True)  # the service is whole: the next one runs
    assert [p.suffix for p in paths] == [".png"]


def test_a_cancelled_prediction_frees_its_slot_at_once_and_the_next_waits_for_the_run_to_stop():
    """The 409 after cancels (#20.3): cog frees a prediction's slot only when its `run` returns. A cancelled
    prediction's `run` returns at once, while its run stops in the GPU thread; the next prediction waits for
    the GPU until then, never overlapping it, and runs after it in order. The service here is one that
    ignores its token until told to finish: a stage that stops late (a long step, the VAE)."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from flux_lora.serving.schema import load_predictor_class

    release, order = threading.Event(), []

    class SlowToStop:
        def predict(self, **inputs):
            order.append(f"start {inputs['prompt']}")
            if inputs["prompt"] == "first":
                release.wait(10)
            order.append(f"end {inputs['prompt']}")
            return []

    predictor = load_predictor_class("hotswap")()
    predictor.service, predictor.gpu = SlowToStop(), asyncio.Lock()
    predictor.gpu_thread = ThreadPoolExecutor(1)

    async def scenario() -> float:
        first = asyncio.ensure_future(predictor.in_turn({"prompt": "first"}))
        while not order:
            await asyncio.sleep(0.01)
        first.cancel()
        start = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await first
        returned_in = time.monotonic() - start
        second = asyncio.ensure_future(predictor.in_turn({"prompt": "second"}))
        await asyncio.sleep(0.2)
        assert order == ["start first"]  # the GPU is still the cancelled run's
        release.set()
        assert await second == []
        return returned_in

    try:
        assert asyncio.run(scenario()) < 0.5
    finally:
        release.set()
        predictor.gpu_thread.shutdown()
    assert order == ["start first", "end first", "start second", "end second"]
