"""Three `flux-lora serve` replicas sharing one store and one LoRA cache, as on Kubernetes with a
ReadWriteMany volume: a new LoRA downloads once for all of them, and a replica killed mid-download
leaves nothing the others would serve."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import CogServer, decode_output, server_env
from fakes import FakeServer
from safetensors.numpy import save

pytestmark = pytest.mark.slow  # starts servers or subprocesses: `pytest -m "not slow"` skips it

INPUTS = {"prompt": "a cat", "num_inference_steps": 2, "megapixels": "0.25", "seed": 5, "output_format": "png"}


def lora(seed: int, rank: int = 4) -> bytes:
    """A peft LoRA on the tiny model's first attention query (rank 1024: 256 KiB, four 64 KiB chunks)."""
    rng = np.random.default_rng(seed)
    return save({
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": rng.standard_normal((rank, 32), np.float32) / 8,
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": rng.standard_normal((32, rank), np.float32) / 8,
    })


def _tree(pid: int) -> list[int]:
    """`pid` and every process below it (coglet runs predictions in a child process)."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                todo.extend(int(c) for c in (task / "children").read_text().split())
            except FileNotFoundError:
                continue
    return out


@pytest.fixture(scope="module")
def shared(
    tiny_store: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[FakeServer, Callable[[str], CogServer], Path]]:
    tmp_path = tmp_path_factory.mktemp("replicas")
    cache = tmp_path / "shared-lora-cache"
    started: list[CogServer] = []

    def start(name: str) -> CogServer:
        workdir = tmp_path / name
        workdir.mkdir(exist_ok=True)
        env = server_env(tiny_store, workdir)
        env.update(FLUX_LORA_CACHE=str(cache), FLUX_LORA_ALLOW_PRIVATE_URLS="1")
        server = CogServer("hotswap", workdir, env)
        started.append(server)
        return server

    with FakeServer() as fake:
        fake.state.ranges = False  # one GET per download: easy to count
        yield fake, start, cache
        for server in started:
            server.stop()


@pytest.fixture(scope="module")
def replicas(shared) -> list[CogServer]:
    """Three replicas on the shared store and cache, started together (each start costs seconds of imports);
    the tests below share them, and the last one kills one of them."""
    _, start, _ = shared
    with ThreadPoolExecutor(3) as pool:
        return list(pool.map(start, ["a", "b", "c"]))


def test_a_new_lora_asked_of_three_replicas_at_once_downloads_once(shared, replicas) -> None:
    fake, _, cache = shared
    before = _index(cache)
    url = fake.add_file("/loras/new.safetensors", lora(1))
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda s: s.predict(replicate_weights=url, **INPUTS), replicas))
    bodies = [a.json() for a in answers]
    assert [b["status"] for b in bodies] == ["succeeded"] * 3, [b.get("error") for b in bodies]
    assert fake.count("GET", "/loras/new.safetensors") == 1
    images = [np.asarray(decode_output(b["output"][0])) for b in bodies]
    assert all(np.array_equal(images[0], other) for other in images[1:])
    assert len(_index(cache)) == len(before) + 1


def test_a_replica_killed_mid_download_leaves_nothing_served(shared, replicas) -> None:
    fake, start, cache = shared
    other, doomed = replicas[1:]
    before = (_index(cache).keys(), sorted((cache / "files").glob("*")))
    url = fake.add_file("/loras/slow.safetensors", lora(2, rank=1024))
    fake.state.chunk_delay = 1.5  # about 6 s for the whole file
    threading.Thread(target=lambda: _quietly(doomed.predict, replicate_weights=url, **INPUTS), daemon=True).start()
    deadline = time.monotonic() + 60
    while not list((cache / "tmp").glob("*")) and time.monotonic() < deadline:
        time.sleep(0.1)
    staging = list((cache / "tmp").glob("*"))
    assert staging, "the download never started"
    for pid in _tree(doomed.proc.pid):
        os.kill(pid, signal.SIGKILL)
    doomed.proc.wait(timeout=30)
    assert (_index(cache).keys(), sorted((cache / "files").glob("*"))) == before  # nothing of the partial download
    fake.state.chunk_delay = 0.0
    body = other.predict(replicate_weights=url, **INPUTS).json()
    assert body["status"] == "succeeded", body.get("error")
    assert not any(p.exists() for p in staging)  # the killed replica's staging went once the key was fetched
    entries = [e for key, e in _index(cache).items() if key not in before[0]]
    assert [e["size"] for e in entries] == [len(fake.state.files["/loras/slow.safetensors"])]
    gets = fake.count("GET", "/loras/slow.safetensors")
    restarted = start("doomed-again")
    again = restarted.predict(replicate_weights=url, **INPUTS).json()
    assert again["status"] == "succeeded", again.get("error")
    assert fake.count("GET", "/loras/slow.safetensors") == gets  # served from the shared cache
    assert np.array_equal(np.asarray(decode_output(again["output"][0])), np.asarray(decode_output(body["output"][0])))


def _quietly(call: Callable[..., object], **kwargs: object) -> None:
    with contextlib.suppress(Exception):  # the replica is killed under this request: its connection drops
        call(**kwargs)


def _index(cache: Path) -> dict:
    path = cache / "index.json"
    return json.loads(path.read_text()) if path.exists() else {}


# --------------------------------------------------------------------------- the shared LoRA cache's budget

# One replica's cache traffic: fetch each URL, wait (the other replica evicts meanwhile), read the file the
# way the adapters stage does, release it. Prints one line per fetch: the bytes read match the server's.
REPLICA = """
import hashlib, sys, time
from pathlib import Path
from flux_lora.weights.cache import WeightCache
from flux_lora.weights.http import DownloadPolicy
from flux_lora.lora.formats import read_lora
root, budget, pause, urls = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4:]
cache = WeightCache(root, DownloadPolicy(allow_private=True, backoff=0.01, timeout=5.0, retries=3), budget, 0)
for url in urls:
    path = cache.fetch(url)
    time.sleep(pause)
    read_lora(path)
    print(url, hashlib.sha256(path.read_bytes()).hexdigest(), flush=True)
    cache.release()
