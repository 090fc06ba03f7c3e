"""Which plain transformers live on the GPU: one bf16 slot, the other model parked in pinned host memory.

dev and schnell in bf16 (23.8 GB each) plus both fp8 copies (11.9 GB each) and the shared text
encoders/VAE (~10 GB) do not fit one 80 GB GPU together (docs/memory-plan.md). The fp8 transformers
and the shared components stay resident; the bf16 transformers share one slot. At setup each plain
transformer's base weights are packed into ONE host buffer of their exact total size, pinned by
registering it with CUDA (`tensor.pin_memory()` goes through torch's caching host allocator, which
rounds every block up to a power of two: ~37 GB pinned for a 23.8 GB transformer). Parking is then
free (each weight's `.data` becomes its view into the buffer, the GPU tensor is dropped) and loading is
one host-to-device copy (~1 s for 23.8 GB over PCIe 5). Invariant this relies on: nothing writes the
plain weights in place (LoRAs stay unfused peft layers, moved along with their module).

A GPU that holds everything (an H200, 141 GB: about 85 GB resident) needs no slot: `fits_without_swap`
decides. Where CUDA refuses to pin the buffer, it stays pageable (slower switches, logged), never a failure.
"""

from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from flux_lora import log_setup_stage

log = logging.getLogger(__name__)

ALIGN = 256  # bytes: every packed weight starts on a 256-byte boundary (any dtype's view, fast DMA)
# Beside the weights: two rank-64 LoRA slots per compiled transformer (2.8 GB), the safety checkers (0.8 GB),
# a 4-image 1440x1440 batch's activations (up to ~8 GB), the CUDA context, cuBLAS and compiled kernels' workspaces.
HEADROOM_BYTES = 24 * 2**30


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers, wherever they are (meta included)."""
    return sum(t.nbytes for t in (*module.parameters(), *module.buffers()))


def fits_without_swap(plain_bytes: int, shared_bytes: int, device_bytes: int) -> bool:
    """Whether the plain transformers (`plain_bytes` together), their fp8 copies (half that), the shared
    components and `HEADROOM_BYTES` all fit the device at once: then no transformer is parked on the host.
    FLUX.1 in bf16: 47.6 + 23.8 + 9.9 GB, so yes on an H200 (141 GB), no on an 80 GB H100."""
    return plain_bytes * 3 // 2 + shared_bytes + HEADROOM_BYTES <= device_bytes


def pin(buffer: torch.Tensor) -> bool:
    """Page-lock exactly `buffer`'s bytes with CUDA (unpinned when the buffer goes). False, logged, where CUDA
    refuses (a locked-memory limit, say): the buffer then stays pageable, so switches copy more slowly."""
    try:
        torch.cuda.check_error(torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.nbytes, 0))
    except RuntimeError as exc:  # torch.cuda.CudaError is one
        log.warning("Pinning %.2f GB of host memory failed (%s): it stays pageable", buffer.nbytes / 1e9, exc)
        return False
    # Unregister when the buffer goes; at exit the process's memory goes anyway.
    weakref.finalize(buffer, _unregister, buffer.data_ptr()).atexit = False
    return True


@dataclass
class HostCopy:
    """One model's packed base weights: the buffer and, per weight key, its view into the buffer."""

    buffer: torch.Tensor  # uint8, exactly the sum of the aligned weight sizes
    views: dict[str, torch.Tensor]


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def _unregister(pointer: int) -> None:
    torch.cuda.check_error(torch.cuda.cudart().cudaHostUnregister(pointer))


class Residency:
    """One GPU slot shared by the plain transformers; `ensure(name)` makes `name` the resident one."""

    def __init__(self, device: torch.device, modules: dict[str, nn.Module], resident: str) -> None:
        self.device = device
        self.modules = modules
        self.resident: str | None = None
        self.switches = 0
        self._host: dict[str, HostCopy] = {}
        # Every model is packed and parked here, the resident one too (then loaded back: ~1 s), so no
        # prediction ever copies base weights to host. The resident one goes last: a model loaded on
        # the host is dropped for its views as soon as it is parked, so the host holds at most two.
        for name in sorted(modules, key=lambda n: n == resident):
            self._host[name] = self._pack(modules[name])
            self.park(name)
        self.ensure(resident)

    def _tensors(self, module: nn.Module) -> list[tuple[str, torch.Tensor]]:
        # peft renames a wrapped layer's weights `x.weight` -> `x.base_layer.weight` (and keeps the
        # wrapper after its adapters are deleted): one key per base weight whatever LoRA did to it.
        return [
            (key.replace(".base_layer.", "."), tensor)
            for key, tensor in (*module.named_parameters(), *module.named_buffers())
        ]

    def _pack(self, module: nn.Module) -> HostCopy:
        """Copy `module`'s base weights into one exact-size host buffer, pinned on CUDA; LoRAs excluded."""
        weights = {key: tensor.data for key, tensor in self._tensors(module) if "lora_" not in key}
        offsets, total = {}, 0
        for key, data in weights.items():
            offsets[key] = total
            total += _aligned(data.nbytes)
        began = time.perf_counter()
        buffer = torch.empty(total, dtype=torch.uint8)
        # Registering pins exactly these bytes; pin_memory() would round up to a power of two.
        pinned = self.device.type == "cuda" and total > 0 and pin(buffer)
        views = {}
        for key, data in weights.items():
            start = offsets[key]
            view = buffer[start : start + data.nbytes].view(data.dtype).view(data.shape)
            views[key] = view.copy_(data)
        kind = "pinned" if pinned else "pageable"
        log.info("Packed %d weights into %.2f GB of %s host memory", len(views), total / 1e9, kind)
        log_setup_stage("pin", time.perf_counter() - began, f"({total / 1e9:.1f} GB {kind})")
        return HostCopy(buffer, views)

    def park(self, name: str) -> None:
        """Move `name` to host memory: base weights become views into its packed buffer (no copy)."""
        views = self._host[name].views
        for key, tensor in self._tensors(self.modules[name]):
            # LoRA adapters (never packed: they change on every switch) are moved, not cached.
            tensor.data = views[key] if key in views else tensor.data.to("cpu")
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
