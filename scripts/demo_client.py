"""The demo's HTTP client: wait for the server, POST txt2img then img2img, save what comes back."""

from __future__ import annotations

import base64
import sys
import time
from pathlib import Path

import requests

from flux_lora.serving.server import wait_ready


def predict(url: str, out: Path, name: str, **inputs: object) -> list[Path]:
    start = time.perf_counter()
    body = requests.post(f"{url}/predictions", json={"input": inputs}, timeout=600).json()
    if body.get("status") != "succeeded":
        sys.exit(f"{name} failed: {body.get('error') or body}")
    paths = []
    for i, uri in enumerate(body["output"]):
        header, _, payload = uri.partition(",")
        ext = header.split("/")[1].split(";")[0]
        path = out / f"{name}-{i}.{ext}"
        path.write_bytes(base64.b64decode(payload))
        paths.append(path)
    print(f"{name}: {', '.join(map(str, paths))} ({time.perf_counter() - start:.1f}s)")
    for line in body.get("logs", "").splitlines():
        print(f"   {line}")
    return paths


def main(url: str, out_dir: str) -> None:
    out = Path(out_dir)
    if not wait_ready(url):
        sys.exit(f"server at {url} not ready (see outputs/server.log)")
    (first,) = predict(url, out, "txt2img", prompt="a photo of a red car on a city street", aspect_ratio="3:2",
                       megapixels="0.25", num_inference_steps=4, seed=42, output_format="png")
    image = "data:image/png;base64," + base64.b64encode(first.read_bytes()).decode()
    predict(url, out, "img2img", prompt="a painting of a blue car", image=image, prompt_strength=0.75,
            num_inference_steps=4, seed=42)


if __name__ == "__main__":
    main(*sys.argv[1:3])
