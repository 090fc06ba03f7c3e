"""Cold-start breakdown of setup on the tiny store: imports, store verification, pipeline loading.

    python scripts/bench_setup.py [--store DIR] [--repeat 3]

Builds the tiny store in a temporary folder unless --store names one (a real store works too, on a
GPU machine). Prints one row per stage, best of --repeat for the repeatable stages.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def timed(fn, repeat: int = 1) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=None)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    rows: list[tuple[str, float]] = []
    t, _ = timed(lambda: __import__("torch"))
    rows.append(("import torch", t))
    t, _ = timed(lambda: __import__("diffusers").FluxPipeline)
    rows.append(("import diffusers FluxPipeline", t))

    from flux_lora.generation.pipelines import load_pipelines, pick_device
    from flux_lora.weights.store import MODELS, ensure_store, model_problems

    with tempfile.TemporaryDirectory() as tmp:
        store = args.store
        if store is None:
            from flux_lora.generation.tiny import make_tiny_store

            t, store = timed(lambda: make_tiny_store(Path(tmp) / "store"))
            rows.append(("make_tiny_store (not part of setup)", t))
        safety = all(not model_problems(store, MODELS[k]) for k in ("safety-checker", "falcon-nsfw"))
        t, _ = timed(lambda: ensure_store(store, safety=safety, offline=True), args.repeat)
        rows.append((f"ensure_store verify (safety={safety})", t))
        device, dtype = pick_device()
        t, pipes = timed(lambda: load_pipelines(store, device, dtype), args.repeat)
        rows.append((f"load_pipelines on {device} {str(dtype).removeprefix('torch.')}", t))

    width = max(len(name) for name, _ in rows)
    print(f"{'stage':<{width}}  seconds")
    for name, seconds in rows:
        print(f"{name:<{width}}  {seconds:7.3f}")


if __name__ == "__main__":
    main()
