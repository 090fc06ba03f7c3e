"""Sizing, seed and request rules: pure Python, no torch."""

from __future__ import annotations

import random
import sys

import pytest

from flux_lora.request import (
    ASPECT_RATIOS,
    MAX_SEED,
    InputError,
    Mode,
    build_request,
    custom_size,
    fit_input_size,
    resolve_seed,
    round_to_multiple,
    size_for_aspect_ratio,
)


def test_request_rules_do_not_import_torch() -> None:
    import subprocess

    code = "import sys, flux_lora.request; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    ("ratio", "size"),
    [("1:1", (1024, 1024)), ("16:9", (1344, 768)), ("21:9", (1536, 640)), ("3:2", (1216, 832)),
     ("2:3", (832, 1216)), ("4:5", (896, 1088)), ("5:4", (1088, 896)), ("3:4", (896, 1152)),
     ("4:3", (1152, 896)), ("9:16", (768, 1344)), ("9:21", (640, 1536))],
)
def test_aspect_ratios_at_one_megapixel(ratio: str, size: tuple[int, int]) -> None:
    assert size_for_aspect_ratio(ratio, "1") == size
    assert size_for_aspect_ratio(ratio, "0.25") == (size[0] // 2, size[1] // 2)


def test_every_standard_size_is_a_multiple_of_16() -> None:
    for ratio in ASPECT_RATIOS:
        for mp in ("1", "0.25"):
            assert all(side % 16 == 0 for side in size_for_aspect_ratio(ratio, mp))


def test_custom_sizes_round_to_nearest_16() -> None:
    assert custom_size(1000, 257) == (1008, 256)
    assert custom_size(264, 1440) == (272, 1440)  # halves round up
    assert round_to_multiple(263) == 256


@pytest.mark.parametrize(("width", "height", "field"), [(None, 512, "width"), (512, None, "height")])
def test_custom_requires_both_sides(width: int | None, height: int | None, field: str) -> None:
    with pytest.raises(InputError, match=rf"^{field}: is required when aspect_ratio is 'custom'") as exc:
        build_request(prompt="x", aspect_ratio="custom", width=width, height=height)
    assert exc.value.field == field


def test_custom_bounds() -> None:
    with pytest.raises(InputError, match="width: must be between 256 and 1440, got 100"):
        custom_size(100, 512)


@pytest.mark.parametrize(
    ("size", "fitted"),
    [((512, 512), (512, 512)), ((2880, 1440), (1440, 720)), ((1000, 3000), (480, 1440)), ((200, 120), (192, 112)),
     ((8, 8), (16, 16))],
)
def test_input_images_fit_1440_in_multiples_of_16(size: tuple[int, int], fitted: tuple[int, int]) -> None:
    assert fit_input_size(*size) == fitted


def test_seeds_are_31_bit_and_kept_when_given() -> None:
    assert resolve_seed(1234) == 1234
    rng = random.Random(0)
    seeds = {resolve_seed(None, rng) for _ in range(200)}
    assert len(seeds) == 200 and all(0 <= s < 2**31 for s in seeds)
    assert max(seeds) > 2**16  # not the reference's 65,536 seeds


@pytest.mark.parametrize("seed", [-1, -2, -(2**40)])
def test_a_negative_seed_means_random(seed: int) -> None:
    rng = random.Random(0)
    drawn = {resolve_seed(seed, rng) for _ in range(50)}
    assert len(drawn) == 50 and all(0 <= s <= MAX_SEED for s in drawn)
    assert 0 <= build_request(prompt="x", seed=seed).seed <= MAX_SEED
    assert build_request(prompt="x", seed=0).seed == 0


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t"])
def test_empty_and_blank_prompts_run_as_given(prompt: str) -> None:
    assert build_request(prompt=prompt).prompt == prompt


def test_modes_and_sizes_from_inputs() -> None:
    txt = build_request(prompt="x", aspect_ratio="16:9", megapixels="0.25")
    assert (txt.mode, txt.width, txt.height) == (Mode.TXT2IMG, 672, 384)
    img = build_request(prompt="x", image="in.png", aspect_ratio="16:9")
    assert (img.mode, img.width, img.height) == (Mode.IMG2IMG, None, None)
    assert build_request(prompt="x", image="in.png", mask="m.png").mode is Mode.INPAINT


def test_model_rules() -> None:
    schnell = build_request(prompt="x", model="schnell", guidance_scale=3.5)
    dev = build_request(prompt="x", model="dev", guidance_scale=3.5)
    assert (schnell.guidance, schnell.max_sequence_length) == (0.0, 256)
    assert (dev.guidance, dev.max_sequence_length) == (3.5, 512)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mask": "m.png"}, "mask: needs an input image"),
        ({"image": "i.png", "prompt_strength": 0.01, "num_inference_steps": 28}, "prompt_strength: is too low"),
        ({"model": "pro"}, "model: must be one of dev, schnell"),
        ({"num_outputs": 5}, "num_outputs: must be between 1 and 4"),
        ({"aspect_ratio": "7:3"}, "aspect_ratio: must be one of 1:1"),
        ({"seed": 2**63}, "seed: must be an integer up to 9223372036854775807"),
    ],
)
def test_bad_inputs_name_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        build_request(**{"prompt": "x", **kwargs})


def test_loras_are_optional_and_trimmed() -> None:
    req = build_request(prompt="x", main_lora=" owner/model ", lora_scale=0.5, extra_lora="", extra_lora_scale=2)
    assert [(lora.ref, lora.scale, lora.field) for lora in req.loras] == [("owner/model", 0.5, "replicate_weights")]
