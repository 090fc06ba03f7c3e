"""Downloads dial the address that was checked (#14.2), keep TLS name checks, and their progress never
reads like denoising progress (#12). Everything listens on loopback; names are played by a stub resolver.
"""

from __future__ import annotations

import io
import logging
import re
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fakes import FakeServer
from tqdm import tqdm

from flux_lora.errors import BlockedUrlError, WeightsUnreachable
from flux_lora.weights.download_progress import PREDICTION_PROGRESS, Progress
from flux_lora.weights.http import Downloader, DownloadPolicy, Target

PAYLOAD = b"weights" * 1000
_real_getaddrinfo = socket.getaddrinfo


class Resolver:
    """Answers names from a script: each lookup of a name takes its next answer (the last one repeats)."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.lookups: list[str] = []

    def __call__(self, host, port, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN204 - socket's own signature
        name = host.decode() if isinstance(host, bytes) else host
        if name not in self.answers:
            return _real_getaddrinfo(host, port, *args, **kwargs)
        self.lookups.append(name)
        script = self.answers[name]
        address = script.pop(0) if len(script) > 1 else script[0]
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, int(port)))]


class _Counting(BaseHTTPRequestHandler):
    hits: list[str]
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802
        self.hits.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        self.wfile.write(PAYLOAD)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


def _serve(address: tuple[str, int], context: ssl.SSLContext | None = None) -> tuple[ThreadingHTTPServer, list[str]]:
    hits: list[str] = []
    httpd = ThreadingHTTPServer(address, type("Handler", (_Counting,), {"hits": hits}))
    if context is not None:
        httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    return httpd, hits


def _policy(**kwargs: object) -> DownloadPolicy:
    return DownloadPolicy(**{"retries": 0, "timeout": 5.0, **kwargs})  # type: ignore[arg-type]


@pytest.fixture
def good() -> Iterator[FakeServer]:
    with FakeServer() as fake:
        fake.add_file("/lora.safetensors", PAYLOAD)
        yield fake


def test_a_name_that_answers_differently_on_the_second_lookup_is_dialled_at_the_checked_address(
        good: FakeServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    port = int(good.url.rsplit(":", 1)[1])
    try:
        evil, evil_hits = _serve(("127.0.0.2", port))  # the same port on another loopback address
    except OSError:
        pytest.skip("127.0.0.2 is not usable here")
    try:
        resolver = Resolver({"rebind.test": ["127.0.0.1", "127.0.0.2"]})
        monkeypatch.setattr(socket, "getaddrinfo", resolver)
        policy = _policy(allow_hosts=frozenset({f"rebind.test:{port}"}))
        url = f"http://rebind.test:{port}/lora.safetensors"
        Downloader(policy).download(Target(url, "lora"), tmp_path / "lora")
        assert (tmp_path / "lora").read_bytes() == PAYLOAD
        assert resolver.lookups == ["rebind.test"], "resolved once, for the check; the connection is pinned"
        assert evil_hits == [] and good.count("GET", "/lora.safetensors") == 1
        # The redirect target is another port: not the allowed host:port, so refused, unvisited.
        resolver.answers["rebind.test"] = ["127.0.0.1"]
        good.add_redirect("/hop", f"http://rebind.test:{port + 1}/lora.safetensors")
        downloader = Downloader(policy)
        with pytest.raises(BlockedUrlError, match="non-public address"):
            downloader.download(Target(f"http://rebind.test:{port}/hop", "lora"), tmp_path / "hop")
        assert evil_hits == []
    finally:
        evil.shutdown()
        evil.server_close()


@pytest.fixture
def tls(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """An HTTPS server on 127.0.0.1 whose certificate names only `rebind.test`; (port, CA bundle)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key_path), "-out", str(cert_path), "-days", "1",
                    "-subj", "/CN=rebind.test", "-addext", "subjectAltName=DNS:rebind.test"],
                   check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    httpd, _ = _serve(("127.0.0.1", 0), context)
    yield httpd.server_address[1], cert_path
    httpd.shutdown()
    httpd.server_close()


def test_tls_still_checks_the_name_while_dialling_the_pinned_address(
        tls: tuple[int, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    port, ca = tls
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca))
    monkeypatch.setattr(socket, "getaddrinfo", Resolver({"rebind.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]}))
    hosts = frozenset({f"rebind.test:{port}", f"other.test:{port}"})
    downloader = Downloader(_policy(allow_hosts=hosts))
    downloader.download(Target(f"https://rebind.test:{port}/f", "lora"), tmp_path / "ok")
    assert (tmp_path / "ok").read_bytes() == PAYLOAD  # SNI and the certificate check used the name
    with pytest.raises(WeightsUnreachable, match="TLS error"):  # same address, a name the certificate lacks
        downloader.download(Target(f"https://other.test:{port}/f", "lora"), tmp_path / "bad")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _lines(text: str) -> list[str]:
    return [line for line in re.split(r"[\r\n]+", text) if line.strip()]


def test_download_progress_never_reads_as_denoising_progress(caplog: pytest.LogCaptureFixture) -> None:
    pattern = re.compile(PREDICTION_PROGRESS)
    default = _Terminal()
    with tqdm(total=27, file=default, mininterval=0) as bar:  # what the pattern is for: tqdm's own bar
        bar.update(12)
    assert any(pattern.match(line) for line in _lines(default.getvalue()))

    terminal = _Terminal()
    progress = Progress("lora.safetensors", 64 * 1024**2, stream=terminal)
    assert progress.bar is not None
    progress.bar.mininterval = 0
    for _ in range(64):
        progress.add(1024**2)
    progress.done()
    shown = _lines(terminal.getvalue())
    assert any("%" in line for line in shown), shown
    assert not [line for line in shown if pattern.match(line)], shown

    with caplog.at_level(logging.INFO, logger="flux_lora"):
        logged = Progress("lora.safetensors", 64 * 1024**2, every=0, stream=io.StringIO())
        assert logged.bar is None, "not a terminal: log lines"
        for _ in range(64):
            logged.add(1024**2)
        logged.done()
    messages = [r.getMessage() for r in caplog.records]
    assert any("%" in m for m in messages), messages
    assert not [m for m in messages if pattern.match(m)], messages


def test_a_client_that_hangs_up_leaves_the_loopback_server_quiet(capfd: pytest.CaptureFixture[str]) -> None:
    """scripts/soak.py serves its files with tests/fakes.py: a client that resets its connection (as one that
    gives up does) is no error to print, whether mid-answer or with the answer read, between two requests."""
    def serving() -> int:  # threads answering a connection, this server's or a stalled one's of another test
        return sum("process_request_thread" in t.name for t in threading.enumerate())

    before = serving()
    with FakeServer() as fake:
        port = int(fake.url.rsplit(":", 1)[1])
        fake.add_file("/small.bin", b"x" * 1000)
        fake.add_file("/big.bin", b"x" * (4 << 20))
        for path, read in (("/small.bin", 1000), ("/big.bin", 0)):
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(f"GET {path} HTTP/1.1\r\nHost: loopback\r\n\r\n".encode())
                answer = b""
                while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < read:
                    answer += sock.recv(65536)
                fake.state.chunk_delay = 0.01  # the big file is still going out when the client goes
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
        deadline = time.monotonic() + 10
        while serving() > before:  # until the server has noticed both resets
            assert time.monotonic() < deadline, "the server never noticed the resets"
            time.sleep(0.02)
    assert "Traceback" not in capfd.readouterr().err
