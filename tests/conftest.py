"""Shared fixtures: one tiny FLUX store per test session, and the real cog server on loopback."""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))  # tests/seeds.py and friends


# What flux_lora.generation.fast.configure_compile_cache writes into os.environ (for the whole process).
COMPILE_CACHE_ENV = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "TORCHINDUCTOR_FX_GRAPH_CACHE",
                     "TORCHINDUCTOR_AUTOGRAD_CACHE")


def isolate_compile_cache_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset the compile-cache variables until `monkeypatch` undoes its changes, each restored as it was.

    `monkeypatch.delenv` of an unset variable records nothing, so a value set later (by the code under
    test) would outlive the test: each variable is set first, which records its state, then removed.
    """
    for name in COMPILE_CACHE_ENV:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


# ------------------------------------------------------------------ two workers (scripts/test.sh: pytest -n 2)

# The files whose tests use the session's servers (`hotswap_server`, `trained_server`): one work unit, so the
# servers start once (tests/test_suite.py checks that the list is whole).
SESSION_SERVER_FILES = ("tests/test_http.py", "tests/test_lora.py", "tests/test_parity.py", "tests/test_server.py")


def pytest_configure(config: pytest.Config) -> None:
    """With pytest-xdist's workers, one torch thread per process: two workers (and the servers they start)
    on two cores, each spinning two threads, spend half as much CPU again on the same tests."""
    if getattr(config.option, "numprocesses", None):
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # this run's controller: inherited by workers and servers


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist's: without it (`-p no:xdist`) never called
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """For `-n N` (xdist's default `--dist load`): whole files to a worker (their module-scoped services,
    stores and servers are built once), the files of SESSION_SERVER_FILES as one, in the order the workers
    collected them (see the next hook). Another `--dist` asked for is xdist's own."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByFile(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "session servers" if path in SESSION_SERVER_FILES else path

    config.option.loadscopereorder = False
    return ByFile(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On xdist's workers, the longest work first: the session servers' files, then the other files with `slow`
    tests, then the quick files, which fill in so that both workers end together."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    slow = {item.path for item in items if item.get_closest_marker("slow")}

    def rank(item: pytest.Item) -> int:
        path = item.nodeid.split("::", 1)[0]
        return 0 if path in SESSION_SERVER_FILES else 1 if item.path in slow else 2

    items.sort(key=rank)  # stable: each file keeps its own order


@pytest.fixture(autouse=True)
def _compile_cache_env_is_restored() -> Iterator[None]:
    """No test leaves the compile cache's switches (set only by our code, never at import) to the tests after it."""
    names = COMPILE_CACHE_ENV[1:]  # importing diffusers sets TORCHINDUCTOR_CACHE_DIR itself
    before = {name: os.environ.get(name) for name in names}
    yield
    after = {name: os.environ.get(name) for name in names}
    assert after == before, "compile-cache variables leaked: use conftest.isolate_compile_cache_env"


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from flux_lora.generation.tiny import make_tiny_store

    return make_tiny_store(tmp_path_factory.mktemp("store"))


@pytest.fixture
def store_env(tiny_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the service at the tiny store, with a private LoRA cache."""
    monkeypatch.setenv("FLUX_LORA_WEIGHTS", str(tiny_store))
    monkeypatch.setenv("FLUX_LORA_CACHE", str(tmp_path / "lora-cache"))
    monkeypatch.delenv("COG_WEIGHTS", raising=False)
    return tiny_store


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CogServer:
    """`flux-lora serve` in a subprocess: the real coglet HTTP server on 127.0.0.1."""

    def __init__(self, predictor: str, workdir: Path, env: dict[str, str], wait: bool = True) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "server.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flux_lora", "serve", "--predictor", predictor, "--port", str(self.port)],
            cwd=workdir,
            env=env,
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        if wait:
            self.wait_ready()

    def health(self, timeout: float = 180) -> dict:
        """/health-check's answer once setup is over (READY, SETUP_FAILED, ...): for a setup expected to fail."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                body = requests.get(f"{self.url}/health-check", timeout=2).json()
                if body.get("status") != "STARTING":
                    return body
            except (requests.ConnectionError, requests.Timeout, ValueError):
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited:\n{self.log.read_text()[-3000:]}") from None
            time.sleep(0.2)
        raise RuntimeError(f"setup never ended:\n{self.log.read_text()[-3000:]}")

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log.read_text()[-3000:]}")
            try:
                if requests.get(f"{self.url}/health-check", timeout=2).json()["status"] == "READY":
                    return
            except (requests.ConnectionError, requests.Timeout, ValueError, KeyError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server not ready:\n{self.log.read_text()[-3000:]}")

    def predict(self, timeout: float = 120, **inputs: object) -> requests.Response:
        """POST a prediction and wait for the answer (never a 409 for one client: tests/test_server.py)."""
        return requests.post(f"{self.url}/predictions", json={"input": inputs}, timeout=timeout)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def server_env(store: Path, workdir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COG_", "FLUX_LORA_"))}
    env.update(FLUX_LORA_WEIGHTS=str(store), FLUX_LORA_CACHE=str(workdir / "lora-cache"), **extra)
    return env


def _serve(predictor: str, store: Path, factory: pytest.TempPathFactory, **extra: str) -> Iterator[CogServer]:
    workdir = factory.mktemp(predictor)
    server = CogServer(predictor, workdir, server_env(store, workdir, **extra))
    yield server
    server.stop()


# One server per variant for the whole session: each start costs about 20 s of imports on 2 cores, and the
# tests that share one send their requests one after another. The hot-swap one may fetch LoRAs from the
# tests' loopback hosts; refusing private hosts is tested on a server of its own (test_url_inputs.py).
@pytest.fixture(scope="session")
def hotswap_server(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CogServer]:
    yield from _serve("hotswap", tiny_store, tmp_path_factory, FLUX_LORA_ALLOW_PRIVATE_URLS="1")


@pytest.fixture(scope="session")
def trained_server(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CogServer]:
    yield from _serve("trained", tiny_store, tmp_path_factory)


def data_uri(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode()}"


def decode_output(uri: str) -> Image.Image:
    """An output URI (cog returns data: URIs without an upload URL) as an image."""
    header, _, payload = uri.partition(",")
    assert header.startswith("data:image/"), header
    image = Image.open(io.BytesIO(base64.b64decode(payload)))
    image.load()
    return image
