"""Time the safety checkers per batch of 1024x1024 images and print a table.

Two paths per batch size: nothing flagged (SD checker only) and everything flagged (SD checker, then
Falcon on the whole batch) -- the cheapest and the dearest a prediction can pay.

    python scripts/bench_safety.py                 # tiny checkers, loaded from disk, on CPU
    python scripts/bench_safety.py --full-size     # random CLIP ViT-L/14 + ViT-B/16, the real shapes
    python scripts/bench_safety.py --device cuda   # fp16, as in production
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import CLIPConfig, ViTConfig

from flux_lora.generation.safety import (
    SafetyChecker,
    clip_processor,
    make_tiny_checkers,
    rigged_checkers,
    vit_processor,
)


def full_size(device: torch.device, dtype: torch.dtype, flag: str) -> SafetyChecker:
    """Random checkers with the shapes of CompVis/stable-diffusion-safety-checker and Falconsai's ViT."""
    torch.manual_seed(0)
    clip = CLIPConfig(
        vision_config={"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                       "num_attention_heads": 16, "image_size": 224, "patch_size": 14},
        projection_dim=768,
    )
    sd, falcon = rigged_checkers(clip, ViTConfig(image_size=224, patch_size=16), flag=flag, falcon="normal")
    return SafetyChecker(
        sd=sd.to(device, dtype), sd_processor=clip_processor(224),
        falcon=falcon.to(device, dtype), falcon_processor=vit_processor(224),
        device=device, dtype=dtype,
    )


def tiny(device: torch.device, dtype: torch.dtype, flag: str, root: Path) -> SafetyChecker:
    make_tiny_checkers(root / flag, flag=flag, falcon="normal")
    return SafetyChecker.load(root / flag, device, dtype)


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall time in ms, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def row(checker: SafetyChecker, images: list[Image.Image], *, flagged: bool, repeats: int) -> str:
    """One table row: each stage timed on its own, then filter() end to end."""
    device = checker.device
    pre = timed(lambda: checker._pixels(checker.sd_processor, images), device, repeats)
    sd = timed(lambda: checker.sd_flags(images), device, repeats)
    falcon = timed(lambda: checker.falcon_unsafe(images), device, repeats) if flagged else 0.0
    total = timed(lambda: checker.filter(images), device, repeats)
    n = len(images)
    return (f"{n:>5}  {'all' if flagged else 'none':>7}  {pre:>13.1f}  {sd:>8.1f}  {falcon:>12.1f}  "
            f"{total:>8.1f}  {total / n:>9.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--full-size", action="store_true", help="real-size random architectures")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    side = args.size
    batch = [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(4)]

    print(f"safety checkers, {'full-size random' if args.full_size else 'tiny'}, {device} {dtype}, "
          f"{side}x{side}, {torch.get_num_threads()} thread(s), median of {args.repeats} (ms)")
    print(f"{'batch':>5}  {'flagged':>7}  {'sd preprocess':>13}  {'sd total':>8}  {'falcon total':>12}  "
          f"{'filter()':>8}  {'per image':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for flag in ("never", "always"):
            checker = full_size(device, dtype, flag) if args.full_size else tiny(device, dtype, flag, Path(tmp))
            for n in (1, 4):
                print(row(checker, batch[:n], flagged=flag == "always", repeats=args.repeats))

if __name__ == "__main__":
    main()
