"""Adapter slots on the loaded transformers and the shared CLIP: load, hot-swap, pad, scale, keep in memory.

`LoraManager` takes local files and scales, nothing else: where a file came from (the weight cache)
and which request input named it (the service) are not its business. It keeps adapters resident per
component (the transformers, one shared CLIP): a request whose files did not change only sets scales;
converted state dicts stay in a bounded LRU so switching back costs no disk or conversion; with
`hotswap_rank` the transformers take new LoRAs by hot-swapping weights into padded adapters, so a
torch.compile'd transformer does not recompile.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from flux_lora.errors import LoraError
from flux_lora.lora_formats import ConvertedLora, ModelNames, convert_lora, read_lora

log = logging.getLogger(__name__)


class SlotError(LoraError):
    """A LoRA that cannot be applied in one slot: the service names the request input it came from."""

    def __init__(self, slot: str, message: str) -> None:
        super().__init__(message)
        self.slot = slot

class _Lru:
    """Converted LoRAs by file identity, bounded in bytes (the newest entry always stays)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, ConvertedLora] = OrderedDict()

    def get(self, key: str) -> ConvertedLora | None:
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
        return item

    def put(self, key: str, value: ConvertedLora) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > 1 and sum(v.nbytes for v in self._items.values()) > self.max_bytes:
            evicted, _ = self._items.popitem(last=False)
            log.info("LoRA memory cache: evicted %s", evicted)

    def __contains__(self, key: str) -> bool:
        return key in self._items


@dataclass(frozen=True)
class Wanted:
    """One adapter to run: its slot, the local file, the scale it runs at, and how logs name it."""

    slot: str
    path: Path
    scale: float
    name: str  # the reference as logs and errors show it (no secrets)


class _OtherAdaptersReport(logging.Filter):
    """transformers' LOAD REPORT after a second CLIP adapter lists the first one's keys as MISSING ("newly
    initialized"): noise in the prediction logs. Reports that name the adapter being loaded still pass."""

    def __init__(self, slot: str) -> None:
        super().__init__()
        self.slot = slot

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "LOAD REPORT" not in message or f".{self.slot}." in message


def _lora_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def _set_scales(model: nn.Module, scales: dict[str, float], enabled: bool) -> None:
    """Activate `scales`' adapters at those strengths; in place for tensor scalings (no recompile)."""
    names = list(scales)
    for layer in _lora_layers(model):
        layer.enable_adapters(enabled)
        if not enabled:
            continue
        layer.set_adapter([n for n in names if n in layer.lora_A])
        for name, scale in scales.items():
            if name not in layer.scaling:
                continue
            # Alpha is folded into lora_B at conversion, so the scaling is the user's scale itself.
            current = layer.scaling[name]
            if isinstance(current, torch.Tensor):
                current.fill_(scale)
            else:
                layer.scaling[name] = scale


# Padded rank for hot-swapping into compiled transformers: covers Replicate's trainer (16-128) and
# most community FLUX LoRAs; a larger one takes the logged slow path. FLUX_LORA_HOTSWAP_RANK overrides.
DEFAULT_HOTSWAP_RANK = 128


