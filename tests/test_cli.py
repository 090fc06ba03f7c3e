"""`flux-lora predict` (cog predict's validation and defaults), `make-tiny` and `schema`."""

from __future__ import annotations

import gc
import hashlib
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT
from PIL import Image

from flux_lora.serving.cli import main

FAST = ["-i", "num_inference_steps=2", "-i", "megapixels=0.25"]


def _predict(tmp_path: Path, *inputs: str, predictor: str = "hotswap") -> list[Path]:
    """Run one prediction into tmp_path/out; return the files it added."""
    out = tmp_path / "out"
    before = set(out.glob("prediction-*/out-*"))
    args = ["predict", "--predictor", predictor, "-o", str(out), *FAST]
    for item in inputs:
        args += ["-i", item]
    assert main(args) == 0
    return sorted(set(out.glob("prediction-*/out-*")) - before)


@pytest.mark.slow
def test_same_seed_same_image_other_seed_other_image(store_env: Path, tmp_path: Path) -> None:
    first = _predict(tmp_path / "a", "prompt=a cat", "seed=99", "output_format=png")
    second = _predict(tmp_path / "b", "prompt=a cat", "seed=99", "output_format=png")
    third = _predict(tmp_path / "c", "prompt=a cat", "seed=100", "output_format=png")
    pixels = [np.asarray(Image.open(p[0])) for p in (first, second, third)]
    assert np.array_equal(pixels[0], pixels[1])
    assert not np.array_equal(pixels[0], pixels[2])


@pytest.mark.slow
def test_outputs_land_in_a_fresh_directory_each_time(store_env: Path, tmp_path: Path) -> None:
    paths = _predict(tmp_path, "prompt=x", "num_outputs=3", "output_format=jpg", "model=schnell")
    paths += _predict(tmp_path, "prompt=x", "output_format=jpg", "model=schnell")
    assert [p.name for p in paths] == ["out-0.jpg", "out-1.jpg", "out-2.jpg", "out-0.jpg"]
    assert len({p.parent for p in paths}) == 2
    assert all(Image.open(p).format == "JPEG" for p in paths)


def test_the_service_leaves_no_temporary_folder(store_env: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    _predict(tmp_path / "out", "prompt=x", "model=schnell", "num_inference_steps=1")
    gc.collect()
    assert list((tmp_path / "tmp").iterdir()) == []


@pytest.mark.slow
def test_quality_changes_lossy_files_only(store_env: Path, tmp_path: Path) -> None:
    low = _predict(tmp_path, "prompt=x", "seed=1", "output_quality=5")[0]
    high = _predict(tmp_path, "prompt=x", "seed=1", "output_quality=95")[0]
    assert low.suffix == ".webp" and low.stat().st_size < high.stat().st_size
    png_a = _predict(tmp_path, "prompt=x", "seed=1", "output_format=png", "output_quality=5")[0]
    png_b = _predict(tmp_path, "prompt=x", "seed=1", "output_format=png", "output_quality=95")[0]
    assert hashlib.sha256(png_a.read_bytes()).digest() == hashlib.sha256(png_b.read_bytes()).digest()


def test_image_file_input_with_at_syntax(store_env: Path, tmp_path: Path) -> None:
    source = tmp_path / "in.png"
    Image.new("RGB", (300, 200), (0, 128, 0)).save(source)
    (path,) = _predict(tmp_path, "prompt=x", f"image=@{source}", "prompt_strength=1")
    assert Image.open(path).size == (288, 192)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (["prompt=x", "num_outputs=9"], "num_outputs fails constraint <= 4"),
        (["prompt=x", "model=pro"], "model does not match choices"),
        (["prompt=x", "seed=abc"], "seed: expected integer"),
        (["prompt=x", "colour=red"], "colour: unknown input"),
        (["num_outputs=1"], "prompt: Field required"),
        (["prompt=x", "aspect_ratio=custom", "height=512"], "width: is required when aspect_ratio is 'custom'"),
        (["prompt=x", "image=@/no/such/file.png"], "image: file not found"),
        (["prompt=x", f"seed={2**63}"], "seed: must be an integer up to"),
    ],
)
def test_bad_input_is_one_line_and_non_zero(
    store_env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], inputs: list[str], message: str
) -> None:
    args = ["predict", "-o", str(tmp_path)]
    for item in inputs:
        args += ["-i", item]
    assert main(args) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (["replicate_weights=/etc/passwd"], "replicate_weights: local file '/etc/passwd' is not a safetensors file"),
        (["extra_lora=file:///etc/hosts"], "extra_lora: local file '/etc/hosts' is not a safetensors file"),
        (["replicate_weights=./no/such.safetensors"], "replicate_weights: local LoRA file './no/such.safetensors' "
                                                       "does not exist"),
        (["extra_lora=owner"], "extra_lora: unrecognised LoRA reference 'owner'"),
    ],
)
def test_lora_references_are_checked_before_setup(
    store_env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    inputs: list[str], message: str,
) -> None:
    from flux_lora.service import Service

    def no_setup(*args: object, **kwargs: object) -> None:
        raise AssertionError("setup ran before the LoRA references were checked")

    monkeypatch.setattr(Service, "start", no_setup)
    args = ["predict", "-o", str(tmp_path), "-i", "prompt=x"]
    for item in inputs:
        args += ["-i", item]
    assert main(args) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: {message}")


