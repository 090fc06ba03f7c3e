"""The safety checkers on tiny real models whose weights force each verdict, loaded from disk."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CogServer, decode_output, server_env
from PIL import Image

from flux_lora.errors import UserError
from flux_lora.generation.safety import (
    FALCON_DIR,
    NSFW_MESSAGE,
    SD_CHECKER_DIR,
    NSFWError,
    SafetyChecker,
    make_tiny_checkers,
    safe_images,
)

CPU = torch.device("cpu")
COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """One store per rigged verdict: (SD checker flags, Falcon says)."""
    out = {}
    for flag, falcon in [("never", "normal"), ("never", "nsfw"), ("always", "normal"), ("always", "nsfw")]:
        store = tmp_path_factory.mktemp(f"{flag}-{falcon}")
        make_tiny_checkers(store, flag=flag, falcon=falcon)
        out[flag, falcon] = store
    return out


@pytest.fixture()
def images() -> list[Image.Image]:
    return [Image.new("RGB", (96, 64), color) for color in COLORS]


class Spy:
    """Wraps a model's forward to count its calls and the images in each."""

    def __init__(self, model: torch.nn.Module, arg: str) -> None:
        self.batches: list[int] = []
        self.original = model.forward
        self.arg = arg
        model.forward = self  # nn.Module.__call__ looks forward up on the instance first

    def __call__(self, *args, **kwargs):
        self.batches.append(kwargs[self.arg].shape[0])
        return self.original(*args, **kwargs)


def load(store: Path) -> tuple[SafetyChecker, Spy, Spy]:
    checker = SafetyChecker.load(store, CPU, torch.float32)
    return checker, Spy(checker.sd, "clip_input"), Spy(checker.falcon, "pixel_values")


def flag_only(checker: SafetyChecker, images: list[Image.Image], targets: list[int], at: float | None = 0.95) -> None:
    """Rig the SD checker to flag exactly `targets`: their embeddings become concepts, matched at `at` (None:
    halfway between a perfect match and the closest other image, for images tiny CLIP sees as alike)."""
    with torch.no_grad():
        pixels = checker._pixels(checker.sd_processor, images)
        embeds = checker.sd.visual_projection(checker.sd.vision_model(pixels)[1])
        normed = torch.nn.functional.normalize(embeds)
        others = [i for i in range(len(images)) if i not in targets]
        closest = float((normed[targets] @ normed[others].T).max())
        if at is None:
            at = (1 + closest) / 2
            assert closest < 0.999, "tiny CLIP sees the images as one"
        else:
            assert closest < at - 0.02, "tiny CLIP cannot tell the images apart"
        checker.sd.concept_embeds_weights.fill_(2.0)
        for concept, target in enumerate(targets):
            checker.sd.concept_embeds[concept] = embeds[target]
            checker.sd.concept_embeds_weights[concept] = at


def test_tiny_store_layout_and_labels(stores: dict) -> None:
    store = stores["never", "normal"]
    for sub in (SD_CHECKER_DIR, FALCON_DIR):
        assert {p.name for p in (store / sub).iterdir()} >= {
            "config.json", "model.safetensors", "preprocessor_config.json"
        }
    checker = SafetyChecker.load(store, CPU, torch.float32)
    assert checker.falcon.config.id2label == {0: "normal", 1: "nsfw"}
    assert checker.sd.dtype == torch.float32 and checker.falcon.dtype == torch.float32
    assert checker.sd_processor.crop_size == {"height": 32, "width": 32}


def test_load_names_the_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="safety-checker"):
        SafetyChecker.load(tmp_path, CPU, torch.float32)


def test_unflagged_images_are_kept_and_falcon_never_runs(stores: dict, images: list) -> None:
    checker, sd, falcon = load(stores["never", "nsfw"])  # Falcon would drop anything it saw
    assert checker.filter(images) == [0, 1, 2, 3]
    assert sd.batches == [4]  # one call for the whole batch
    assert falcon.batches == []


def test_falcon_verdict_follows_its_label_names_not_index_order(stores: dict, images: list) -> None:
    checker, _, _ = load(stores["always", "normal"])  # Falcon's class 0 ("normal") always wins
    assert checker.falcon_unsafe(images[:2]) == [False, False]
    checker.falcon.config.id2label = {0: "nsfw", 1: "normal"}  # same weights, class 0 now means nsfw
    assert checker.falcon_unsafe(images[:2]) == [True, True]


def test_sd_flag_overruled_by_falcon_normal(stores: dict, images: list) -> None:
    checker, sd, falcon = load(stores["always", "normal"])
    assert checker.sd_flags(images) == [True] * 4
    assert checker.filter(images) == [0, 1, 2, 3]
    assert sd.batches == [4, 4]
    assert falcon.batches == [4]  # flagged images go to Falcon in one call


def test_both_flag_drops_only_those_in_order(stores: dict, images: list, caplog) -> None:
    checker, sd, falcon = load(stores["never", "nsfw"])
    flag_only(checker, images, [1, 3])
    caplog.set_level(logging.INFO, logger="flux_lora.generation.safety")
    assert checker.filter(images) == [0, 2]
    assert sd.batches == [4]
    assert falcon.batches == [2]  # only the flagged images
    assert "dropped NSFW image(s) at index [1, 3] of 4" in caplog.text
    kept = safe_images(images, checker, disabled=False)
    assert [im.getpixel((0, 0)) for im in kept] == [COLORS[0], COLORS[2]]