"""


def _replica(root: Path, budget: int, pause: float, *urls: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", REPLICA, str(root), str(budget), str(pause), *urls],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finished(replica: subprocess.Popen) -> dict[str, str]:
    out, err = replica.communicate(timeout=120)
    assert replica.returncode == 0, err[-2000:]
    return dict(line.split() for line in out.splitlines())


def _consistent(root: Path) -> int:
    """The index and files/ agree, nothing is staged: the bytes the index accounts for."""
    index = _index(root)
    assert sorted(v["file"] for v in index.values()) == sorted(p.name for p in (root / "files").iterdir())
    assert not list((root / "tmp").iterdir())
    return sum(v["size"] for v in index.values())


def test_two_replicas_filling_the_cache_past_its_budget_at_once_keep_it(tmp_path: Path) -> None:
    root = tmp_path / "shared-lora-cache"
    with FakeServer() as fake:
        files = {f"/loras/{i}.safetensors": lora(10 + i, rank=64) for i in range(8)}
        urls = [fake.add_file(path, data) for path, data in files.items()]
        size = len(next(iter(files.values())))
        budget = 3 * size + 100  # three files: each replica's fetches evict the other's
        first = _replica(root, budget, 0.3, *urls[:6])
        second = _replica(root, budget, 0.1, *urls[2:][::-1])
        seen = {**_finished(first), **_finished(second)}
        expected = {url: hashlib.sha256(files[url.removeprefix(fake.url)]).hexdigest() for url in urls}
        assert seen == expected  # every fetch read whole, right bytes, though the other replica was evicting
        assert _consistent(root) <= budget + 2 * size  # at most each replica's last file, held while read
        _finished(_replica(root, budget, 0.0, urls[0]))  # the next fetch, nothing held: within budget again
        assert _consistent(root) <= budget


def test_a_path_fetch_returned_stays_loadable_while_another_replica_evicts_it(tmp_path: Path) -> None:
    from flux_lora.lora.formats import read_lora
    from flux_lora.weights.cache import WeightCache
    from flux_lora.weights.http import DownloadPolicy

    root = tmp_path / "shared-lora-cache"
    with FakeServer() as fake:
        data = {name: lora(20 + i, rank=64) for i, name in enumerate("abcd")}
        urls = {name: fake.add_file(f"/loras/{name}.safetensors", blob) for name, blob in data.items()}
        budget = 2 * len(data["a"]) + 100
        cache = WeightCache(root, DownloadPolicy(allow_private=True, retries=0), budget, 0)
        path = cache.fetch(urls["a"])  # this replica has not read it yet...
        _finished(_replica(root, budget, 0.0, urls["b"], urls["c"]))  # ...when another fills the cache past it
        assert path.read_bytes() == data["a"] and read_lora(path)[0]  # still whole, still a LoRA
        refs = sorted(Path(v["ref"]).name for v in _index(root).values())
        assert refs == ["a.safetensors", "c.safetensors"]  # b went instead; a stays while held, evicted later
        cache.release()  # read: eviction may take it now
        _finished(_replica(root, budget, 0.0, urls["d"]))
        assert not path.exists() and _consistent(root) <= budget


# --------------------------------------------------------------------------- the shared store's fp8 copies

QUANTIZE = """
import hashlib, sys
from pathlib import Path
import torch
from diffusers import FluxTransformer2DModel
from flux_lora.generation import fast
store = Path(sys.argv[1])
source = store / "FLUX.1-dev"
config = FluxTransformer2DModel.load_config(source, subfolder="transformer")
transformer, mode = fast.build_fast_transformer(
    lambda: FluxTransformer2DModel.from_config(config),
    lambda: FluxTransformer2DModel.from_pretrained(source, subfolder="transformer"),
    model="dev", store=store, source=source / "transformer", device=torch.device("cpu"), dtype=torch.float32,
    mode=fast.fp8_mode(torch.device("cpu")),
)
digest = hashlib.sha256()
for name, tensor in sorted(transformer.state_dict().items()):
    plain = tensor.dequantize() if hasattr(tensor, "dequantize") else tensor
    digest.update(name.encode() + plain.float().numpy().tobytes())
print(mode.value, digest.hexdigest())
"""


def test_replicas_starting_together_write_one_prequantized_copy(tiny_store: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    starts = [subprocess.Popen([sys.executable, "-c", QUANTIZE, str(store)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = []
    for start in starts:
        out, err = start.communicate(timeout=300)
        assert start.returncode == 0, err[-2000:]
        outputs.append(out.split())
    assert outputs[0][0] == "fp8-weight-only" and all(o == outputs[0] for o in outputs)  # the same tensors
    copies = list((store / "fast").glob("dev-*.pt"))
    assert len(copies) == 1 and not list((store / "fast").glob("*.incomplete"))