def test_local_lora_files_are_the_users_own_on_the_command_line(store_env: Path, tmp_path: Path) -> None:
    from flux_lora.generation.tiny import SAMPLE_LORA

    plain = _predict(tmp_path, "prompt=a photo of TOK", "seed=3", "output_format=png")[0]
    lora = store_env / SAMPLE_LORA
    with_lora = _predict(tmp_path, "prompt=a photo of TOK", "seed=3", "output_format=png", f"replicate_weights={lora}")
    assert not np.array_equal(np.asarray(Image.open(plain)), np.asarray(Image.open(with_lora[0])))


def test_huge_input_images_are_refused_before_decoding(
    store_env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    huge = tmp_path / "huge.png"
    Image.new("L", (12000, 10000)).save(huge)  # 120 MP: a few hundred KB on disk, 360 MB decoded
    args = ["predict", "-o", str(tmp_path), "-i", "prompt=x", "-i", f"image=@{huge}"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == "error: image: is 12000x10000 pixels; the largest accepted is 100 megapixels"


@pytest.mark.parametrize(
    ("inputs", "error"),
    [(["aspect_ratio=custom"], "error: width: is required when aspect_ratio is 'custom'"),
     (["mask=@predict.py"], "error: mask: needs an input image"),
     (["image=@predict.py", "prompt_strength=0.01"], "error: prompt_strength: is too low for 28 steps")],
)
def test_console_script_refuses_bad_input_in_one_line_before_setup(store_env: Path, tmp_path: Path,
                                                                  inputs: list[str], error: str) -> None:
    """The rules between inputs hold before seconds of setup: the request's own function, as in the server."""
    args = [arg for value in ["prompt=x", *inputs] for arg in ("-i", value)]
    proc = subprocess.run([sys.executable, "-m", "flux_lora", "predict", "-o", str(tmp_path), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and proc.stderr.startswith(error), proc.stderr


def test_make_tiny_is_deterministic_and_complete(tiny_store: Path, tmp_path: Path) -> None:
    from flux_lora.generation.tiny import make_tiny_store

    again = make_tiny_store(tmp_path / "again")
    for rel in ("FLUX.1-dev/transformer/diffusion_pytorch_model.safetensors",
                "FLUX.1-schnell/transformer/diffusion_pytorch_model.safetensors",
                "FLUX.1-dev/vae/diffusion_pytorch_model.safetensors"):
        assert (again / rel).read_bytes() == (tiny_store / rel).read_bytes(), rel
    for sub in ("model_index.json", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert (tiny_store / "FLUX.1-dev" / sub).exists(), sub


@pytest.mark.parametrize("predictor", ["hotswap", "trained"])
def test_predict_help_lists_every_input_with_type_range_and_default(
    capsys: pytest.CaptureFixture[str], predictor: str
) -> None:
    from flux_lora.serving.local import input_properties

    with pytest.raises(SystemExit) as done:
        main(["predict", "--predictor", predictor, "--help"])
    assert done.value.code == 0
    listing = capsys.readouterr().out.split(f"inputs of the {predictor} variant", 1)[1].splitlines()[1:-1]
    rows = dict(line.split(None, 1) for line in listing)
    assert list(rows) == list(input_properties(predictor))  # every input, in the schema's order
    assert rows["prompt"] == "string; required"
    assert rows["num_outputs"] == "integer 1 to 4; default 1"
    assert rows["aspect_ratio"].startswith("one of 1:1, 16:9, 21:9,") and rows["aspect_ratio"].endswith("; default 1:1")
    assert rows["seed"] == "integer; optional"
    assert rows["go_fast"] == f"boolean; default {str(predictor == 'trained').lower()}"
    assert ("replicate_weights" in rows) == (predictor == "hotswap")


def test_schema_command_prints_the_schema(capsys: pytest.CaptureFixture[str]) -> None:
    from flux_lora.serving.schema import schema_json

    assert main(["schema", "--predictor", "trained"]) == 0
    assert capsys.readouterr().out.strip() == schema_json("trained")


@pytest.fixture
def nsfw_store(tiny_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The tiny store with checkers rigged so both flag every image."""
    import shutil

    from flux_lora.generation.safety import make_tiny_checkers

    store = tmp_path / "nsfw-store"
    shutil.copytree(tiny_store, store)
    make_tiny_checkers(store, flag="always", falcon="nsfw")
    monkeypatch.setenv("FLUX_LORA_WEIGHTS", str(store))
    monkeypatch.setenv("FLUX_LORA_CACHE", str(tmp_path / "cache"))
    return store


@pytest.mark.slow
def test_safety_checker_blocks_and_can_be_disabled(
    nsfw_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["predict", "-o", str(tmp_path / "out"), *FAST, "-i", "prompt=x", "-i", "num_outputs=2"]
    assert main(args) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: All generated images contained NSFW content. Try running it again with a different prompt."
    )
    assert not list((tmp_path / "out").glob("prediction-*/out-*")), "nothing is written for a blocked batch"
    assert main([*args, "-i", "disable_safety_checker=true"]) == 0
    assert len(list((tmp_path / "out").glob("prediction-*/out-*"))) == 2


def test_setup_logs_a_timing_breakdown(store_env: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="flux_lora")
    _predict(tmp_path, "prompt=x", "model=schnell")
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Setup on ")]
    for stage in ("imports", "store check", "pipelines", "safety", "quantize"):
        assert f"{stage} " in line, line
