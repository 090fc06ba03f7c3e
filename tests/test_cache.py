"""WeightCache against loopback fakes of Replicate, the Hub, CivitAI and plain HTTP servers."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fakes import FakeServer, tar_of
from safetensors.numpy import save

from flux_lora.errors import (
    BlockedUrlError,
    LocalFileRefused,
    NotALoraError,
    UserError,
    WeightsAuthError,
    WeightsError,
    WeightsNotFound,
    WeightsTooLarge,
)
from flux_lora.settings import Settings
from flux_lora.weights import http as http_mod
from flux_lora.weights.cache import WeightCache
from flux_lora.weights.http import DownloadPolicy

ROOT = Path(__file__).resolve().parent.parent


def peft_lora(seed: int = 0, rank: int = 4, pad: int = 0) -> bytes:
    """A tiny FLUX LoRA in diffusers/peft layout; `pad` adds bytes (for size-based tests)."""
    rng = np.random.default_rng(seed)
    tensors = {
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": rng.standard_normal(
            (rank, 32), np.float32
        ),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": rng.standard_normal(
            (32, rank), np.float32
        ),
    }
    if pad:
        tensors["transformer.transformer_blocks.0.attn.to_k.lora_A.weight"] = np.zeros(pad // 4, np.float32)
    return save(tensors)


def kohya_lora() -> bytes:
    return save(
        {
            "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": np.ones((4, 32), np.float16),
            "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": np.ones((96, 4), np.float16),
            "lora_unet_double_blocks_0_img_attn_qkv.alpha": np.array(4.0, np.float32),
        }
    )


def not_a_lora() -> bytes:
    return save(
        {
            "model.diffusion.conv_in.weight": np.ones((8, 4), np.float32),
            "model.diffusion.conv_in.bias": np.ones(8, np.float32),
        }
    )


def sd_lora_without_flux_names() -> bytes:
    return save(
        {
            "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": np.ones((4, 8), np.float32),
            "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": np.ones((8, 4), np.float32),
        }
    )


@pytest.fixture
def server():
    with FakeServer() as fake:
        yield fake


@pytest.fixture
def env(server, monkeypatch, tmp_path):
    monkeypatch.setenv("FLUX_LORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FLUX_LORA_ALLOW_PRIVATE_URLS", "1")
    monkeypatch.setenv("FLUX_LORA_REPLICATE_URL", server.url)
    monkeypatch.setenv("FLUX_LORA_CIVITAI_URL", server.url)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("HF_TOKEN", "REPLICATE_API_TOKEN", "CIVITAI_API_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    return tmp_path


def make_cache(root: Path, budget: int = 1 << 30, min_free: int = 0, **policy) -> WeightCache:
    """A cache under `root` with a byte `budget`; `policy` overrides DownloadPolicy fields."""
    defaults = {"allow_private": True, "backoff": 0.01, "timeout": 5.0, "retries": 3}
    return WeightCache(root / "cache", DownloadPolicy(**{**defaults, **policy}), budget, min_free)


@pytest.fixture
def cache(env):
    return make_cache(env)


def assert_nothing_left(cache: WeightCache) -> None:
    assert cache.entries() == []
    assert list((cache.root / "files").iterdir()) == []
    assert list((cache.root / "tmp").iterdir()) == []


# --- every reference form -------------------------------------------------------------------------------


def test_replicate_model_resolves_through_weights_redirect_to_a_tar(server, cache):
    lora = peft_lora()
    server.add_replicate_model(
        "acme",
        "style",
        tar_of({"output/flux_train_replicate/lora.safetensors": lora, "output/config.yaml": b"x: 1"}),
    )
    path = cache.fetch("acme/style")
    assert path.read_bytes() == lora
    assert path.parent == cache.root / "files"
    assert cache.fetch("https://replicate.com/acme/style") == path


def test_replicate_versions_and_token_only_sent_to_replicate(server, env, monkeypatch):
    monkeypatch.setenv("REPLICATE_API_TOKEN", "r8_secret")
    server.state.replicate_token = "r8_secret"
    v = "f" * 64
    lora = kohya_lora()
    delivery = server.add_file("/delivery/x/trained_model.tar", tar_of({"flux_lora.safetensors": lora}))
    server.add_redirect(f"/acme/style/versions/{v}/_weights", delivery.replace(server.url, server.alt_url))
    cache = make_cache(env)
    assert cache.fetch(f"acme/style/versions/{v}").read_bytes() == lora
    assert cache.fetch(f"acme/style/{v}").read_bytes() == lora  # same key: no second download
    weights = [r for r in server.requests if r.path.endswith("/_weights")]
    tars = [r for r in server.requests if r.path.endswith(".tar")]
    assert len(weights) == 1 and weights[0].headers["Authorization"] == "Bearer r8_secret"
    assert tars and all("Authorization" not in r.headers for r in tars)  # not forwarded to another host


def test_replicate_without_token_says_which_token(server, cache):
    server.state.replicate_token = "needed"
    server.add_replicate_model("acme", "private", tar_of({"lora.safetensors": peft_lora()}))
    with pytest.raises(WeightsAuthError, match="REPLICATE_API_TOKEN"):
        cache.fetch("acme/private")
    assert_nothing_left(cache)


def test_plain_urls_keep_their_query_and_hide_it(server, cache):
    lora = peft_lora(1)
    url = server.add_file("/signed/lora.safetensors", lora) + "?X-Amz-Signature=topsecret"
    path = cache.fetch(url)
    assert path.read_bytes() == lora
    assert any(r.path.endswith("?X-Amz-Signature=topsecret") for r in server.requests)
    [entry] = cache.entries()
    assert "topsecret" not in entry.ref and entry.size == len(lora)


@pytest.mark.parametrize("gz", [False, True])
def test_tar_urls_find_the_lora_whatever_its_name(server, cache, gz):
    lora = peft_lora(2)
    url = server.add_file(
        f"/a/weights.tar{'.gz' if gz else ''}",
        tar_of({"README.md": b"hi", "deep/dir/trained.safetensors": lora}, gz=gz),
    )
    assert cache.fetch(url).read_bytes() == lora


def test_data_uris_and_local_files(cache, tmp_path):
    lora = peft_lora(3)
    uri = "data:application/octet-stream;base64," + base64.b64encode(lora).decode()
    assert cache.fetch(uri).read_bytes() == lora
    tar_uri = (
        "data:application/x-tar;base64," + base64.b64encode(tar_of({"x/lora.safetensors": lora})).decode()
    )
    assert cache.fetch(tar_uri).read_bytes() == lora
    local = tmp_path / "mine.safetensors"
    local.write_bytes(lora)
    assert cache.fetch(str(local), allow_local=True) == local  # used in place
    archive = tmp_path / "mine.tar"
    archive.write_bytes(tar_of({"a.safetensors": lora}))
    assert cache.fetch(str(archive), allow_local=True).read_bytes() == lora
    assert archive.exists()  # never moved


def test_hub_explicit_file_and_single_file_repo(server, cache):
    lora = peft_lora(4)
    server.add_hub_repo("acme/one", {"README.md": b"# card", "pytorch_lora_weights.safetensors": lora})
    assert cache.fetch("huggingface.co/acme/one").read_bytes() == lora
    server.add_hub_repo("acme/files", {"a/first.safetensors": lora, "b/second.safetensors": kohya_lora()})
    assert (
        cache.fetch("https://huggingface.co/acme/files/resolve/main/b/second.safetensors").read_bytes()
        == kohya_lora()
    )
    assert cache.fetch("huggingface.co/acme/files/a/first.safetensors").read_bytes() == lora


def test_hub_selection_rule(server, cache):
    lora, other = peft_lora(5), sd_lora_without_flux_names()
    server.add_hub_repo("acme/top", {"lora.safetensors": lora, "ckpts/step100.safetensors": other})
    assert cache.fetch("huggingface.co/acme/top").read_bytes() == lora  # the only top-level file
    server.add_hub_repo("acme/named", {"my_lora.safetensors": lora, "model.safetensors": other})
    assert cache.fetch("huggingface.co/acme/named").read_bytes() == lora  # *lora* in the name
    server.add_hub_repo("acme/header", {"x/a.safetensors": other, "y/b.safetensors": lora})
    assert cache.fetch("huggingface.co/acme/header").read_bytes() == lora  # header looks like FLUX
    server.add_hub_repo("acme/undecided", {"x/a.safetensors": lora, "y/b.safetensors": peft_lora(6)})
    with pytest.raises(WeightsError, match=r"x/a\.safetensors, y/b\.safetensors"):
        cache.fetch("huggingface.co/acme/undecided")


def test_hub_gated_private_and_missing(server, env, monkeypatch):
    lora = peft_lora(7)
    server.state.hub_token = "hf_secret"
    server.add_hub_repo("acme/gated", {"lora.safetensors": lora}, gated=True)
    cache = make_cache(env)
    with pytest.raises(WeightsAuthError, match="HF_TOKEN"):
        cache.fetch("huggingface.co/acme/gated/lora.safetensors")
    with pytest.raises(WeightsNotFound, match="HF_TOKEN"):
        cache.fetch("huggingface.co/acme/missing")
    server.add_hub_repo("acme/open", {"lora.safetensors": lora})
    with pytest.raises(WeightsNotFound, match="nope.safetensors"):
        cache.fetch("huggingface.co/acme/open/nope.safetensors")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert cache.fetch("huggingface.co/acme/gated/lora.safetensors").read_bytes() == lora
    assert_no_tmp(cache)


def assert_no_tmp(cache: WeightCache) -> None:
    assert list((cache.root / "tmp").iterdir()) == []


def test_hub_lfs_redirect_to_another_host(server, cache):
    server.state.hub_cdn = server.alt_url
    lora = peft_lora(8)
    server.add_hub_repo("acme/cdn", {"lora.safetensors": lora})
    assert cache.fetch("huggingface.co/acme/cdn").read_bytes() == lora
    assert server.count("GET", "/hub-cdn/") == 1


def test_civitai_model_id_resolves_to_a_version(server, cache):
    newest, older = peft_lora(9), peft_lora(10)
    server.add_civitai_model(
        1001, [(2002, "style_v2.safetensors", newest), (2001, "style_v1.safetensors", older)]
    )
    assert cache.fetch("https://civitai.com/models/1001/style").read_bytes() == newest
    assert cache.fetch("civitai.com/models/1001?modelVersionId=2001").read_bytes() == older
    assert cache.fetch("https://civitai.com/api/download/models/2001").read_bytes() == older
    assert server.count("GET", "/api/v1/models/1001") == 2
    assert not any("PickleTensor" in r.path for r in server.requests)


def test_civitai_ids_mixed_up_get_a_hint(server, cache):
    server.add_civitai_model(1001, [(2002, "a.safetensors", peft_lora())])
    with pytest.raises(WeightsNotFound, match="api/download/models/2002"):
        cache.fetch("civitai.com/models/2002")  # a version id used as a model id
    with pytest.raises(WeightsNotFound, match="civitai.com/models/1001"):
        cache.fetch("civitai.com/api/download/models/1001")  # a model id used as a version id
    with pytest.raises(WeightsNotFound, match="no version 9"):
        cache.fetch("civitai.com/models/1001?modelVersionId=9")


def test_civitai_token_goes_in_a_header_never_the_url(server, env, monkeypatch, caplog):
    server.state.civitai_token = "civ_secret"
    server.add_civitai_model(1, [(11, "a.safetensors", peft_lora())])
    cache = make_cache(env)
    caplog.set_level("DEBUG")
    with pytest.raises(WeightsAuthError, match="CIVITAI_API_TOKEN") as info:
        cache.fetch("civitai.com/models/1")
    assert "civ_secret" not in str(info.value)
    monkeypatch.setenv("CIVITAI_API_TOKEN", "civ_secret")
    assert cache.fetch("civitai.com/models/1").exists()
    assert all("civ_secret" not in r.path for r in server.requests)
    assert any(r.headers.get("Authorization") == "Bearer civ_secret" for r in server.requests)
    assert "civ_secret" not in caplog.text


# --- verification and failures --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "pattern"),
    [
        (b"\x80\x04\x95" + b"\x00" * 64, "pickle"),
        (b"PK\x03\x04" + b"\x00" * 64, "zip"),
        (not_a_lora(), r"not a LoRA.*model\.diffusion\.conv_in\.bias"),
        (peft_lora()[:-7], "truncated"),
        (b"just some text", "not a safetensors"),
    ],
)
def test_bad_payloads_are_rejected_and_leave_nothing(server, cache, payload, pattern):
    url = server.add_file("/bad.safetensors", payload)
    with pytest.raises(NotALoraError, match=pattern):
        cache.fetch(url)
    assert_nothing_left(cache)


def test_html_page_is_rejected(server, cache):
    server.add_file("/login.safetensors", peft_lora())
    server.fault("/login.safetensors", "html", times=-1)
    with pytest.raises(NotALoraError, match="HTML"):
        cache.fetch(server.url + "/login.safetensors")
    assert_nothing_left(cache)


def test_truncated_transfer_is_retried_then_rejected(server, cache):
    server.state.ranges = False
    url = server.add_file("/cut.safetensors", peft_lora(pad=64 * 1024))
    server.fault("/cut.safetensors", "truncate", times=-1)
    with pytest.raises(WeightsError, match="after 4 attempts"):
        cache.fetch(url)
    assert_nothing_left(cache)


def test_transient_errors_are_retried(server, cache):
    lora = peft_lora(11)
    url = server.add_file("/flaky.safetensors", lora)
    server.fault("/flaky.safetensors", "status", times=2, status=503)
    assert cache.fetch(url).read_bytes() == lora
    assert server.count("GET", "/flaky.safetensors") == 3


def test_http_errors_map_to_actionable_messages(server, cache):
    with pytest.raises(WeightsNotFound, match="not found"):
        cache.fetch(server.url + "/missing.safetensors")
    server.add_file("/forbidden.safetensors", b"")
    server.fault("/forbidden.safetensors", "status", times=-1, status=403)
    with pytest.raises(WeightsAuthError, match="HTTP 403"):
        cache.fetch(server.url + "/forbidden.safetensors")


def test_timeouts_are_reported(server, env):
    url = server.add_file("/slow.safetensors", peft_lora())
    server.fault("/slow.safetensors", "slow", times=-1, delay=1.0)
    cache = make_cache(env, timeout=0.2, retries=1)
    with pytest.raises(WeightsError, match="timed out"):
        cache.fetch(url)
    assert_nothing_left(cache)


def test_too_large(server, env):
    url = server.add_file("/big.safetensors", peft_lora(pad=100_000))
    small, larger = make_cache(env, max_bytes=50_000), make_cache(env, max_bytes=110_000)
    with pytest.raises(WeightsTooLarge, match="limit"):
        small.fetch(url)
    server.state.ranges = False  # no total known up front: the stream is cut at the cap
    with pytest.raises(WeightsTooLarge, match="limit"):
        small.fetch(url)
    tarred = server.add_file("/big.tar", tar_of({"a.safetensors": peft_lora(pad=100_000)}))
    with pytest.raises(WeightsTooLarge):
        larger.fetch(tarred)


def test_tar_members_cannot_escape(server, cache, tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in ("../evil.safetensors", "/abs/evil.safetensors"):
            info = tarfile.TarInfo(name)
            data = peft_lora(12)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link.safetensors")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    url = server.add_file("/evil.tar", buf.getvalue())
    with pytest.raises(WeightsNotFound, match="no .safetensors"):
        cache.fetch(url)
    # Where the members point (above the staging folder, an absolute path) nothing was written.
    assert not list(cache.root.parent.rglob("evil.safetensors")) and not Path("/abs/evil.safetensors").exists()
    assert_nothing_left(cache)


# --- downloads: ranges, network safety -------------------------------------------------------------------


@pytest.mark.parametrize("ranges", [True, False])
def test_parallel_ranged_and_single_stream_give_the_same_bytes(server, env, ranges):
    server.state.ranges = ranges
    lora = peft_lora(13, pad=3 * 1024 * 1024)
    url = server.add_file("/big/lora.safetensors", lora)
    cache = make_cache(env, part_bytes=256 * 1024, connections=4)
    assert cache.fetch(url).read_bytes() == lora
    # ranged: the first request (the head) plus 3 ranged parts; otherwise one plain stream
    assert server.count("GET", "/big/lora.safetensors") == (4 if ranges else 1)
    assert len({r.headers.get("Range") for r in server.requests}) == (4 if ranges else 1)


def test_private_addresses_refused_by_default(server, env, monkeypatch):
    url = server.add_file("/lora.safetensors", peft_lora())
    cache = make_cache(env, allow_private=False)
    with pytest.raises(BlockedUrlError, match="FLUX_LORA_ALLOW_PRIVATE_URLS"):
        cache.fetch(url)
    # A host allowed explicitly (host:port) that redirects to loopback: refused at the redirect.
    allowed = make_cache(env, allow_private=False, allow_hosts=frozenset({server.url.removeprefix("http://")}))
    server.add_redirect("/hop.safetensors", server.alt_url + "/lora.safetensors")
    with pytest.raises(BlockedUrlError, match="localhost"):
        allowed.fetch(server.url + "/hop.safetensors")
    assert server.count("GET", "/lora.safetensors") == 0


@pytest.mark.parametrize(
    "address",
    [
        "169.254.169.254",
        "10.0.0.8",
        "192.168.1.1",
        "::1",
        "::ffff:127.0.0.1",
        "fd00:ec2::254",
        "100.100.100.200",
        "0.0.0.0",
    ],
)
def test_check_url_blocks_non_public_addresses(monkeypatch, address):
    monkeypatch.setattr(http_mod, "resolve_host", lambda host, port: [address])
    with pytest.raises(BlockedUrlError):
        http_mod.check_url("https://lora.example/x.safetensors", allow_private=False)
    monkeypatch.setattr(http_mod, "resolve_host", lambda host, port: ["93.184.216.34"])
    http_mod.check_url("https://lora.example/x.safetensors", allow_private=False)


# --- the cache: persistence, LRU, locks -------------------------------------------------------------------


def test_cache_hits_survive_restarts_without_network(env):
    lora = peft_lora(14)
    with FakeServer() as server:
        url = server.add_file("/p.safetensors", lora)
        first = make_cache(env).fetch(url)
    again = make_cache(env)  # a new process would read the same on-disk index; the server is gone
    assert again.fetch(url) == first
    assert [e.ref for e in again.entries()] == [url]


def test_lru_eviction_by_byte_budget(server, env):
    files = {name: peft_lora(i, pad=20_000) for i, name in enumerate("abc")}
    urls = {name: server.add_file(f"/{name}.safetensors", data) for name, data in files.items()}
    cache = make_cache(env, budget=2 * len(files["a"]) + 100)
    for name in "aba":  # a is now more recent than b; each file read (released) before the next fetch
        cache.fetch(urls[name])
        cache.release()
        time.sleep(0.01)
    cache.fetch(urls["c"])
    assert sorted(Path(e.ref).name for e in cache.entries()) == ["a.safetensors", "c.safetensors"]
    assert len(list((cache.root / "files").iterdir())) == 2


def test_eviction_keeps_a_free_disk_floor(server, env, monkeypatch):
    cache = make_cache(env, min_free=10**9)
    monkeypatch.setattr(
        cache, "_free_bytes", lambda: 0 if len(list((cache.root / "files").iterdir())) > 1 else 10**12
    )
    cache.fetch(server.add_file("/x.safetensors", peft_lora(15)))
    cache.release()
    cache.fetch(server.add_file("/y.safetensors", peft_lora(16)))
    assert [Path(e.ref).name for e in cache.entries()] == ["y.safetensors"]


def test_threads_fetching_one_reference_download_it_once(server, cache):
    server.state.chunk_delay = 0.05
    lora = peft_lora(17, pad=512 * 1024)
    url = server.add_file("/shared.safetensors", lora)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(cache.fetch(url))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(results) == 4
    assert server.count("GET", "/shared.safetensors") == 1


def _cli(env_dir: Path, *args: str, **kw) -> subprocess.Popen:
    environ = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "flux_lora", "weights", *args],
        cwd=env_dir,
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def test_processes_fetching_one_reference_download_it_once(server, env):
    server.state.chunk_delay = 0.02
    url = server.add_file("/proc.safetensors", peft_lora(18, pad=512 * 1024))
    procs = [_cli(env, "fetch", url) for _ in range(3)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    assert len({out.strip() for out, _ in outs}) == 1
    assert server.count("GET", "/proc.safetensors") == 1


def test_a_killed_download_leaves_no_entry(server, env):
    server.state.chunk_delay = 0.2
    url = server.add_file("/killed.safetensors", peft_lora(19, pad=2 * 1024 * 1024))
    proc = _cli(env, "fetch", url, start_new_session=True)
    deadline = time.time() + 20
    while server.count("GET", "/killed.safetensors") == 0 and time.time() < deadline:
        time.sleep(0.05)
    assert server.count("GET", "/killed.safetensors"), "the download never started"
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    cache = make_cache(env)
    assert cache.entries() == [] and list((cache.root / "files").iterdir()) == []
    assert list((cache.root / "tmp").iterdir())  # the partial download, never served
    server.state.chunk_delay = 0
    assert cache.fetch(url).stat().st_size == len(peft_lora(19, pad=2 * 1024 * 1024))
    assert_no_tmp(cache)


def test_corrupt_index_or_missing_file_refetches(server, cache):
    url = server.add_file("/i.safetensors", peft_lora(20))
    path = cache.fetch(url)
    path.unlink()
    assert cache.fetch(url).exists()
    (cache.root / "index.json").write_text("{not json")
    assert cache.fetch(url).exists()
    assert server.count("GET", "/i.safetensors") == 3


# --- settings and the command line --------------------------------------------------------------------------


def test_from_settings_and_cli(server, env):
    url = server.add_file("/cli.safetensors", peft_lora(21))
    cache = WeightCache.from_settings(Settings.from_env())
    assert cache.root == env / "cache" and cache.policy.allow_private
    fetched = _cli(env, "fetch", url)
    out, _ = fetched.communicate(timeout=60)
    assert fetched.returncode == 0 and Path(out.strip()).read_bytes() == peft_lora(21)
    listed = _cli(env, "list")
    out, _ = listed.communicate(timeout=60)
    assert url in out and str(len(peft_lora(21))) in out
    bad = _cli(env, "fetch", "not a ref")
    _, err = bad.communicate(timeout=60)
    assert (
        bad.returncode == 1
        and err.startswith("error: unrecognised LoRA reference")
        and "Traceback" not in err
    )
    cleared = _cli(env, "clear")
    out, _ = cleared.communicate(timeout=60)
    assert "removed 1" in out and json.loads((env / "cache" / "index.json").read_text()) == {}


# --- secrets in references ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ref",
    [
        "https://civitai.com/api/download/models/123?token=USERSECRET",
        "civitai.com/models/12?token=USERSECRET&modelVersionId=123",
    ],
)
def test_a_civitai_token_in_the_url_is_sent_as_a_header_and_never_shown(server, env, caplog, ref):
    server.state.civitai_token = "USERSECRET"
    server.add_civitai_model(12, [(123, "a.safetensors", peft_lora(22))])
    cache = make_cache(env)
    caplog.set_level("DEBUG")
    assert cache.fetch(ref).read_bytes() == peft_lora(22)
    assert cache.fetch(ref).exists()  # a hit: logged with the reference
    assert "cached at" in caplog.text and "USERSECRET" not in caplog.text
    assert "USERSECRET" not in (cache.root / "index.json").read_text()
    assert [e.ref for e in cache.entries()] == [ref.partition("?")[0] + "?…"]
    assert all("USERSECRET" not in r.path for r in server.requests)
    assert any(r.headers.get("Authorization") == "Bearer USERSECRET" for r in server.requests)


# --- Hub failures -----------------------------------------------------------------------------------------


def _dead_url() -> str:
    """A loopback URL nothing listens on (the port of a server just closed)."""
    with FakeServer() as gone:
        return gone.url


@pytest.mark.parametrize("ref", ["huggingface.co/acme/x/lora.safetensors", "huggingface.co/acme/x"])
def test_an_unreachable_hub_is_a_user_error_not_a_missing_file(env, monkeypatch, ref):
    monkeypatch.setenv("HF_ENDPOINT", _dead_url())
    monkeypatch.setattr("huggingface_hub.utils._http.time.sleep", lambda s: None)  # its own retries, at once
    cache = make_cache(env)
    with pytest.raises(WeightsError, match="cannot reach the Hub") as info:
        cache.fetch(ref)
    assert not isinstance(info.value, WeightsNotFound)


def test_an_unreachable_hub_is_one_line_from_the_command_line(env, monkeypatch, capsys):
    from flux_lora.serving import cli

    monkeypatch.setenv("HF_ENDPOINT", _dead_url())
    monkeypatch.setattr("huggingface_hub.utils._http.time.sleep", lambda s: None)
    assert cli.main(["weights", "fetch", "huggingface.co/acme/x"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("error: huggingface.co/acme/x: cannot reach the Hub"), err


def test_the_shared_hub_error_mapping():
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    from flux_lora.weights.hub import hub_failure

    assert hub_failure(LocalEntryNotFoundError("offline")).kind == "unreachable"
    assert hub_failure(EntryNotFoundError("gone")).kind == "entry"
    assert hub_failure(KeyError("x")) is None


@pytest.mark.parametrize("cdn", [False, True])
def test_a_named_hub_file_over_the_cap_is_refused_before_downloading(server, env, cdn):
    if cdn:
        server.state.hub_cdn = server.alt_url
    server.add_hub_repo("acme/big", {"lora.safetensors": peft_lora(pad=100_000), "small.safetensors": peft_lora()})
    cache = make_cache(env, max_bytes=50_000)
    with pytest.raises(WeightsTooLarge, match="FLUX_LORA_MAX_DOWNLOAD_BYTES"):
        cache.fetch("huggingface.co/acme/big/lora.safetensors")
    assert not [r for r in server.requests if r.method == "GET" and "lora.safetensors" in r.path]
    assert cache.fetch("huggingface.co/acme/big/small.safetensors").read_bytes() == peft_lora()


# --- local paths -------------------------------------------------------------------------------------------


def test_local_paths_are_refused_unless_allowed_and_say_nothing_about_the_file(env, tmp_path):
    archive = tmp_path / "host.tar"
    archive.write_bytes(tar_of({"a.safetensors": peft_lora()}))
    cache = make_cache(env)
    messages = set()
    for ref in ("/etc/passwd", "/etc/nope", str(archive), "file:///etc/passwd", "../../etc/x.safetensors"):
        with pytest.raises(LocalFileRefused) as info:
            cache.fetch(ref)
        messages.add(str(info.value))
    assert len(messages) == 1 and "not accepted by the server unless FLUX_LORA_LOCAL_LORA_DIRS" in messages.pop()
    assert_nothing_left(cache)
    assert cache.fetch(str(archive), allow_local=True).read_bytes() == peft_lora()  # COG_WEIGHTS, the CLI


def test_check_raises_what_fetch_would_without_the_network(server, cache, tmp_path):
    (tmp_path / "notes.safetensors").write_bytes(b"not a safetensors file at all")
    (tmp_path / "mine.safetensors").write_bytes(peft_lora())
    with pytest.raises(UserError, match="unrecognised LoRA reference"):
        cache.check("not a reference", allow_local=True)
    with pytest.raises(WeightsNotFound, match="does not exist"):
        cache.check(str(tmp_path / "gone.safetensors"), allow_local=True)
    with pytest.raises(NotALoraError, match="notes.safetensors"):
        cache.check(str(tmp_path / "notes.safetensors"), allow_local=True)
    with pytest.raises(LocalFileRefused, match="FLUX_LORA_LOCAL_LORA_DIRS"):
        cache.check(str(tmp_path / "mine.safetensors"))
    cache.check(str(tmp_path / "mine.safetensors"), allow_local=True)
    cache.check(f"{server.url}/never/asked.safetensors")  # a URL's form only: fetched by `fetch`
    assert server.requests == [] and cache.entries() == []


def test_local_lora_dirs_allow_files_under_them_only(env, tmp_path, monkeypatch):
    allowed = tmp_path / "loras"
    allowed.mkdir()
    (allowed / "mine.safetensors").write_bytes(peft_lora(23))
    (tmp_path / "outside.safetensors").write_bytes(peft_lora(24))
    (allowed / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
    monkeypatch.setenv("FLUX_LORA_LOCAL_LORA_DIRS", f"{tmp_path / 'elsewhere'}{os.pathsep}{allowed}")
    cache = WeightCache.from_settings(Settings.from_env())
    assert cache.fetch(str(allowed / "mine.safetensors")).read_bytes() == peft_lora(23)
    assert cache.fetch(f"file://{allowed}/mine.safetensors").read_bytes() == peft_lora(23)
    for escape in (f"{allowed}/../outside.safetensors", str(allowed / "link.safetensors")):
        with pytest.raises(LocalFileRefused, match="FLUX_LORA_LOCAL_LORA_DIRS"):
            cache.fetch(escape)


# --- unversioned references follow new versions --------------------------------------------------------------


def test_an_unversioned_replicate_model_follows_its_latest_version(server, env, caplog):
    v1, v2 = peft_lora(25), peft_lora(26)
    v1_tar = server.add_file("/delivery/v1/trained_model.tar", tar_of({"lora.safetensors": v1}))
    server.add_redirect("/acme/live/_weights", v1_tar)
    cache = make_cache(env, retries=0)
    assert cache.fetch("acme/live").read_bytes() == v1
    v2_tar = server.add_file("/delivery/v2/trained_model.tar", tar_of({"lora.safetensors": v2}))
    server.add_redirect("/acme/live/_weights", v2_tar)
    assert cache.fetch("acme/live").read_bytes() == v2  # a new version is downloaded
    assert cache.fetch("replicate.com/acme/live").read_bytes() == v2  # unchanged: a hit, one small request
    assert server.count("GET", "/delivery/v2/") == 1 and server.count("GET", "/acme/live/_weights") == 3
    server.fault("/acme/live/_weights", "status", times=-1, status=503)  # Replicate is down: the last copy
    with caplog.at_level("WARNING"):
        assert cache.fetch("acme/live").read_bytes() == v2
    assert "cached earlier" in caplog.text
    server.fault("/acme/new/_weights", "status", times=-1, status=503)
    with pytest.raises(WeightsError, match="HTTP 503"):  # nothing cached to fall back on
        cache.fetch("acme/new")


def test_unversioned_references_are_rechecked_at_most_every_recheck_interval(server, env):
    v1, v2 = peft_lora(29), peft_lora(30)
    server.add_redirect("/acme/busy/_weights", server.add_file("/delivery/b1/m.tar", tar_of({"l.safetensors": v1})))
    cache = WeightCache(env / "cache", DownloadPolicy(allow_private=True, retries=0), 1 << 30, 0, recheck_seconds=60)
    for _ in range(3):
        assert cache.fetch("acme/busy").read_bytes() == v1
    assert server.count("GET", "/acme/busy/_weights") == 1  # one round trip, not one per prediction
    server.add_redirect("/acme/busy/_weights", server.add_file("/delivery/b2/m.tar", tar_of({"l.safetensors": v2})))
    cache.recheck_seconds = 0  # the interval is over
    assert cache.fetch("acme/busy").read_bytes() == v2


@pytest.mark.parametrize("ref", ["huggingface.co/acme/live", "huggingface.co/acme/live/lora.safetensors"])
def test_an_unversioned_hub_reference_follows_the_branch_head(server, env, monkeypatch, caplog, ref):
    v1, v2 = peft_lora(27), peft_lora(28)
    server.add_hub_repo("acme/live", {"lora.safetensors": v1})
    cache = make_cache(env)
    assert cache.fetch(ref).read_bytes() == v1
    server.add_hub_repo("acme/live", {"lora.safetensors": v2})  # a new commit on main
    assert cache.fetch(ref).read_bytes() == v2
    downloads = server.count("GET", "/acme/live/resolve/")
    assert cache.fetch(ref).read_bytes() == v2
    assert server.count("GET", "/acme/live/resolve/") == downloads  # same commit: no download
    monkeypatch.setenv("HF_ENDPOINT", _dead_url())
    monkeypatch.setattr("huggingface_hub.utils._http.time.sleep", lambda s: None)
    with caplog.at_level("WARNING"):
        assert cache.fetch(ref).read_bytes() == v2
    assert "cannot reach the Hub" in caplog.text and "cached earlier" in caplog.text


def test_a_file_first_cached_by_its_commit_serves_its_branch_offline(server, env, monkeypatch):
    """Cached by its commit sha, then asked for by branch: one model-info request for the whole recheck
    interval, and the cached copy while the Hub is unreachable (whichever spelling brought the file in)."""
    lora = peft_lora(31)
    repo = server.add_hub_repo("acme/pinned", {"lora.safetensors": lora})
    cache = WeightCache(env / "cache", DownloadPolicy(allow_private=True, retries=0), 1 << 30, 0, recheck_seconds=60)
    by_commit = f"huggingface.co/acme/pinned/resolve/{repo.sha}/lora.safetensors"
    by_branch = "huggingface.co/acme/pinned/lora.safetensors"
    assert cache.fetch(by_commit).read_bytes() == lora
    for _ in range(3):
        assert cache.fetch(by_branch).read_bytes() == lora
    assert server.count("GET", "/api/models/acme/pinned") == 1  # pinned once, then the interval holds
    assert server.count("GET", "/acme/pinned/resolve/") == 1  # one download in all
    cache.recheck_seconds = 0  # the interval is over, and the Hub is gone
    monkeypatch.setenv("HF_ENDPOINT", _dead_url())
    monkeypatch.setattr("huggingface_hub.utils._http.time.sleep", lambda s: None)
    for ref in (by_branch, by_commit):
        assert cache.fetch(ref).read_bytes() == lora


def test_stale_partial_downloads_are_cleaned_when_the_cache_opens(env):
    from filelock import FileLock

    make_cache(env)
    tmp = env / "cache" / "tmp"
    old = time.time() - 2 * 3600
    for name in ("a" * 32 + ".1.x", "b" * 32 + ".1.x", "c" * 32 + ".1.x"):
        (tmp / name).mkdir()
        (tmp / name / "payload").write_bytes(b"x" * 1000)
        if not name.startswith("c"):
            os.utime(tmp / name, (old, old))
    with FileLock(env / "cache" / "locks" / f"{'b' * 32}.lock"):  # another process is still downloading it
        make_cache(env)
    assert sorted(p.name[0] for p in tmp.iterdir()) == ["b", "c"]  # stale and unlocked: gone
