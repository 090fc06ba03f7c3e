"""Soak: a bounded mix of good and bad requests against the real cog server, and what it leaves behind.

Starts `flux-lora serve` (hot-swap variant) on loopback over the tiny store, serves a few LoRA files
from a loopback HTTP server, then sends `--requests` predictions one after another, each only after
the previous answer arrived, as a polite client would: txt2img/img2img/inpaint, dev and schnell,
go_fast on and off, 1-4 outputs, every format, LoRA and extra-LoRA changes, inputs the schema
refuses (422), inputs the rules refuse (a failed prediction naming the field) and cancellations.

Prints unexpected outcomes, latency percentiles of the successful synchronous predictions, the
server's resident memory (coglet and its worker) at start, after the warm-up and at the end, and the
temporary files left behind. Exit status 1 when a target is missed: an unexpected outcome, leftover
files, or resident memory at the end more than 10% above what it was after the warm-up.

    python scripts/soak.py [--requests 200] [--warmup 20] [--seed 0]
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import requests
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import lora_samples as S  # noqa: E402
from fakes import FakeServer  # noqa: E402

ASPECT_RATIOS = ["1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21"]


@dataclass
class Case:
    """One request of the mix and the outcome it must have."""

    kind: str
    inputs: dict[str, object]
    expect: str  # "succeeded", "failed:<field>", "422", "canceled"


def _data_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _loras(store: Path, fake: FakeServer, count: int) -> list[str]:
    """`count` random kohya-format LoRAs of the tiny model, as loopback URLs."""
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(store / "FLUX.1-dev", subfolder="transformer")
    urls = []
    for i in range(count):
        only = [None, ("attn",), ("mlp",), ("single_blocks",)][i % 4]
        lora = S.random_lora(transformer, seed=100 + i, rank=2 + 2 * (i % 4), only=only)
        with tempfile.TemporaryDirectory() as tmp:
            data = S.save(S.as_kohya(lora), Path(tmp) / "l.safetensors").read_bytes()
        urls.append(fake.add_file(f"/loras/soak-{i}.safetensors", data))
    return urls


def mix(count: int, rng: random.Random, loras: list[str], bad_lora: str, not_lora: str) -> list[Case]:
    """A deterministic mix: mostly valid predictions, about a fifth refused, a few cancellations."""
    image = _data_uri(Image.new("RGB", (200, 150), (120, 60, 200)))
    mask = Image.new("L", (200, 150), 0)
    mask.paste(255, (100, 0, 200, 150))
    mask_uri = _data_uri(mask)
    cases: list[Case] = []
    for _ in range(count):
        roll = rng.random()
        base: dict[str, object] = {
            "prompt": rng.choice(["a cat", "a photo of TOK", "", "a red bicycle on a beach"]),
            "num_inference_steps": rng.randint(2, 4),
            "model": rng.choice(["dev", "schnell"]),
            "go_fast": rng.random() < 0.5,
            "megapixels": "0.25",
            "aspect_ratio": rng.choice(ASPECT_RATIOS),
            "num_outputs": rng.randint(1, 4),
            "output_format": rng.choice(["webp", "jpg", "png"]),
            "seed": rng.choice([rng.randint(0, 2**31 - 1), -1]) if rng.random() < 0.8 else rng.randint(0, 9),
            "disable_safety_checker": rng.random() < 0.3,
        }
        if rng.random() < 0.6:
            base["replicate_weights"] = rng.choice(loras)
            base["lora_scale"] = rng.choice([0.5, 1.0, -1.0, 2.0])
        if rng.random() < 0.25:
            base["extra_lora"] = rng.choice(loras)
            base["extra_lora_scale"] = rng.choice([0.5, 1.0])
        if roll < 0.55:
            cases.append(Case("txt2img", base, "succeeded"))
        elif roll < 0.65:
            cases.append(Case("img2img", {**base, "image": image, "prompt_strength": 0.7}, "succeeded"))
        elif roll < 0.75:
            cases.append(Case("inpaint", {**base, "image": image, "mask": mask_uri}, "succeeded"))
        elif roll < 0.80:
            bad = rng.choice([{"num_outputs": 9}, {"aspect_ratio": "7:5"}, {"guidance_scale": 11},
                              {"output_format": "gif"}, {"seed": "x"}])
            cases.append(Case("schema-refused", {**base, **bad}, "422"))
        elif roll < 0.85:
            custom = {**base, "aspect_ratio": "custom", "height": 512}
            cases.append(Case("custom-without-width", custom, "failed:width"))
        elif roll < 0.89:
            cases.append(Case("missing-lora", {**base, "replicate_weights": bad_lora}, "failed:replicate_weights"))
        elif roll < 0.92:
            cases.append(Case("not-a-lora", {**base, "extra_lora": not_lora}, "failed:extra_lora"))
        elif roll < 0.95:
            cases.append(Case("not-an-image", {**base, "image": "data:image/png;base64,aGVsbG8="}, "failed:image"))
        else:
            slow = {**base, "num_inference_steps": 40, "aspect_ratio": "1:1", "megapixels": "1", "num_outputs": 4}
            cases.append(Case("cancel", slow, "canceled"))
    return cases


def process_rss(pid: int) -> int:
    """Resident bytes of `pid` and all its descendants (coglet runs predictions in a child process)."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
            for task in Path(f"/proc/{current}/task").iterdir():
                children = (task / "children").read_text().split()
                todo.extend(int(c) for c in children)
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def leftovers(tmp: Path, cache: Path) -> tuple[list[Path], int]:
    """Files the server left in its temporary directory and the LoRA cache's staging area, apart from the
    newest KEEP_OUTPUTS prediction directories it keeps on purpose (cog may still be reading them);
    and how many files those hold."""
    from flux_lora.generation.outputs import PREFIX
    from flux_lora.service import KEEP_OUTPUTS

    predictions = sorted(tmp.rglob(PREFIX + "*"), key=lambda p: p.stat().st_mtime_ns)
    kept = {p for p in predictions[-KEEP_OUTPUTS:] if p.is_dir()}
    found = [p for p in tmp.rglob("*") if p.is_file() and p.parent not in kept]
    found += [p for p in (cache / "tmp").rglob("*") if p.is_file()]
    return found, sum(1 for d in kept for p in d.iterdir())


