"""The base-model store: `download-base` from a loopback Hub under the real repo names, verification,
resuming, gating and offline mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from fakes import FakeServer, Recorded
from safetensors.numpy import save

from flux_lora.serving import cli
from flux_lora.settings import Settings
from flux_lora.weights.store import (
    COMPLETE_MARKER,
    MODELS,
    StoreError,
    download_command,
    ensure_store,
    is_complete,
    model_problems,
    parse_models,
    safetensors_problem,
)

TOKEN = "hf_test_secret_token_123"
DEV, SCHNELL = "black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.1-schnell"
SAFETY, FALCON = "CompVis/stable-diffusion-safety-checker", "Falconsai/nsfw_image_detection"


def tensors(seed: int, names: list[str], n: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    return save({name: rng.standard_normal(n).astype(np.float32) for name in names})


def sharded(folder: str, stem: str, names: list[str], shards: int, seed: int) -> dict[str, bytes]:
    """A component sharded like the real FLUX transformer: N shards and an index mapping tensors to them."""
    files, weight_map = {}, {}
    for i in range(shards):
        shard = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        mine = names[i::shards]
        files[f"{folder}/{shard}"] = tensors(seed + i, mine)
        weight_map |= {name: shard for name in mine}
    files[f"{folder}/{stem}.safetensors.index.json"] = json.dumps(
        {"metadata": {"total_size": 256 * len(names)}, "weight_map": weight_map}
    ).encode()
    return files


def cfg(**kw: object) -> bytes:
    return json.dumps(kw).encode()


def flux_repo(seed: int, single_file: str) -> dict[str, bytes]:
    """The real FLUX repo's layout at toy size, with the single-file checkpoints we must not fetch."""
    blocks = [f"block.{i}.weight" for i in range(6)]
    return {
        "model_index.json": cfg(_class_name="FluxPipeline"),
        "README.md": b"# FLUX\n",
        "LICENSE.md": b"licence\n",
        single_file: tensors(seed + 90, ["big"], 4096),
        "ae.safetensors": tensors(seed + 91, ["decoder"], 4096),
        "scheduler/scheduler_config.json": cfg(_class_name="FlowMatchEulerDiscreteScheduler"),
        "text_encoder/config.json": cfg(model_type="clip_text_model"),
        "text_encoder/model.safetensors": tensors(seed + 10, ["clip"]),
        "text_encoder_2/config.json": cfg(model_type="t5"),
        **sharded("text_encoder_2", "model", ["t5.a", "t5.b", "t5.c"], 2, seed + 20),
        "tokenizer/tokenizer_config.json": cfg(model_max_length=77),
        "tokenizer/vocab.json": cfg(a=0),
        "tokenizer/merges.txt": b"#version: 0.2\n",
        "tokenizer_2/tokenizer_config.json": cfg(model_max_length=512),
        "tokenizer_2/spiece.model": b"\x00spiece",
        "transformer/config.json": cfg(_class_name="FluxTransformer2DModel"),
        **sharded("transformer", "diffusion_pytorch_model", blocks, 3, seed + 30),
        "vae/config.json": cfg(_class_name="AutoencoderKL"),
        "vae/diffusion_pytorch_model.safetensors": tensors(seed + 40, ["vae.w"]),
    }


def vit_repo(seed: int) -> dict[str, bytes]:
    return {
        "config.json": cfg(model_type="clip"),
        "preprocessor_config.json": cfg(image_processor_type="CLIPImageProcessor"),
        "model.safetensors": tensors(seed, ["vision.w"]),
        "pytorch_model.bin": b"pickle, never fetched",
        "README.md": b"card\n",
    }


HUB = {
    DEV: flux_repo(0, "flux1-dev.safetensors"),
    SCHNELL: flux_repo(100, "flux1-schnell.safetensors"),
    SAFETY: vit_repo(200),
    FALCON: vit_repo(300),
}
# What the store must hold of each repo: the diffusers layout (schnell: what differs from dev).
SKIPPED = {"README.md", "LICENSE.md", "ae.safetensors", "flux1-dev.safetensors", "flux1-schnell.safetensors",
           "pytorch_model.bin"}