class LoraManager:
    """Adapters on the loaded pipelines: load only what changed, switch scales in place.

    `hotswap_rank`: set it when the transformers will be torch.compile'd (go_fast); new LoRAs then
    overwrite padded adapters of that rank instead of adding modules, so nothing recompiles.
    `transformers` are keyed by whatever the caller looks pipelines up by (the service: a PipelineKey).
    """

    def __init__(
        self,
        transformers: dict[Hashable, nn.Module],
        text_encoder: nn.Module | None,
        memory_bytes: int = 2 << 30,
        hotswap_rank: int | None = None,
    ) -> None:
        self.transformers = transformers
        self.text_encoder = text_encoder
        self.hotswap_rank = hotswap_rank
        self.cache = _Lru(memory_bytes)
        first = next(iter(transformers.values()))
        self.names = ModelNames.of(first, text_encoder)
        # component id -> slot -> identity (path:size:mtime) of the file loaded there
        self._loaded: dict[int, dict[str, str]] = {}
        self.loads = 0  # adapter loads so far (tests and the benchmark read it)

    def converted(self, path: Path, name: str) -> tuple[str, ConvertedLora]:
        """The file's identity (path, size, mtime) and its converted LoRA, from memory when that same file
        was read recently: a file replaced in place, or a new version behind an unversioned reference (a new
        cache file), is a new identity."""
        start = time.perf_counter()
        stat = Path(path).stat()
        identity = f"{path}:{stat.st_size}:{stat.st_mtime_ns}"
        cached = self.cache.get(identity)
        if cached is not None:
            return identity, cached
        try:
            raw, metadata = read_lora(Path(path))
            lora = convert_lora(raw, self.names, metadata)
        except LoraError as exc:
            raise LoraError(f"the LoRA {name!r} {exc}") from None
        self.cache.put(identity, lora)
        elapsed = time.perf_counter() - start
        log.info("Read LoRA %s (%s, %.1f MB) in %.2fs", name, lora.format, lora.nbytes / 1e6, elapsed)
        return identity, lora

    def apply(self, key: Hashable, wanted: list[Wanted]) -> None:
        """Make `key`'s transformer (and the shared CLIP) run exactly the wanted adapters; a LoRA that
        cannot be applied raises a SlotError naming its slot."""
        start = time.perf_counter()
        loras: dict[str, tuple[Wanted, str, ConvertedLora]] = {}
        for want in wanted:
            try:
                identity, lora = self.converted(want.path, want.name)
            except LoraError as exc:
                raise SlotError(want.slot, str(exc)) from None
            # The same file under two spellings (owner/model, https://replicate.com/owner/model) counts once.
            if any(identity == other for _, other, _ in loras.values()):
                log.warning("%s is the same LoRA as the main one (%s): applying it once", want.slot, want.name)
                continue
            loras[want.slot] = (want, identity, lora)
        wanted = [w for w, _, _ in loras.values()]
        components: list[tuple[nn.Module, str]] = [(self.transformers[key], "transformer")]
        if self.text_encoder is not None:
            components.append((self.text_encoder, "text_encoder"))
        changed = False
        for module, kind in components:
            scales: dict[str, float] = {}
            for slot, (want, identity, lora) in loras.items():
                sd = lora.transformer if kind == "transformer" else lora.text_encoder
                if not sd:
                    continue
                changed |= self._ensure(module, kind, want, identity, sd)
                scales[slot] = want.scale
            self._activate(module, kind, scales)
        log.info(
            "LoRA %s on %s in %.3fs%s",
            ", ".join(f"{w.slot}={w.name}@{w.scale:g}" for w in wanted) or "none",
            key, time.perf_counter() - start, " (loaded)" if changed else "",
        )

    def _ensure(self, module: nn.Module, kind: str, want: Wanted, identity: str, sd: dict[str, torch.Tensor]) -> bool:
        """Load the file `identity` into `want.slot` of `module` unless already there. True when something loaded."""
        slot, ref = want.slot, want.name
        loaded = self._loaded.setdefault(id(module), {})
        if loaded.get(slot) == identity:
            return False
        hotswap = kind == "transformer" and self.hotswap_rank is not None
        rank = max((t.shape[0] for k, t in sd.items() if k.endswith("lora_A.weight")), default=0)
        if slot in loaded:
            if hotswap and rank > self.hotswap_rank:
                log.warning(
                    "LoRA %s has rank %d, above the hot-swap rank %d (FLUX_LORA_HOTSWAP_RANK): slow path, a compiled "
                    "model recompiles", ref, rank, self.hotswap_rank,
                )
            elif hotswap and self._hotswap(module, slot, ref, sd):
                loaded[slot] = identity
                self.loads += 1
                return True
            self._delete(module, kind, slot)
            del loaded[slot]
        try:
            self._load(module, kind, slot, sd)
        except (ValueError, RuntimeError, KeyError) as exc:  # peft refused it (after our own checks passed)
            self._discard(module, slot)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SlotError(slot, f"the LoRA {ref!r} cannot be loaded ({kind}): {first}") from None
        if hotswap:
            self._pad(module, slot)
        loaded[slot] = identity
        self.loads += 1
        return True

    def _hotswap(self, module: nn.Module, slot: str, ref: str, sd: dict[str, torch.Tensor]) -> bool:
        try:
            module.load_lora_adapter(dict(sd), prefix=None, adapter_name=slot, hotswap=True)
            return True
        except (ValueError, RuntimeError, KeyError) as exc:
            log.warning(
                "LoRA %s cannot hot-swap into %s (%s): slow path, a compiled model recompiles", ref, slot, exc
            )
            return False

    def _load(self, module: nn.Module, kind: str, slot: str, sd: dict[str, torch.Tensor]) -> None:
        if kind == "transformer":
            module.load_lora_adapter(dict(sd), prefix=None, adapter_name=slot)
        else:
            from diffusers import FluxPipeline

            report = _OtherAdaptersReport(slot)
            transformers_peft = logging.getLogger("transformers.integrations.peft")
            transformers_peft.addFilter(report)
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                    FluxPipeline.load_lora_into_text_encoder(
                        {f"text_encoder.{k}": v for k, v in sd.items()}, network_alphas=None, text_encoder=module,
                        prefix="text_encoder", adapter_name=slot,
                    )
            finally:
                transformers_peft.removeFilter(report)

    def _pad(self, module: nn.Module, slot: str) -> None:
        """Pad every adapter of `module` to the hot-swap rank, scalings as tensors, so later LoRAs of any rank up
        to it swap into `slot` in place: diffusers' `enable_lora_hotswap` only prepares the first adapter ever
        loaded, leaving the other slot, and any slot reloaded after a slow path, unpadded. An adapter above the
        rank (loaded on the slow path) sets the padding for the others while it stays."""
        from peft.utils.hotswap import prepare_model_for_compiled_hotswap

        ranks = [layer.lora_A[name].weight.shape[0] for layer in _lora_layers(module) for name in layer.lora_A]
        target = max([self.hotswap_rank or 0, *ranks])
        config = getattr(module, "peft_config", {}).get(slot)
        prepare_model_for_compiled_hotswap(module, target_rank=target, config=config, check_compiled="ignore")

    @staticmethod
    def _discard(module: nn.Module, slot: str) -> None:
        """Remove whatever a failed load left of `slot` (layers peft injected before it raised)."""
        from diffusers.utils.peft_utils import delete_adapter_layers

        try:
            delete_adapter_layers(module, slot)
        except (ValueError, KeyError) as exc:
            log.warning("Cleaning up the failed adapter %s: %s", slot, exc)

    def _delete(self, module: nn.Module, kind: str, slot: str) -> None:
        if kind == "transformer":
            module.delete_adapters(slot)
        else:
            from diffusers.utils.peft_utils import delete_adapter_layers

            delete_adapter_layers(module, slot)

    def _activate(self, module: nn.Module, kind: str, scales: dict[str, float]) -> None:
        """Exactly the base model when every scale is 0 or nothing is wanted; adapters stay resident."""
        loaded = self._loaded.get(id(module), {})
        if not loaded:
            return
        if kind == "transformer" and self.hotswap_rank is not None:
            # Compiled: keep the adapter set fixed and zero the unused ones (a 0 scale adds exact zeros).
            _set_scales(module, {slot: scales.get(slot, 0.0) for slot in loaded}, enabled=True)
            return
        active = {slot: s for slot, s in scales.items() if s != 0.0}
        _set_scales(module, active, enabled=bool(active))
