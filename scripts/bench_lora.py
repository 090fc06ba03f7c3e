"""LoRA switching cost: LoraManager against plain diffusers load_lora_weights/unload_lora_weights.

CPU: the tiny store (built in a temp dir). GPU (--real, or automatically when CUDA is present): a
randomly initialised full-size FLUX.1 transformer (same shapes, no downloads) with rank-16 LoRAs on
the attention and MLP layers. Prints one table; every row is the median of --repeats runs.

    python scripts/bench_lora.py [--real] [--rank 16] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import lora_samples as S  # noqa: E402

from flux_lora.lora.adapters import LoraManager, Wanted  # noqa: E402


def median_time(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build(real: bool, device: torch.device, dtype: torch.dtype, workdir: Path):
    """A FluxPipeline-like holder with one transformer (and CLIP for the tiny store)."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    if real:
        with torch.device(device):
            transformer = FluxTransformer2DModel(guidance_embeds=True).to(dtype)  # FLUX.1-dev shapes
        pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                            tokenizer_2=None, transformer=transformer)
        return pipe
    from flux_lora.generation.tiny import make_tiny_store

    store = make_tiny_store(workdir / "store")
    return FluxPipeline.from_pretrained(store / "FLUX.1-dev", dtype=dtype).to(device)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", action="store_true", help="full-size random FLUX transformer (default on CUDA)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # the baseline's per-load warnings would bury the table
    cuda = torch.cuda.is_available()
    real = args.real or cuda
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        pipe = build(real, device, dtype, workdir)
        tr = pipe.transformer
        files = {}
        for name, seed in (("a", 1), ("b", 2), ("c", 3)):
            lora = S.random_lora(tr, seed, rank=args.rank, only=("attn", "mlp", "linear"))
            files[name] = S.save({k: v.to(torch.bfloat16) for k, v in S.as_peft(lora, tr).items()},
                                 workdir / f"{name}.safetensors")
        size_mb = files["a"].stat().st_size / 1e6

        # Baseline: what a plain diffusers server does per request.
        names = iter(["a", "b"] * (args.repeats + 2))

        def plain_switch() -> None:
            pipe.unload_lora_weights()
            pipe.load_lora_weights(str(files[next(names)]), adapter_name="main")

        def plain_extra() -> None:
            pipe.unload_lora_weights()
            pipe.load_lora_weights(str(files["a"]), adapter_name="main")
            pipe.load_lora_weights(str(files["c"]), adapter_name="extra")
            pipe.set_adapters(["main", "extra"], [1.0, 0.7])

        baseline = [median_time(plain_switch, args.repeats, sync), median_time(plain_extra, args.repeats, sync)]
        baseline += [baseline[0], baseline[0]]  # a plain server reloads on every request
        pipe.unload_lora_weights()  # the manager gets the transformer as the baseline got it

        manager = LoraManager({"dev": tr}, pipe.text_encoder)

        def use(main: str | None, extra: str | None = None, scale: float = 1.0) -> None:
            wanted = [Wanted(field, files[name], s, name) for field, name, s in (("main", main, scale),
                                                                                  ("extra", extra, 0.7)) if name]
            manager.apply("dev", wanted)

        use("a"), use("b"), use("c")  # warm: every file read and converted once (the in-memory LRU)
        flip = iter(["a", "b"] * (args.repeats + 2))
        rows = [("switch main LoRA (memory hit)", median_time(lambda: use(next(flip)), args.repeats, sync))]
        use("a")
        toggle = iter([("a", "c"), ("a", None)] * (args.repeats + 2))
        rows.append(("add/remove extra LoRA", median_time(lambda: use(*next(toggle)), args.repeats, sync)))
        scales = iter([0.5, 1.0] * (args.repeats + 2))
        rows.append(("scale-only change", median_time(lambda: use("a", None, next(scales)), args.repeats, sync)))
        rows.append(("same request again", median_time(lambda: use("a", None, 1.0), args.repeats, sync)))
    where = "real-shape random FLUX.1-dev" if real else "tiny store"
    print(f"\nLoRA switching, {where} on {device} ({dtype}), rank {args.rank} peft files of {size_mb:.1f} MB, "
          f"median of {args.repeats}")
    print(f"{'operation':34} {'LoraManager':>12} {'plain diffusers':>16} {'speed-up':>9}")
    for (label, ours), theirs in zip(rows, baseline, strict=True):
        print(f"{label:34} {ours * 1e3:10.1f}ms {theirs * 1e3:14.1f}ms {theirs / max(ours, 1e-9):8.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
