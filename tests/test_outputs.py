"""Output files: the generation parameters each one carries, read back with Pillow as image tools do."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image

from flux_lora.errors import MAX_SHOWN, Failure, UserError, for_cog, shorten
from flux_lora.generation.outputs import JPEG_TEXT_LIMIT, label_batch, parameters_text, prune_outputs, save_images
from flux_lora.request import InputError, build_request
from flux_lora.settings import Settings


def read_parameters(path: Path) -> str | None:
    """What A1111/Forge's PNG Info reads: the `parameters` text chunk, else EXIF UserComment."""
    image = Image.open(path)
    if "parameters" in image.info:
        return image.info["parameters"]
    comment = image.getexif().get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.UserComment)
    if comment is None:
        return None
    assert comment[:8] == b"UNICODE\x00"
    return comment[8:].decode("utf-16-be")


def _request(**kwargs: object):
    return build_request(**{"prompt": "a cat, in 'the' hat: 猫", "seed": 42, "num_outputs": 3, **kwargs})


def test_parameters_line_is_what_a1111_writes() -> None:
    request = _request(main_lora="owner/model", lora_scale=0.8, guidance_scale=3.5, go_fast=True)
    prompt, line = parameters_text(request, 512, 768, 2).rsplit("\n", 1)
    assert prompt == "a cat, in 'the' hat: 猫"
    assert line == (
        "Steps: 28, Sampler: Euler, Schedule type: Simple, CFG scale: 1, Distilled CFG Scale: 3.5, Seed: 42, "
        "Size: 512x768, Model: dev, Mode: txt2img, go_fast: True, Batch size: 3, "
        "Batch pos: 2, Lora: owner/model, Lora scale: 0.8, Version: flux-lora-cog"
    )


@pytest.mark.parametrize(("image", "mask", "mode"), [("i.png", None, "img2img"), ("i.png", "m.png", "inpaint")])
def test_prompt_strength_is_written_for_modes_with_an_input_image_only(image: str, mask: str | None, mode: str) -> None:
    request = _request(image=image, mask=mask, prompt_strength=0.65)
    assert f"Mode: {mode}, Prompt strength: 0.65, go_fast: False," in parameters_text(request, 256, 256, 0)


def test_lora_references_are_redacted_and_input_images_never_written() -> None:
    signed = "https://user:secret@cdn.example.com/lora.safetensors?X-Amz-Signature=abc&token=hf_SECRET"
    data = "data:application/octet-stream;base64," + "A" * 5000
    request = _request(main_lora=signed, extra_lora=data, extra_lora_scale=-0.5,
                       image="https://images.example.com/me.png?sig=1", mask="data:image/png;base64,QUJD")
    text = parameters_text(request, 256, 256, 0)
    assert 'Lora: "https://cdn.example.com/lora.safetensors?…", Lora scale: 1' in text
    assert 'Extra lora: "data: URI (5037 characters)", Extra lora scale: -0.5' in text
    assert "Mode: inpaint" in text
    for secret in ("secret", "Signature", "hf_SECRET", "AAAA", "images.example.com", "QUJD", "sig="):
        assert secret not in text


@pytest.mark.parametrize("fmt", ["png", "jpg", "webp"])
def test_each_format_carries_the_seed_and_batch_index(fmt: str, tmp_path: Path) -> None:
    request = _request(seed=123456789)
    images = [Image.new("RGB", (32, 32), (i * 60, 10, 10)) for i in range(3)]
    label_batch(images, request, 32, 32)
    paths = save_images(images[1:], fmt, 80, parent=tmp_path)  # as if the safety checker dropped image 0
    texts = [read_parameters(p) for p in paths]
    assert all(t is not None and t.startswith("a cat, in 'the' hat: 猫\n") for t in texts)
    assert all("Seed: 123456789," in t for t in texts)
    assert ["Batch pos: 1," in texts[0], "Batch pos: 2," in texts[1]] == [True, True]
    if fmt != "png":  # the XMP packet holds the same text, UTF-8
        assert "Seed: 123456789" in Image.open(paths[0]).info["xmp"].decode()


def test_files_without_labels_carry_nothing(tmp_path: Path) -> None:
    for fmt in ("png", "jpg", "webp"):
        (path,) = save_images([Image.new("RGB", (16, 16))], fmt, 80, parent=tmp_path)
        assert read_parameters(path) is None


def test_a_huge_prompt_still_fits_a_jpeg(tmp_path: Path) -> None:
    request = _request(prompt="a very long prompt " * 10_000, seed=7)
    image = Image.new("RGB", (16, 16))
    label_batch([image], request, 16, 16)
    (path,) = save_images([image], "jpg", 80, parent=tmp_path)
    text = read_parameters(path)
    assert text is not None and len(text) <= JPEG_TEXT_LIMIT and "Seed: 7," in text
    assert np.asarray(Image.open(path)).shape == (16, 16, 3)


def test_output_metadata_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLUX_LORA_OUTPUT_METADATA", raising=False)
    assert Settings.from_env().output_metadata
    for off in ("0", "false", "off", "no"):
        monkeypatch.setenv("FLUX_LORA_OUTPUT_METADATA", off)
        assert not Settings.from_env().output_metadata
    monkeypatch.setenv("FLUX_LORA_OUTPUT_METADATA", "1")
    assert Settings.from_env().output_metadata


# --------------------------------------------------------------------------- failures as the cog server shows them


def test_a_failure_is_named_for_its_field_not_its_class() -> None:
    failure = for_cog(InputError("width", "is required"))
    assert (type(failure).__qualname__, str(failure), failure.message) == ("width", "is required", "width: is required")
    assert isinstance(failure, UserError) and isinstance(failure, Failure)
    assert type(for_cog(InputError("seed", "x"))) is type(for_cog(InputError("seed", "y")))
    plain = for_cog(UserError("All generated images contained NSFW content. Try: another prompt"))
    assert str(plain) == plain.message == "All generated images contained NSFW content. Try: another prompt"


def test_long_references_are_shortened() -> None:
    ref = "https://example.com/" + "a" * 100_000
    failure = for_cog(UserError(f"extra_lora: the LoRA {ref!r} cannot be loaded"))
    assert type(failure).__qualname__ == "extra_lora"
    shown = str(failure)
    assert shown.startswith("the LoRA 'https://example.com/aaa") and shown.endswith("...' cannot be loaded")
    assert max(len(word) for word in shown.split()) == MAX_SHOWN
    assert shorten("short words stay") == "short words stay"
    assert all(len(word) <= MAX_SHOWN for word in shorten("x" * 1000 + " " + "y" * 201).split())


def test_only_the_newest_prediction_directories_stay(tmp_path: Path) -> None:
    image = Image.new("RGB", (16, 16), (10, 20, 30))
    made = []
    for i in range(5):
        paths = save_images([image, image], "png", 80, parent=tmp_path)
        os.utime(paths[0].parent, ns=(i * 10**9, i * 10**9))  # creation order, whatever the clock's resolution
        made.append(paths[0].parent)
    (tmp_path / "not-ours").mkdir()
    assert prune_outputs(tmp_path, keep=2) == 3
    assert sorted(p for p in tmp_path.iterdir()) == sorted([*made[3:], tmp_path / "not-ours"])
    assert all(len(list(d.iterdir())) == 2 for d in made[3:])
    assert prune_outputs(tmp_path, keep=2) == 0