class Client:
    """A polite client: each request is sent after the previous answer arrived; 409s are not retried."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.session = requests.Session()

    def run(self, case: Case) -> tuple[str, float, str]:
        """(outcome, seconds, detail) of one case."""
        start = time.perf_counter()
        if case.expect == "canceled":
            return self._cancel(case, start)
        response = self.session.post(f"{self.url}/predictions", json={"input": case.inputs}, timeout=600)
        seconds = time.perf_counter() - start
        if response.status_code != 200:
            return str(response.status_code), seconds, response.text[:300]
        body = response.json()
        status = body.get("status")
        if status == "failed":
            return "failed", seconds, str(body.get("error"))[:300]
        if status == "succeeded" and len(body.get("output") or []) == 0:
            return "empty", seconds, "no outputs"
        return str(status), seconds, ""

    def _cancel(self, case: Case, start: float) -> tuple[str, float, str]:
        response = self.session.post(f"{self.url}/predictions", json={"input": case.inputs},
                                     headers={"Prefer": "respond-async"}, timeout=60)
        if response.status_code not in (200, 202):
            return str(response.status_code), time.perf_counter() - start, response.text[:300]
        prediction_id = response.json()["id"]
        time.sleep(0.3)
        self.session.post(f"{self.url}/predictions/{prediction_id}/cancel", timeout=60)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            body = self.session.get(f"{self.url}/health-check", timeout=10).json()
            if body.get("status") == "READY":
                break
            time.sleep(0.1)
        return "canceled", time.perf_counter() - start, ""


def outcome_ok(case: Case, outcome: str, detail: str) -> bool:
    if case.expect.startswith("failed:"):
        field = case.expect.split(":", 1)[1]
        return outcome == "failed" and field in detail and "Traceback" not in detail
    if case.expect == "canceled":
        return outcome == "canceled"
    return outcome == case.expect


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20, help="requests before the reference memory reading")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loras", type=int, default=6)
    parser.add_argument("--store", type=Path, help="a store to use (default: a tiny one in a temp dir)")
    args = parser.parse_args()

    from flux_lora.generation.tiny import make_tiny_store
    from flux_lora.serving.server import wait_ready

    work = Path(tempfile.mkdtemp(prefix="flux-soak-"))
    store = args.store or make_tiny_store(work / "store")
    server_tmp, cache = work / "server-tmp", work / "lora-cache"
    server_tmp.mkdir()
    rng = random.Random(args.seed)
    with FakeServer() as fake:
        loras = _loras(store, fake, args.loras)
        not_lora = fake.add_file("/loras/not-a-lora.safetensors", b"\x00" * 64)
        cases = mix(args.requests, rng, loras, fake.url + "/loras/missing.safetensors", not_lora)
        port = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("COG_", "FLUX_LORA_"))}
        env.update(FLUX_LORA_WEIGHTS=str(store), FLUX_LORA_CACHE=str(cache), FLUX_LORA_ALLOW_PRIVATE_URLS="1",
                   TMPDIR=str(server_tmp))
        log = work / "server.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "flux_lora", "serve", "--predictor", "hotswap", "--port", str(port)],
            cwd=work, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            if not wait_ready(url, proc):
                sys.exit(f"server not ready:\n{log.read_text()[-3000:]}")
            rss = {"start": process_rss(proc.pid)}
            results = run_cases(Client(url), cases, args.warmup, lambda: process_rss(proc.pid), rss)
            rss["end"] = process_rss(proc.pid)
            left, kept = leftovers(server_tmp, cache)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    return report(cases, results, rss, left, kept, work)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cases(client: Client, cases: list[Case], warmup: int, rss_now: Callable[[], int],
              rss: dict[str, int]) -> list[tuple[str, float, str]]:
    results = []
    for i, case in enumerate(cases, 1):
        results.append(client.run(case))
        if i == warmup:
            rss["after warm-up"] = rss_now()
        if i % 25 == 0:
            print(f"  {i}/{len(cases)} requests, server resident {rss_now() / 2**20:.0f} MiB", file=sys.stderr)
    rss.setdefault("after warm-up", rss_now())
    return results


def report(cases: list[Case], results: list[tuple[str, float, str]], rss: dict[str, int], left: list[Path],
           kept: int, work: Path) -> int:
    kinds = Counter(c.kind for c in cases)
    unexpected = [(c, r) for c, r in zip(cases, results, strict=True) if not outcome_ok(c, r[0], r[2])]
    latencies = [r[1] for c, r in zip(cases, results, strict=True) if c.expect == "succeeded" and r[0] == "succeeded"]
    print(f"\n## Soak: {len(cases)} requests ({', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))})\n")
    print(f"unexpected outcomes: {len(unexpected)}")
    for case, (outcome, _seconds, detail) in unexpected[:20]:
        print(f"  - {case.kind}: expected {case.expect}, got {outcome}: {detail[:200]}")
    if latencies:
        print("\n| successful predictions | p50 | p90 | p99 | max | mean |")
        print("|---|---:|---:|---:|---:|---:|")
        cells = [percentile(latencies, q) for q in (0.5, 0.9, 0.99)] + [max(latencies), statistics.mean(latencies)]
        print(f"| {len(latencies)} | " + " | ".join(f"{s:.2f} s" for s in cells) + " |")
    growth = rss["end"] / rss["after warm-up"] - 1
    print("\n| server resident memory | MiB |")
    print("|---|---:|")
    for name, value in rss.items():
        print(f"| {name} | {value / 2**20:.0f} |")
    print(f"\nresident memory end vs after warm-up: {growth:+.1%} (target within 10%)")
    print(f"leftover temporary files: {len(left)} (plus {kept} in the newest prediction directories, kept on purpose)")
    for path in left[:10]:
        print(f"  - {path.relative_to(work)}")
    ok = not unexpected and not left and growth <= 0.10
    print("\nPASS" if ok else "\nFAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