def test_flagged_but_normal_keeps_order_with_partial_flags(stores: dict, images: list) -> None:
    checker, _, falcon = load(stores["never", "normal"])
    flag_only(checker, images, [0, 2])
    assert checker.sd_flags(images) == [True, False, True, False]
    assert checker.filter(images) == [0, 1, 2, 3]
    assert falcon.batches == [2]


def test_every_image_dropped_is_a_user_error(stores: dict, images: list) -> None:
    checker, _, falcon = load(stores["always", "nsfw"])
    with pytest.raises(NSFWError) as info:
        checker.filter(images)
    assert isinstance(info.value, UserError)
    assert str(info.value) == NSFW_MESSAGE
    assert NSFW_MESSAGE == (
        "All generated images contained NSFW content. Try running it again with a different prompt."
    )
    assert falcon.batches == [4]


def test_falcon_failure_drops_the_flagged_images(stores: dict, images: list, caplog) -> None:
    checker, _, _ = load(stores["never", "normal"])  # Falcon would have said "normal"
    flag_only(checker, images, [2])

    def broken(**kwargs):
        raise RuntimeError("CUDA error: out of memory")

    checker.falcon.forward = broken
    assert checker.filter(images) == [0, 1, 3]
    assert "Falcon NSFW classifier failed" in caplog.text
    assert "out of memory" in caplog.text


def test_disabled_runs_no_checker(stores: dict, images: list) -> None:
    checker, sd, falcon = load(stores["always", "nsfw"])  # would drop everything if it ran
    assert safe_images(images, checker, disabled=True) == images
    assert sd.batches == [] and falcon.batches == []


def test_empty_batch_is_not_an_error(stores: dict) -> None:
    checker, sd, falcon = load(stores["always", "nsfw"])
    assert checker.filter([]) == []
    assert sd.batches == [] and falcon.batches == []


def test_tiny_checkers_are_deterministic(tmp_path: Path) -> None:
    make_tiny_checkers(tmp_path / "a")
    make_tiny_checkers(tmp_path / "b")
    for sub in (SD_CHECKER_DIR, FALCON_DIR):
        a = (tmp_path / "a" / sub / "model.safetensors").read_bytes()
        assert a == (tmp_path / "b" / sub / "model.safetensors").read_bytes()


def test_half_precision_load_gives_the_same_verdicts(stores: dict, images: list) -> None:
    """fp16 is what CUDA deployments use; the checker's inputs follow the models' dtype."""
    checker = SafetyChecker.load(stores["always", "nsfw"], CPU, torch.float16)
    assert checker.sd.dtype == torch.float16 and checker.falcon.dtype == torch.float16
    assert checker.sd_flags(images) == [True] * 4
    assert checker.falcon_unsafe(images[:2]) == [True, True]


# --- through the real server ----------------------------------------------------------------------------------

REQUEST = {"prompt": "x", "seed": 8, "num_inference_steps": 2, "aspect_ratio": "custom", "width": 256,
           "height": 256, "output_format": "png"}


@pytest.fixture(scope="module")
def rigged_server(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CogServer]:
    """The hot-swap server on a copy of the tiny store whose SD checker flags the first image of REQUEST's batch
    of two (its embedding made a concept), and only that one; Falcon confirms whatever it is shown."""
    from flux_lora.generation.inputs import prepare_inputs
    from flux_lora.generation.pipelines import generate, load_pipelines
    from flux_lora.request import build_request

    workdir = tmp_path_factory.mktemp("rigged")
    store = shutil.copytree(tiny_store, workdir / "store")
    make_tiny_checkers(store, flag="never", falcon="nsfw")
    request = build_request(**{**REQUEST, "num_outputs": 2})
    images = generate(load_pipelines(store, CPU, torch.float32), request, prepare_inputs(request))
    checker = SafetyChecker.load(store, CPU, torch.float32)
    flag_only(checker, images, [0], at=None)  # the two images lie close for tiny CLIP
    checker.sd.save_pretrained(store / SD_CHECKER_DIR)
    server = CogServer("hotswap", workdir, server_env(store, workdir))
    yield server
    server.stop()


@pytest.mark.slow
def test_flagged_images_are_dropped_and_all_flagged_fails_through_the_server(rigged_server: CogServer) -> None:
    def predict(**inputs: object) -> dict:
        response = rigged_server.predict(**REQUEST, **inputs)
        assert response.status_code == 200, response.text
        return response.json()

    unchecked = predict(num_outputs=2, disable_safety_checker=True)
    assert unchecked["status"] == "succeeded" and len(unchecked["output"]) == 2
    checked = predict(num_outputs=2)
    assert checked["status"] == "succeeded", checked.get("error")
    assert len(checked["output"]) == 1, "one image of two dropped"
    kept = np.asarray(decode_output(checked["output"][0]))
    assert np.array_equal(kept, np.asarray(decode_output(unchecked["output"][1]))), "the other one kept"
    assert "dropped NSFW image(s) at index [0] of 2" in checked["logs"]
    alone = predict(num_outputs=1)  # the same seed's first image, alone: every image flagged
    assert alone["status"] == "failed" and NSFW_MESSAGE in alone["error"], alone
    assert "Traceback" not in alone["error"]
