"""`image` and `mask` URLs go through the same guard as LoRA downloads, in the real cog server (#14.1).

The server allows one loopback host:port (`FLUX_LORA_ALLOW_PRIVATE_URLS=127.0.0.1:PORT`, the "allowed"
fake); everything else on loopback, the "victim" fake, must be refused before any connection, whatever
the spelling of its address, and after a redirect from the allowed one.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from pathlib import Path

import coglet
import pytest
from conftest import CogServer, data_uri, decode_output, server_env
from fakes import FakeServer
from PIL import Image

FAST = {"num_inference_steps": 2, "megapixels": "0.25"}


def png(size: tuple[int, int], color: object = (200, 30, 30), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")  # type: ignore[arg-type]
    return buf.getvalue()


@pytest.fixture(scope="module")
def allowed() -> Iterator[FakeServer]:
    with FakeServer() as fake:
        fake.add_file("/in.png", png((200, 120)))
        yield fake


@pytest.fixture(scope="module")
def victim() -> Iterator[FakeServer]:
    with FakeServer() as fake:
        fake.add_file("/x.png", png((64, 64)))
        yield fake


@pytest.fixture(scope="module")
def server(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory, allowed: FakeServer) -> Iterator[CogServer]:
    workdir = tmp_path_factory.mktemp("url-inputs")
    only = allowed.url.removeprefix("http://")
    cog = CogServer("hotswap", workdir, server_env(tiny_store, workdir, FLUX_LORA_ALLOW_PRIVATE_URLS=only))
    yield cog
    cog.stop()


def _error(response) -> str:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "failed", body
    assert "Traceback" not in body["error"]
    return body["error"]


def test_the_pinned_cog_fetches_path_inputs_through_the_guard() -> None:
    """The guard (flux_lora/weights/url_inputs.py) relies on how cog 0.23.1 fetches `cog.Path` URL inputs:
    coglet looks up `cog.types.Path.validate` for each value and calls `convert()` on each `URLPath`
    it gets back. Another cog must be read again before this test is updated."""
    import cog
    import cog.types

    import flux_lora.weights.url_inputs as guard

    assert (cog.__version__, coglet.__version__) == ("0.23.1", "0.23.1")
    binary = Path(coglet._impl.__file__).read_bytes()
    for name in (b"cog.types", b"URLPath", b"convert", b"validate"):
        assert name in binary, f"coglet no longer names {name!r}: read how it fetches URL inputs again"
    url = cog.types.Path.validate("https://example.com/a/in.png?sig=1")
    assert isinstance(url, guard.GuardedURLPath) and isinstance(url, cog.types.URLPath)
    assert str(url) == "https://example.com/a/in.png?sig=1" and url.filename == "in.png"
    inline = cog.types.Path.validate(data_uri(Image.new("RGB", (8, 8))))
    assert type(inline) is cog.types.URLPath, "data: URIs stay with cog (no network)"


def _refused_urls(victim: FakeServer, allowed: FakeServer) -> dict[str, str]:
    port = victim.url.rsplit(":", 1)[1]
    allowed.add_redirect("/hop.png", f"{victim.url}/x.png")
    return {
        "loopback": f"{victim.url}/x.png",
        "localhost": f"http://localhost:{port}/x.png",
        "ipv6": f"http://[::1]:{port}/x.png",
        "decimal": f"http://2130706433:{port}/x.png",
        "hex": f"http://0x7f.1:{port}/x.png",
        "short": f"http://127.1:{port}/x.png",
        "redirect": f"{allowed.url}/hop.png",
    }


@pytest.mark.slow
@pytest.mark.parametrize("field", ["image", "mask"])
@pytest.mark.parametrize("form", ["loopback", "localhost", "ipv6", "decimal", "hex", "short", "redirect"])
def test_private_image_and_mask_urls_are_refused_unfetched(server: CogServer, allowed: FakeServer,
                                                           victim: FakeServer, field: str, form: str) -> None:
    url = _refused_urls(victim, allowed)[form]
    inputs = {"image": url} if field == "image" else {"image": f"{allowed.url}/in.png", "mask": url}
    error = _error(server.predict(prompt="x", **inputs, **FAST))
    assert re.search(rf"\b{field}: http://", error), error
    assert "non-public address" in error and "FLUX_LORA_ALLOW_PRIVATE_URLS" in error, error
    assert victim.requests == [], "the refused host was contacted"
    assert "Input validation error" not in error, "refused by the guard, not by a failed cog download"


@pytest.mark.slow
def test_an_allowed_url_is_fetched_and_used(server: CogServer, allowed: FakeServer) -> None:
    before = allowed.count("GET", "/in.png")
    response = server.predict(prompt="x", image=f"{allowed.url}/in.png", output_format="png", **FAST)
    body = response.json()
    assert body["status"] == "succeeded", body.get("error")
    assert decode_output(body["output"][0]).size == (192, 112)  # follows the fetched 200x120 image
    assert allowed.count("GET", "/in.png") == before + 1


@pytest.mark.slow
def test_a_missing_image_is_named_and_the_server_keeps_serving(server: CogServer, allowed: FakeServer) -> None:
    error = _error(server.predict(prompt="x", image=f"{allowed.url}/missing.png?token=secret", **FAST))
    assert re.search(r"\bimage: http://127\.0\.0\.1:\d+/missing\.png\?…: not found \(HTTP 404\)", error), error
    assert "secret" not in error
    body = server.predict(prompt="x", **FAST).json()
    assert body["status"] == "succeeded", body.get("error")


@pytest.mark.slow
@pytest.mark.parametrize("field", ["image", "mask"])
@pytest.mark.parametrize(
    ("uri", "what"),
    [("data:image/png;base64,iVBORw0KG", "is not valid base64"), ("data:image/png;base64", "has no ','")],
)
def test_a_malformed_data_uri_is_named_in_one_line(server: CogServer, field: str, uri: str, what: str) -> None:
    inputs = {"image": uri} if field == "image" else {"image": data_uri(Image.new("RGB", (64, 64))), "mask": uri}
    error = _error(server.predict(prompt="x", **inputs, **FAST))
    assert re.search(rf"\b{field}: the data: URI {what}", error), error
    assert "\n" not in error and "Input validation error" not in error, error


@pytest.mark.slow
def test_local_paths_are_not_read(server: CogServer, tmp_path: Path) -> None:
    """cog hands a value that is not a URL to run() as it came: the server must not open its own files."""
    local = tmp_path / "secret.png"
    local.write_bytes(png((64, 64)))
    for value in (str(local), f"file://{local}"):
        error = _error(server.predict(prompt="x", image=value, **FAST))
        assert "image: must be a URL (http, https or data:)" in error, error
