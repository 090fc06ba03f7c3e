"""Which plain transformers live on the GPU: one bf16 slot, the other model parked in pinned host memory.

dev and schnell in bf16 (23.8 GB each) plus both fp8 copies (11.9 GB each) and the shared text
encoders/VAE (~10 GB) do not fit one 80 GB GPU together (docs/memory-plan.md). The fp8 transformers
and the shared components stay resident; the bf16 transformers share one slot. Parking keeps a pinned
host copy of each weight, so evicting is free (the GPU tensor is dropped) and loading is one
host-to-device copy (~1 s for 23.8 GB over PCIe 5). Invariant this relies on: nothing writes the
plain weights in place (LoRAs stay unfused peft layers, moved along with their module).
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

log = logging.getLogger(__name__)


class Residency:
    """One GPU slot shared by the plain transformers; `ensure(name)` makes `name` the resident one."""

    def __init__(self, device: torch.device, modules: dict[str, nn.Module], resident: str) -> None:
        self.device = device
        self.modules = modules
        self.resident: str | None = None
        self._host: dict[str, dict[str, torch.Tensor]] = {name: {} for name in modules}
        self.switches = 0
        for name in modules:
            if name != resident:
                self.park(name)
        self.ensure(resident)

    def _tensors(self, module: nn.Module) -> list[tuple[str, torch.Tensor]]:
        # peft renames a wrapped layer's weights `x.weight` -> `x.base_layer.weight` (and keeps the
        # wrapper after its adapters are deleted): one key per base weight whatever LoRA did to it.
        return [
            (key.replace(".base_layer.", "."), tensor)
            for key, tensor in (*module.named_parameters(), *module.named_buffers())
        ]

    def park(self, name: str) -> None:
        """Move `name` to host memory; base weights reuse their pinned copy, so no copy is made twice."""
        host = self._host[name]
        for key, tensor in self._tensors(self.modules[name]):
            if "lora_" in key:  # adapters change on every switch: moved, never cached
                tensor.data = tensor.data.to("cpu")
                continue
            if key not in host:
                copy = tensor.data.to("cpu")
                host[key] = copy.pin_memory() if self.device.type == "cuda" else copy
            tensor.data = host[key]
        if self.resident == name:
            self.resident = None

    def ensure(self, name: str) -> float:
        """Make `name` the GPU-resident plain transformer; seconds spent (0 when it already was)."""
        if self.resident == name:
            return 0.0
        start = time.perf_counter()
        if self.resident is not None:
            self.park(self.resident)
        for _key, tensor in self._tensors(self.modules[name]):
            tensor.data = tensor.data.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.resident = name
        self.switches += 1
        seconds = time.perf_counter() - start
        log.info("Plain %s transformer moved onto %s in %.2fs", name, self.device, seconds)
        return seconds