EXPECTED = {
    "FLUX.1-dev": {p: d for p, d in HUB[DEV].items() if p not in SKIPPED},
    "FLUX.1-schnell": {p: d for p, d in HUB[SCHNELL].items()
                       if p == "model_index.json" or p.startswith(("transformer/", "scheduler/"))},
    "safety-checker": {p: d for p, d in HUB[SAFETY].items() if p not in SKIPPED},
    "falcon-nsfw": {p: d for p, d in HUB[FALCON].items() if p not in SKIPPED},
}


def stored(folder: Path) -> dict[str, bytes]:
    """The model files in a store folder, without huggingface_hub's records and our marker."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    }


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    with FakeServer() as server:
        for repo_id, files in HUB.items():
            server.add_hub_repo(repo_id, files, gated=repo_id == DEV)
        server.state.hub_token = TOKEN
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        monkeypatch.setenv("FLUX_LORA_WEIGHTS", str(tmp_path / "store"))
        monkeypatch.delenv("FLUX_LORA_OFFLINE", raising=False)
        yield server


def header(request: Recorded, name: str) -> str | None:
    return next((v for k, v in request.headers.items() if k.lower() == name), None)


def resolve_gets(server: FakeServer) -> list[str]:
    return [r.path for r in server.requests if r.method == "GET" and "/resolve/" in r.path]


def test_download_base_fills_a_fresh_store_with_only_the_diffusers_files(hub: FakeServer, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["weights", "download-base"]) == 0
    root = tmp_path / "store"
    assert capsys.readouterr().out.strip() == str(root)
    for folder, files in EXPECTED.items():
        assert stored(root / folder) == files, folder
        marker = json.loads((root / folder / COMPLETE_MARKER).read_text())
        assert set(marker["files"]) == set(files)
    fetched = resolve_gets(hub)
    assert not [p for p in fetched if p.rsplit("/", 1)[-1] in SKIPPED]
    hub_calls = [r for r in hub.requests if r.path.startswith("/api/models/") or "/resolve/" in r.path]
    assert all(header(r, "authorization") == f"Bearer {TOKEN}" for r in hub_calls)

    # Everything is whole: a second run asks the Hub nothing.
    before = len(hub.requests)
    assert cli.main(["weights", "download-base"]) == 0
    assert len(hub.requests) == before


def test_models_and_no_safety_limit_what_is_fetched(hub: FakeServer, tmp_path: Path) -> None:
    assert cli.main(["weights", "download-base", "--models", "schnell", "--no-safety"]) == 0
    root = tmp_path / "store"
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == ["FLUX.1-schnell"]
    assert not any(DEV in p for p in resolve_gets(hub))


def test_a_connection_dropped_mid_file_resumes_with_a_range_request(hub: FakeServer, tmp_path: Path) -> None:
    rel = "transformer/diffusion_pytorch_model-00002-of-00003.safetensors"
    # Larger than huggingface_hub's 10 MiB read size, so the first half reaches the disk before the drop.
    big = save({"block.1.weight": np.arange(6_000_000, dtype=np.float32), "block.4.weight": np.ones(4, np.float32)})
    hub.state.hub[DEV].files[rel] = big
    cdn_path = "/hub-cdn/" + quote(f"{DEV}@{rel}", safe="")
    hub.state.hub_cdn = hub.alt_url  # LFS files redirect to another host, as on the Hub
    hub.add_file(cdn_path, big)
    hub.fault(cdn_path, "truncate")  # the first GET sends half the body, then closes the connection

    ensure_store(tmp_path / "store", models=["dev"], safety=False)

    assert (tmp_path / "store/FLUX.1-dev" / rel).read_bytes() == big
    ranges = [header(r, "range") for r in hub.requests if r.path == cdn_path and r.method == "GET"]
    assert len(ranges) == 2 and ranges[0] is None
    assert ranges[1].startswith("bytes=") and int(ranges[1][6:].rstrip("-")) >= 10 * 2**20


def test_an_interrupted_download_resumes_without_fetching_finished_files_again(hub: FakeServer,
                                                                               tmp_path: Path) -> None:
    root = tmp_path / "store"
    rel = "text_encoder_2/model-00002-of-00002.safetensors"
    resolve = f"/{DEV}/resolve/{hub.state.hub[DEV].sha}/{rel}"
    hub.fault(resolve, "status", times=-1, status=404)

    with pytest.raises(StoreError, match="FLUX.1-dev") as info:
        ensure_store(root, models=["dev"], safety=False)
    assert TOKEN not in str(info.value)
    assert not (root / "FLUX.1-dev" / rel).exists()
    assert not is_complete(root, MODELS["dev"])
    assert not (root / "FLUX.1-dev" / COMPLETE_MARKER).exists()

    kept = {p for p in stored(root / "FLUX.1-dev") if p in EXPECTED["FLUX.1-dev"]}
    assert kept  # the files that finished before the failure stay

    del hub.state.faults[resolve]
    hub.requests.clear()
    ensure_store(root, models=["dev"], safety=False)
    refetched = {p.split(f"{hub.state.hub[DEV].sha}/", 1)[1] for p in resolve_gets(hub)}
    assert rel in refetched and not refetched & kept
    assert stored(root / "FLUX.1-dev") == EXPECTED["FLUX.1-dev"]


def test_a_killed_download_is_not_served_and_the_next_run_finishes_it(hub: FakeServer, tmp_path: Path) -> None:
    root = tmp_path / "store"
    rel = "transformer/diffusion_pytorch_model-00001-of-00003.safetensors"
    big = save({"block.0.weight": np.arange(3_000_000, dtype=np.float32), "block.3.weight": np.ones(4, np.float32)})
    hub.state.hub[SCHNELL].files[rel] = big
    hub.state.chunk_delay = 0.05  # 12 MB in 64 KiB chunks: about 9 s, long enough to be killed mid-file
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen([sys.executable, "-m", "flux_lora", "weights", "download-base", "--models", "schnell",
                             "--no-safety"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not list(root.glob("FLUX.1-schnell/.cache/huggingface/download/**/*.incomplete")):
            assert proc.poll() is None and time.monotonic() < deadline, "the download never started"
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        proc.kill()
        proc.wait()
    assert not (root / "FLUX.1-schnell" / rel).exists()
    with pytest.raises(StoreError, match="FLUX.1-schnell"):
        ensure_store(root, models=["schnell"], safety=False, offline=True)

    hub.state.chunk_delay = 0.0
    ensure_store(root, models=["schnell"], safety=False)
    assert (root / "FLUX.1-schnell" / rel).read_bytes() == big
    assert not list(root.rglob("*.incomplete"))
    assert is_complete(root, MODELS["schnell"])


def test_a_damaged_shard_is_detected_and_fetched_again(hub: FakeServer, tmp_path: Path) -> None:
    root = tmp_path / "store"
    ensure_store(root, models=["dev"], safety=False)
    shard = root / "FLUX.1-dev/transformer/diffusion_pytorch_model-00003-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    assert "transformer/diffusion_pytorch_model-00003-of-00003.safetensors" in model_problems(root, MODELS["dev"])

    hub.requests.clear()
    ensure_store(root, models=["dev"], safety=False)
    assert [p.rsplit("/", 1)[-1] for p in resolve_gets(hub)] == [shard.name]
    assert stored(root / "FLUX.1-dev") == EXPECTED["FLUX.1-dev"]


def test_missing_token_for_the_gated_repo_gets_a_clear_message(hub: FakeServer, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture) -> None:
    monkeypatch.delenv("HF_TOKEN")
    assert cli.main(["weights", "download-base", "--models", "dev"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert "set HF_TOKEN" in err and "accept the licence" in err and f"{hub.url}/{DEV}" in err


def test_a_refused_token_is_named_but_never_shown(hub: FakeServer, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_token_456")
    assert cli.main(["weights", "download-base", "--models", "dev"]) == 1
    err = capsys.readouterr().err
    assert "HF_TOKEN was refused" in err and "accept the licence" in err
    assert "hf_wrong_token_456" not in err


def test_offline_with_a_partial_store_fails_naming_the_command(hub: FakeServer, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "store"
    ensure_store(root, models=["schnell"], safety=True)
    monkeypatch.setenv("FLUX_LORA_OFFLINE", "1")
    hub.requests.clear()

    settings = Settings.from_env()
    with pytest.raises(StoreError) as info:
        ensure_store(settings.weights_dir, offline=settings.offline)
    message = str(info.value)
    assert "FLUX.1-dev (not downloaded)" in message
    assert f"FLUX_LORA_WEIGHTS={root} flux-lora weights download-base --models dev,schnell" in message
    assert hub.requests == []
    # What is there is enough for a schnell-only deployment.
    ensure_store(root, models=["schnell"], offline=True)


def test_offline_refuses_the_remains_of_an_interrupted_download(hub: FakeServer, tmp_path: Path) -> None:
    root = tmp_path / "store"
    ensure_store(root, models=["schnell"], safety=False)
    (root / "FLUX.1-schnell" / COMPLETE_MARKER).unlink()  # as if killed after the last file, before the mark
    with pytest.raises(StoreError, match="download interrupted"):
        ensure_store(root, models=["schnell"], safety=False, offline=True)


@pytest.mark.slow
def test_download_base_then_a_prediction_runs(hub: FakeServer, tmp_path: Path) -> None:
    """The tiny FLUX served under the real names is downloaded by `download-base` and then predicts."""
    from flux_lora.generation.tiny import make_tiny_store

    made = make_tiny_store(tmp_path / "made")
    for repo_id, folder in ((DEV, "FLUX.1-dev"), (SCHNELL, "FLUX.1-schnell")):
        files = {p.relative_to(made / folder).as_posix(): p.read_bytes()
                 for p in (made / folder).rglob("*") if p.is_file()}
        hub.add_hub_repo(repo_id, files, gated=repo_id == DEV)
    assert cli.main(["weights", "download-base", "--no-safety"]) == 0

    out = tmp_path / "out"
    assert cli.main(["predict", "-i", "prompt=a red car", "-i", "num_inference_steps=2", "-i",
                     "aspect_ratio=custom", "-i", "width=256", "-i", "height=256", "-i", "model=schnell",
                     "-i", "disable_safety_checker=true", "-o", str(out)]) == 0
    assert len(list(out.rglob("*.webp"))) == 1


# --- verification and parsing, no network ------------------------------------------------------------


def test_safetensors_verification_uses_the_header_sizes(tmp_path: Path) -> None:
    good = tmp_path / "a.safetensors"
    good.write_bytes(tensors(1, ["x", "y"]))
    assert safetensors_problem(good) is None
    assert safetensors_problem(good, ["x", "y"]) is None
    assert "lacks 1 tensor" in safetensors_problem(good, ["x", "z"])
    bad = tmp_path / "b.safetensors"
    bad.write_bytes(good.read_bytes()[:-1])
    assert "its header says" in safetensors_problem(bad)
    bad.write_bytes(good.read_bytes()[:20])
    assert "truncated" in safetensors_problem(bad)
    assert safetensors_problem(tmp_path / "none.safetensors") == "missing"
    # Offsets that do not add up are caught too (the LoRA cache's parser): a gap between two tensors.
    header = json.dumps({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                         "y": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}).encode()
    bad.write_bytes(len(header).to_bytes(8, "little") + header + bytes(12))
    assert "gapped" in safetensors_problem(bad)


def test_an_index_naming_a_missing_shard_is_incomplete(tmp_path: Path) -> None:
    folder = tmp_path / "FLUX.1-schnell"
    for rel, data in EXPECTED["FLUX.1-schnell"].items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    assert model_problems(tmp_path, MODELS["schnell"]) == {}
    assert is_complete(tmp_path, MODELS["schnell"])  # placed by hand: judged by verification alone
    (folder / "transformer/diffusion_pytorch_model-00001-of-00003.safetensors").unlink()
    assert model_problems(tmp_path, MODELS["schnell"]) == {
        "transformer/diffusion_pytorch_model-00001-of-00003.safetensors": "missing"
    }


def test_models_option_is_validated() -> None:
    assert parse_models("dev, schnell") == ["dev", "schnell"]
    with pytest.raises(StoreError, match="--models: unknown model 'pro'; allowed: dev, schnell"):
        parse_models("dev,pro")
    assert download_command(Path("/w"), ["dev"], safety=False) == (
        "FLUX_LORA_WEIGHTS=/w flux-lora weights download-base --models dev --no-safety"
    )


def test_an_unreachable_hub_is_a_store_error_saying_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeServer() as gone:
        dead = gone.url
    monkeypatch.setenv("HF_ENDPOINT", dead)
    monkeypatch.setattr("huggingface_hub.utils._http.time.sleep", lambda s: None)
    with pytest.raises(StoreError, match=f"could not reach {dead} for {SCHNELL}.*run again to resume"):
        ensure_store(tmp_path / "w", models=["schnell"], safety=False)
