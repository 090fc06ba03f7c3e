"""Three `flux-lora serve` replicas sharing one store and one LoRA cache, as on Kubernetes with a
ReadWriteMany volume: a new LoRA downloads once for all of them, and a replica killed mid-download
leaves nothing the others would serve."""

from __future__ import annotations

import contextlib
import json
import os
import signal
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


@pytest.fixture
def shared(tiny_store: Path, tmp_path: Path) -> Iterator[tuple[FakeServer, Callable[[str], CogServer], Path]]:
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


def test_a_new_lora_asked_of_three_replicas_at_once_downloads_once(shared) -> None:
    fake, start, cache = shared
    with ThreadPoolExecutor(3) as pool:
        servers = list(pool.map(start, ["a", "b", "c"]))
        url = fake.add_file("/loras/new.safetensors", lora(1))
        answers = list(pool.map(lambda s: s.predict(replicate_weights=url, **INPUTS), servers))
    bodies = [a.json() for a in answers]
    assert [b["status"] for b in bodies] == ["succeeded"] * 3, [b.get("error") for b in bodies]
    assert fake.count("GET", "/loras/new.safetensors") == 1
    images = [np.asarray(decode_output(b["output"][0])) for b in bodies]
    assert all(np.array_equal(images[0], other) for other in images[1:])
    assert len(_index(cache)) == 1


def test_a_replica_killed_mid_download_leaves_nothing_served(shared) -> None:
    fake, start, cache = shared
    with ThreadPoolExecutor(2) as pool:
        doomed, other = pool.map(start, ["doomed", "other"])
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
    assert not list((cache / "files").glob("*")) and not _index(cache)  # nothing of the partial download kept
    fake.state.chunk_delay = 0.0
    body = other.predict(replicate_weights=url, **INPUTS).json()
    assert body["status"] == "succeeded", body.get("error")
    assert not any(p.exists() for p in staging)  # the killed replica's staging went once the key was fetched
    entries = _index(cache)
    assert [e["size"] for e in entries.values()] == [len(fake.state.files["/loras/slow.safetensors"])]
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
