"""Any number of LoRAs per request (`MultiLoraPredictor`: `hf_loras` + `lora_scales`), and `flux-lora lora inspect`.

Through the real cog server with go_fast compiled (dynamo's eager backend, as tests/test_compiled.py): three
LoRAs of different formats and targets run together in the packed adapter, nothing compiles again, and
leaving any one out changes the image. Bad lists fail naming the field; one bad reference among good ones
applies nothing and leaves nothing in the cache's tmp/.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import lora_samples as S
import numpy as np
import pytest
import torch
from conftest import CogServer, decode_output, server_env
from fakes import FakeServer
from safetensors.torch import save

from flux_lora.generation.tiny import tiny_transformer
from flux_lora.request import InputError, build_request
from flux_lora.serving.cli import main as cli

COMMON = {"prompt": "a cat", "num_inference_steps": 2, "seed": 3, "go_fast": True, "aspect_ratio": "custom",
          "width": 256, "height": 256, "output_format": "png", "disable_safety_checker": True}


def _loras(store: Path) -> dict[str, dict[str, torch.Tensor]]:
    from transformers import CLIPTextModel

    transformer, text_encoder = tiny_transformer(True), CLIPTextModel.from_pretrained(store / "FLUX.1-dev/text_encoder")
    attn, mlp = ("img_attn", "txt_attn"), ("img_mlp", "txt_mlp", "linear1")
    return {
        "attn_peft": S.as_peft(S.random_lora(transformer, 31, rank=4, only=attn), transformer),
        "mlp_kohya": S.as_kohya(S.random_lora(transformer, 32, rank=6, only=mlp)),
        "all_comfy": S.as_comfyui_extracted(S.random_lora(transformer, 33, rank=3)),
        "clip": S.clip_lora(text_encoder, 34),
        "xlabs": S.as_xlabs(S.random_lora(transformer, 35, rank=2, only=attn)),
        "mixture": S.as_mixture(S.random_lora(transformer, 36, rank=2), transformer),
        "sdxl": S.sdxl_lora(),
        "dora": S.dora_lora(transformer),
        "unmatched": S.unmatched_lora(),
    }


@pytest.fixture(scope="module")
def files(tiny_store: Path) -> FakeServer:
    with FakeServer() as server:
        for name, tensors in _loras(tiny_store).items():
            server.add_file(f"/{name}.safetensors", save({k: v.contiguous() for k, v in tensors.items()}))
        yield server


def url(server: FakeServer, name: str) -> str:
    return f"{server.url}/{name}.safetensors"


@pytest.fixture(scope="module")
def multi_server(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("multi")
    env = server_env(tiny_store, workdir, FLUX_LORA_COMPILE="1", FLUX_LORA_COMPILE_BACKEND="eager",
                     FLUX_LORA_MAX_RANK="16", FLUX_LORA_ALLOW_PRIVATE_URLS="1")
    server = CogServer("multi", workdir, env)
    yield server
    server.stop()


def image(body: dict) -> np.ndarray:
    assert body["status"] == "succeeded", body.get("error")
    assert "compile again" not in body["logs"] and "runs eagerly" not in body["logs"], body["logs"]
    return np.asarray(decode_output(body["output"][0])).astype(np.int16)


@pytest.mark.slow
def test_three_loras_of_other_formats_run_together_compiled_and_each_counts(multi_server, files, tmp_path):
    three = ["attn_peft", "mlp_kohya", "all_comfy"]
    body = multi_server.predict(**COMMON, hf_loras=[url(files, n) for n in three], lora_scales=[0.9, 0.7, 1.2]).json()
    together = image(body)
    assert "Timings: hf_loras[0] download" in body["logs"] and "denoise+decode" in body["logs"]
    assert "weight difference(s) an adapter cannot carry" in body["logs"]  # the ComfyUI file's .diff_b
    base = image(multi_server.predict(**COMMON).json())
    assert np.abs(together - base).mean() > 0.5
    for left_out in range(3):
        kept = [n for i, n in enumerate(three) if i != left_out]
        scales = [s for i, s in enumerate([0.9, 0.7, 1.2]) if i != left_out]
        other = image(multi_server.predict(**COMMON, hf_loras=[url(files, n) for n in kept], lora_scales=scales).json())
        assert np.abs(other - together).mean() > 0.3, f"leaving {three[left_out]} out changed nothing"
    again = multi_server.predict(**COMMON, hf_loras=[url(files, n) for n in three], lora_scales=[0.9, 0.7, 1.2])
    assert again.json()["logs"].count("cache hit") == 3
    assert np.array_equal(image(again.json()), together)
    # more LoRAs than before, a CLIP one among them, one scale for all: still no new graph
    five = [*three, "clip", "xlabs"]
    assert np.abs(image(multi_server.predict(**COMMON, hf_loras=[url(files, n) for n in five],
                                             lora_scales=[0.5]).json()) - together).mean() > 0.3


@pytest.mark.slow
def test_bad_lists_and_a_bad_reference_among_good_ones(multi_server, files, tmp_path):
    good = [url(files, "attn_peft"), url(files, "mlp_kohya")]
    failed = multi_server.predict(**COMMON, hf_loras=[*good, url(files, "sdxl")]).json()
    assert failed["status"] == "failed" and "hf_loras[2]: the LoRA" in failed["error"] and "SDXL" in failed["error"]
    assert "\n" not in failed["error"]
    tmp = Path(multi_server.log).parent / "lora-cache" / "tmp"
    assert not list(tmp.iterdir())
    for inputs, message in (
        ({"hf_loras": good, "lora_scales": [1, 1, 1]}, "lora_scales: has 3 value(s) for 2 LoRA(s)"),
        ({"hf_loras": good, "lora_scales": [1, 4]}, "lora_scales[1]: must be between -1 and 3"),
        ({"hf_loras": good * 5}, "hf_loras: takes at most 8 LoRAs, got 10"),
        ({"hf_loras": [good[0], " "]}, "hf_loras[1]: is empty"),
    ):
        body = multi_server.predict(**COMMON, **inputs).json()
        assert body["status"] == "failed" and f": {message}" in body["error"], body["error"]
    response = multi_server.predict(**COMMON, lora_scales=["strong"])  # the schema's types: 422
    assert response.status_code == 422 and "lora_scales" in response.text
    body = multi_server.predict(**COMMON, hf_loras=good).json()  # the server keeps serving
    assert body["status"] == "succeeded"


def test_list_rules_name_the_field() -> None:
    ok = build_request(prompt="x", hf_loras=["a/b", " c/d "], lora_scales=[0.5])
    assert [(lora.ref, lora.scale, lora.field, lora.label) for lora in ok.loras] == [
        ("a/b", 0.5, "hf_loras[0]", "Lora 1"), ("c/d", 0.5, "hf_loras[1]", "Lora 2")]
    assert [lora.scale for lora in build_request(prompt="x", hf_loras=["a", "b"]).loras] == [1.0, 1.0]
    assert [lora.scale for lora in build_request(prompt="x", hf_loras=["a", "b"], lora_scales=[2, -1]).loras] == [
        2.0, -1.0]
    for inputs, field in (({"lora_scales": [1.0]}, "lora_scales"), ({"hf_loras": ["a"] * 9}, "hf_loras"),
                          ({"hf_loras": ["a", "b", "c"], "lora_scales": [1, 1]}, "lora_scales"),
                          ({"hf_loras": ["a"], "lora_scales": [-1.5]}, r"lora_scales\[0\]")):
        with pytest.raises(InputError, match=f"^{field}: "):
            build_request(prompt="x", **inputs)


# --------------------------------------------------------------------------- flux-lora lora inspect


@pytest.mark.parametrize(
    ("name", "fmt", "clip"),
    [("attn_peft", "peft/diffusers", False), ("mlp_kohya", "kohya", False), ("all_comfy", "comfyui", False),
     ("clip", "peft/diffusers", True), ("xlabs", "xlabs", False), ("mixture", "mixture", False)],
)
def test_inspect_reports_what_a_prediction_reads(store_env, files, capsys, monkeypatch, name, fmt, clip):
    monkeypatch.setenv("FLUX_LORA_ALLOW_PRIVATE_URLS", "1")
    assert cli(["lora", "inspect", url(files, name), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"].startswith(fmt)
    assert bool(report["clip_modules"]) is clip and bool(report["transformer_modules"]) is not clip
    assert report["fits_budget"] and report["rank_budget"] == 128 and len(report["sha256"]) == 64
    if name == "all_comfy":
        assert any(".diff_b" in key and "dropped" in why for key, why in report["ignored"])
        assert report["ranks"] == {"double blocks": [3, 3], "single blocks": [3, 3]} and report["alphas"] == [3.0]
    assert cli(["lora", "inspect", url(files, name)]) == 0
    assert f"format        {report['format']}" in capsys.readouterr().out


@pytest.mark.parametrize(("name", "message"), [("sdxl", "SDXL"), ("dora", "DoRA"), ("unmatched", "matches no module")])
def test_inspect_refuses_what_a_prediction_refuses_in_one_line(store_env, files, capsys, monkeypatch, name, message):
    monkeypatch.setenv("FLUX_LORA_ALLOW_PRIVATE_URLS", "1")
    assert cli(["lora", "inspect", url(files, name)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the LoRA ") and message in err and "\n" not in err


def test_inspect_reads_a_local_file_and_says_when_it_exceeds_the_rank_budget(store_env, tmp_path, capsys,
                                                                            monkeypatch):
    monkeypatch.setenv("FLUX_LORA_MAX_RANK", "8")
    transformer = tiny_transformer(True)
    path = S.save(S.as_peft(S.random_lora(transformer, 40, rank=20), transformer), tmp_path / "big.safetensors")
    assert cli(["lora", "inspect", str(path)]) == 0
    assert "no: rank 20 > 16, go_fast requests with it run on the plain transformer" in capsys.readouterr().out
    assert os.environ["FLUX_LORA_MAX_RANK"] == "8"
