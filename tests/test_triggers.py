"""Trigger words: read from the LoRA's own data at download time, kept in the cache index, and the
unversioned-reference check time kept there too (shared by processes and replicas)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fakes import FakeServer, tar_of
from PIL import Image
from safetensors.numpy import save
from test_cache import peft_lora

from flux_lora.lora import triggers
from flux_lora.weights.cache import WeightCache
from flux_lora.weights.http import DownloadPolicy

AI_TOOLKIT_CONFIG = """\
job: extension
config:
  name: flux_train_replicate
  process:
    - type: custom_sd_trainer
      training_folder: output
      trigger_word: ZIKI
      network: {type: lora, linear: 16, linear_alpha: 16}
      datasets:
        - folder_path: input_images
          caption_ext: txt
"""


def lora_with_metadata(metadata: dict[str, str]) -> bytes:
    tensors = {
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": np.ones((4, 32), np.float32),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": np.ones((32, 4), np.float32),
    }
    return save(tensors, metadata=metadata)


def test_explicit_fields_only() -> None:
    assert triggers.from_config(AI_TOOLKIT_CONFIG) == ["ZIKI"]
    assert triggers.from_config('{"trigger_word": "a tok, b tok"}') == ["a tok", "b tok"]
    assert triggers.from_config("not: [valid") == []
    assert triggers.from_metadata({"modelspec.trigger_phrase": "TOK, in the style of TOK", "trigger_word": "tok"}) == [
        "TOK", "in the style of TOK"]
    assert triggers.from_metadata({"trigger_words": '["sks dog", "sks"]'}) == ["sks dog", "sks"]
    # caption tag frequencies are not trigger words
    assert triggers.from_metadata({"ss_tag_frequency": json.dumps({"img": {"TOK": 10, "dog": 9}})}) == []


def test_missing_is_case_insensitive_and_matches_whole_words() -> None:
    assert triggers.missing("A photo of tok on a beach", ["TOK"]) == []
    assert triggers.missing("a photo of tokyo", ["TOK"]) == ["TOK"]
    assert triggers.missing("", ["TOK", "sks dog"]) == ["TOK", "sks dog"]
    assert triggers.with_triggers("a cat", ["TOK", "cat"]) == "TOK, a cat"
    assert triggers.with_triggers("  ", ["TOK"]) == "TOK"
    assert triggers.with_triggers("TOK cat", ["tok"]) == "TOK cat"


@pytest.fixture
def server():
    with FakeServer() as fake:
        yield fake


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server: FakeServer) -> Path:
    monkeypatch.setenv("FLUX_LORA_REPLICATE_URL", server.url)
    return tmp_path


def _cache(root: Path, recheck: float = 60) -> WeightCache:
    return WeightCache(root, DownloadPolicy(allow_private=True, retries=0), 1 << 30, 0, recheck_seconds=recheck)


def test_trigger_words_are_kept_with_the_cache_entry(server: FakeServer, env: Path) -> None:
    members = {"output/flux_train_replicate/lora.safetensors": peft_lora(1), "config.yaml": AI_TOOLKIT_CONFIG.encode()}
    tar = tar_of(members)
    server.add_replicate_model("acme", "ziki", tar, version="v1")
    named = server.add_file("/l/named.safetensors", lora_with_metadata({"modelspec.trigger_phrase": "NMD"}))
    plain = server.add_file("/l/plain.safetensors", peft_lora(2))
    cache = _cache(env / "cache")
    assert cache.trigger_words(cache.fetch("acme/ziki/v1")) == ["ZIKI"]
    assert cache.trigger_words(cache.fetch(named)) == ["NMD"]
    assert cache.trigger_words(cache.fetch(plain)) == []
    index = json.loads((env / "cache" / "index.json").read_text())
    assert sorted(w for v in index.values() for w in v.get("trigger_words", [])) == ["NMD", "ZIKI"]
    # an entry cached before trigger words were kept simply has none
    for value in index.values():
        value.pop("trigger_words", None)
    (env / "cache" / "index.json").write_text(json.dumps(index))
    assert cache.trigger_words(cache.fetch("acme/ziki/v1")) == []


def test_a_local_file_reads_its_own_header(tmp_path: Path) -> None:
    path = tmp_path / "mine.safetensors"
    path.write_bytes(lora_with_metadata({"trigger_word": "MINE"}))
    cache = _cache(tmp_path / "cache")
    assert cache.trigger_words(cache.fetch(str(path), allow_local=True)) == ["MINE"]


def test_the_recheck_window_survives_a_restart(server: FakeServer, env: Path) -> None:
    tar = tar_of({"l.safetensors": peft_lora(3)})
    server.add_redirect("/acme/busy/_weights", server.add_file("/delivery/b1/m.tar", tar))
    first = _cache(env / "cache").fetch("acme/busy")
    assert server.count("GET", "/acme/busy/_weights") == 1
    # a new process (a container restart, `flux-lora predict`) within the window: no request at all
    code = (
        "import sys; from pathlib import Path; from flux_lora.weights.cache import WeightCache; "
        "from flux_lora.weights.http import DownloadPolicy; "
        "c = WeightCache(Path(sys.argv[1]), DownloadPolicy(allow_private=True, retries=0), 1 << 30, 0, "
        "recheck_seconds=60); print(c.fetch('acme/busy'))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(env / "cache")], capture_output=True, text=True, check=True,
                         env={**os.environ, "FLUX_LORA_REPLICATE_URL": server.url})
    assert out.stdout.strip() == str(first)
    assert server.count("GET", "/acme/busy/_weights") == 1
    # past the window: one check again, shared the same way
    assert _cache(env / "cache", recheck=0).fetch("acme/busy") == first
    assert server.count("GET", "/acme/busy/_weights") == 2


def test_check_prompt_warns_and_prepends_only_when_asked(caplog: pytest.LogCaptureFixture) -> None:
    loras = [("replicate_weights", "acme/ziki", ["ZIKI"]), ("extra_lora", "https://x/y.safetensors", ["sty"])]
    with caplog.at_level("INFO", logger="flux_lora.lora.triggers"):
        assert triggers.check_prompt("a ziki cat", loras, auto=False) == "a ziki cat"
    assert "trigger word 'ZIKI'" in caplog.text and "does not contain 'sty'" in caplog.text
    assert "does not contain 'ZIKI'" not in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="flux_lora.lora.triggers"):
        assert triggers.check_prompt("a cat", loras, auto=True) == "ZIKI, sty, a cat"
    assert "Prepended 'ZIKI'" in caplog.text and "Prepended 'sty'" in caplog.text


@pytest.mark.parametrize("auto", [False, True])
def test_flux_lora_predict_warns_or_prepends(store_env: Path, server: FakeServer, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
                                               auto: bool) -> None:
    from flux_lora.serving.cli import main

    monkeypatch.setenv("FLUX_LORA_REPLICATE_URL", server.url)
    monkeypatch.setenv("FLUX_LORA_ALLOW_PRIVATE_URLS", "1")
    if auto:
        monkeypatch.setenv("FLUX_LORA_AUTO_TRIGGER", "1")
    server.add_replicate_model("acme", "ziki", tar_of({"lora.safetensors": peft_lora(1),
                                                       "config.yaml": AI_TOOLKIT_CONFIG.encode()}), version="v1")
    out = tmp_path / "out"
    args = ["predict", "-o", str(out), "-i", "prompt=a cat", "-i", "replicate_weights=acme/ziki/v1",
            "-i", "num_inference_steps=2", "-i", "megapixels=0.25", "-i", "output_format=png"]
    with caplog.at_level("INFO"):
        assert main(args) == 0
    (image,) = out.glob("prediction-*/out-0.png")
    parameters = Image.open(image).info["parameters"]
    assert "replicate_weights acme/ziki/v1: trigger word 'ZIKI'" in caplog.text
    if auto:
        assert parameters.startswith("ZIKI, a cat\n") and "Prepended 'ZIKI'" in caplog.text
    else:
        assert parameters.startswith("a cat\n") and "does not contain 'ZIKI'" in caplog.text


def test_every_lora_of_a_multi_lora_request_is_checked_and_labelled(store_env: Path, server: FakeServer,
                                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """Three LoRAs through `flux-lora predict --predictor multi`: each one's trigger word is prepended (auto)
    and each one is in the image's parameters with its own scale."""
    from flux_lora.serving.cli import main

    monkeypatch.setenv("FLUX_LORA_REPLICATE_URL", server.url)
    monkeypatch.setenv("FLUX_LORA_ALLOW_PRIVATE_URLS", "1")
    monkeypatch.setenv("FLUX_LORA_AUTO_TRIGGER", "1")
    for index, word in enumerate(("ZIKI", "ZOKO", "ZUKU")):
        config = AI_TOOLKIT_CONFIG.replace("ZIKI", word).encode()
        server.add_replicate_model("acme", f"m{index}", tar_of({"lora.safetensors": peft_lora(10 + index),
                                                                 "config.yaml": config}), version="v1")
    out = tmp_path / "out"
    args = ["predict", "--predictor", "multi", "-o", str(out), "-i", "prompt=a zoko cat",
            "-i", 'hf_loras=["acme/m0/v1", "acme/m1/v1"]', "-i", "hf_loras=acme/m2/v1", "-i", "lora_scales=0.5",
            "-i", "lora_scales=0.6", "-i", "lora_scales=-0.25",
            "-i", "num_inference_steps=2", "-i", "megapixels=0.25", "-i", "output_format=png"]
    with caplog.at_level("INFO"):
        assert main(args) == 0
    (image,) = out.glob("prediction-*/out-0.png")
    parameters = Image.open(image).info["parameters"]
    assert parameters.startswith("ZIKI, ZUKU, a zoko cat\n"), parameters
    for n, scale in ((1, "0.5"), (2, "0.6"), (3, "-0.25")):
        assert f"Lora {n}: acme/m{n - 1}/v1, Lora {n} scale: {scale}" in parameters
    assert "hf_loras[1] acme/m1/v1: trigger word 'ZOKO'" in caplog.text
