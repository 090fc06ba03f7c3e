"""What the reserved LoRA slots of a compiled go_fast transformer cost, at the real FLUX.1 widths.

A compiled transformer holds two zero-filled adapters (main, extra) of the reserved rank on every linear
from setup on (flux_lora/lora/adapters.py), so their matmuls run on every step whatever LoRA is loaded. This
times one real-shape double block and one single block (3072 wide; on an H100 fp8 as go_fast runs
there, on a CPU in float32, as fp8 weight-only on a CPU dequantizes every weight on every call and would
hide the adapters' cost) with both slots at each rank against the same blocks without adapters, in the
same run, and prints the ratio. FLUX.1 has 19 double and 38 single blocks: a step costs about
19 x double + 38 x single.

    python scripts/bench_slots.py                    # CPU: 256 image tokens, float32
    python scripts/bench_slots.py --device cuda      # 4096 image tokens (1024x1024), bf16
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock
from peft import LoraConfig, inject_adapter_in_model

from flux_lora.generation import fast

DIM, HEADS, HEAD_DIM = 3072, 24, 128


def timed(fn, device: torch.device, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def with_slots(block: torch.nn.Module, rank: int) -> torch.nn.Module:
    """A copy of `block` with both slots at `rank` on every linear, zero-filled, both active."""
    block = copy.deepcopy(block)
    targets = [name for name, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
    for slot in ("main", "extra"):
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets), block, adapter_name=slot)
    for module in block.modules():
        if hasattr(module, "lora_A"):
            module.set_adapter(["main", "extra"], inference_mode=True)
            for slot in ("main", "extra"):
                torch.nn.init.zeros_(module.lora_A[slot].weight)
                torch.nn.init.zeros_(module.lora_B[slot].weight)
    return block


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ranks", default="16,32,64,128")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="TorchaoLoraLinear|Already found a `peft_config`")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokens, text = (4096, 512) if device.type == "cuda" else (256, 64)
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    mode = fast.fp8_mode(device) if device.type == "cuda" else fast.Fp8Mode.NONE
    blocks = {
        "double": FluxTransformerBlock(DIM, HEADS, HEAD_DIM),
        "single": FluxSingleTransformerBlock(DIM, HEADS, HEAD_DIM),
    }
    for block in blocks.values():
        block.to(device, dtype).eval()
    # The same quantization go_fast applies (its block filter), on a stand-in holding one block of each kind.
    holder = torch.nn.Module()
    holder.transformer_blocks = torch.nn.ModuleList([blocks["double"]])
    holder.single_transformer_blocks = torch.nn.ModuleList([blocks["single"]])
    if mode is not fast.Fp8Mode.NONE:
        fast.quantize_transformer(holder, mode)
    x = torch.randn(1, tokens, DIM, device=device, dtype=dtype)
    ctx = torch.randn(1, text, DIM, device=device, dtype=dtype)
    temb = torch.randn(1, DIM, device=device, dtype=dtype)
    rope_dim = tokens + text
    rope = (torch.ones(rope_dim, HEAD_DIM, device=device, dtype=dtype),
            torch.zeros(rope_dim, HEAD_DIM, device=device, dtype=dtype))

    def step(modules: dict[str, torch.nn.Module]) -> float:
        seconds = {
            name: timed(lambda m=m: m(x, ctx, temb, image_rotary_emb=rope), device, args.repeats)
            for name, m in modules.items()
        }
        return 19 * seconds["double"] + 38 * seconds["single"]

    print(f"reserved LoRA slots, real FLUX.1 widths, {device} {str(dtype)[6:]}, {mode.value}, {tokens} image "
          f"tokens, median of {args.repeats}; a step = 19 double + 38 single blocks")
    base = step(blocks)
    print("| slots (main + extra) | one step (s) | vs no adapters |\n|---|---:|---:|")
    print(f"| none | {base:.3f} | 1.000x |")
    for rank in (int(r) for r in args.ranks.split(",")):
        got = step({name: with_slots(block, rank) for name, block in blocks.items()})
        print(f"| rank {rank} | {got:.3f} | {got / base:.3f}x |")


if __name__ == "__main__":
    main()
