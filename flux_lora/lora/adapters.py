"""Adapter slots on the loaded transformers and the shared CLIP: load, reserve, copy in, scale, keep in memory.

`LoraManager` takes local files and scales, nothing else: where a file came from (the weight cache)
and which request input named it (the service) are not its business. It keeps adapters resident per
component (the transformers, one shared CLIP): a request whose files did not change only sets scales;
converted state dicts stay in a bounded LRU so switching back costs no disk or conversion.

Two kinds of transformer:
- plain ones (and uncompiled go_fast ones) load each LoRA at its own rank on the layers it targets;
- a transformer that will be torch.compile'd gets both slots *reserved* before compiling: zero
  adapters of one rank on every linear any LoRA format can target. A LoRA is then copied into those
  weights (zeros where it has no layer or rank), so the module structure never changes after the
  compile and nothing recompiles, whatever the LoRA's targets. A LoRA above the reserved rank cannot be
  copied in: `ReservedRankError`, and the service runs that request on the plain transformer.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections import OrderedDict
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from flux_lora.errors import LoraError
from flux_lora.lora.formats import ConvertedLora, ModelNames, convert_lora, read_lora

log = logging.getLogger(__name__)


class SlotError(LoraError):
    """A LoRA that cannot be applied in one slot: the service names the request input it came from."""

    def __init__(self, slot: str, message: str) -> None:
        super().__init__(message)
        self.slot = slot


class ReservedRankError(SlotError):
    """A LoRA of a higher rank than a compiled transformer's reserved slots: it cannot be copied in."""


SLOTS = ("main", "extra")


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


@contextmanager
def adapters_bypassed(module: nn.Module) -> Iterator[None]:
    """Inside, `module` runs its base layers alone: every LoRA layer skips its adapters (their matmuls do not
    run), whatever they hold and whatever their scales. On exit each layer is as it was. What adapters cost is
    the same call with and without this (scripts/bench.py, "adapter cost").

    peft's own switch (`enable_adapters`) would also reset the adapters' requires_grad, on which compiled
    graphs guard: only its flag is set here, and restored.
    """
    layers = _lora_layers(module)
    before = [layer._disable_adapters for layer in layers]
    try:
        for layer in layers:
            layer._disable_adapters = True
        yield
    finally:
        for layer, flag in zip(layers, before, strict=True):
            layer._disable_adapters = flag


def _set_scales(model: nn.Module, scales: dict[str, float], enabled: bool) -> None:
    """Activate `scales`' adapters at those strengths; in place for tensor scalings (no recompile)."""
    names = list(scales)
    for layer in _lora_layers(model):
        layer.enable_adapters(enabled)
        if not enabled:
            continue
        # inference_mode: adapters keep requires_grad=False (dynamo guards on it; nothing here trains).
        layer.set_adapter([n for n in names if n in layer.lora_A], inference_mode=True)
        for name, scale in scales.items():
            if name not in layer.scaling:
                continue
            # Alpha is folded into lora_B at conversion, so the scaling is the user's scale itself.
            current = layer.scaling[name]
            if isinstance(current, torch.Tensor):
                current.fill_(scale)
            else:
                layer.scaling[name] = scale


# Rank of the slots reserved on compiled transformers (FLUX_LORA_HOTSWAP_RANK). Trainers' defaults are
# 16 (Replicate's trainer, ai-toolkit, XLabs) to 32-64 (kohya, fluxgym); every reserved slot costs
# per step in proportion to this rank whatever the LoRA's own (docs/memory-plan.md), so 64 covers the
# defaults and a rarer 128 runs that request on the plain transformer.
DEFAULT_HOTSWAP_RANK = 64


def _adapter_dtype(linear: nn.Linear) -> torch.dtype:
    """Adapters compute in the activations' dtype, also on an fp8 layer (whose weight is float8 storage)."""
    dtype = linear.weight.dtype
    return dtype if dtype.is_floating_point and dtype.itemsize >= 2 else torch.bfloat16


class LoraManager:
    """Adapters on the loaded pipelines: load only what changed, switch scales in place.

    `transformers` are keyed by whatever the caller looks pipelines up by (the service: a PipelineKey).
    `reserve(key)` fixes a transformer's adapter structure before it is compiled (`hotswap_rank`).
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
        self._reserved: dict[int, int] = {}  # component id -> rank of its reserved slots
        self._slot_layers: dict[int, dict[str, nn.Module]] = {}  # component id -> its LoRA layers, found once
        self.loads = 0  # adapter loads so far (tests and the benchmark read it)

    def reserve(self, key: Hashable, rank: int | None = None) -> int:
        """Give `key`'s transformer both slots at `rank` (default `hotswap_rank`) on every linear, holding
        zeros, scalings as tensors: call before compiling it. LoRAs already loaded there are copied back in.
        Returns the rank."""
        from peft.utils.hotswap import prepare_model_for_compiled_hotswap

        rank = rank or self.hotswap_rank or DEFAULT_HOTSWAP_RANK
        module = self.transformers[key]
        if id(module) in self._reserved:
            return self._reserved[id(module)]
        loaded = self._loaded.setdefault(id(module), {})
        for slot in list(loaded):
            self._delete(module, "transformer", slot)
        zeros: dict[str, torch.Tensor] = {}
        for name, linear in ModelNames.of(module, None).transformer_linears.items():  # schnell has no guidance
            options = dict(device=linear.weight.device, dtype=_adapter_dtype(linear))
            zeros[f"{name}.lora_A.weight"] = torch.zeros(rank, linear.in_features, **options)
            zeros[f"{name}.lora_B.weight"] = torch.zeros(linear.out_features, rank, **options)
        for slot in SLOTS:
            with warnings.catch_warnings():  # peft's notes on a second adapter and on fp8 merging: nothing to do
                warnings.filterwarnings("ignore", message="Already found a `peft_config`|TorchaoLoraLinear")
                module.load_lora_adapter(dict(zeros), prefix=None, adapter_name=slot)
            # Tensor scalings: a new scale is a value written in place, not a constant baked into a graph.
            config = module.peft_config[slot]
            prepare_model_for_compiled_hotswap(module, target_rank=rank, config=config, check_compiled="ignore")
        from peft.tuners.lora import LoraLayer

        self._reserved[id(module)] = rank
        self._slot_layers[id(module)] = {n: m for n, m in module.named_modules() if isinstance(m, LoraLayer)}
        previous, loaded = dict(loaded), self._loaded.setdefault(id(module), {})
        loaded.clear()
        for slot, identity in previous.items():
            lora = self.cache.get(identity)
            if lora is not None:
                self._copy_in(module, slot, identity, lora.transformer)
                loaded[slot] = identity
        _set_scales(module, dict.fromkeys(SLOTS, 0.0), enabled=True)
        log.info("LoRA slots %s reserved at rank %d on %s (%d linears)", "+".join(SLOTS), rank, key, len(zeros) // 2)
        return rank

    def reserved_rank(self, key: Hashable) -> int | None:
        """The rank of `key`'s reserved slots (a compiled transformer), else None."""
        return self._reserved.get(id(self.transformers[key]))

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
        if id(module) in self._reserved:  # compiled: the structure is fixed, the weights are copied in
            self._copy_in(module, slot, ref, sd)
            loaded[slot] = identity
            self.loads += 1
            return True
        if slot in loaded:
            self._delete(module, kind, slot)
            del loaded[slot]
        try:
            self._load(module, kind, slot, sd)
        except (ValueError, RuntimeError, KeyError) as exc:  # peft refused it (after our own checks passed)
            self._discard(module, slot)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SlotError(slot, f"the LoRA {ref!r} cannot be loaded ({kind}): {first}") from None
        loaded[slot] = identity
        self.loads += 1
        return True

    def _copy_in(self, module: nn.Module, slot: str, ref: str, sd: dict[str, torch.Tensor]) -> None:
        """Write a converted LoRA into `slot`'s reserved weights: its rank in the first rows/columns, zeros
        elsewhere and on every layer it does not target. Everything is checked before anything is written."""
        rank = self._reserved[id(module)]
        layers = self._slot_layers[id(module)]  # found at `reserve`: a switch walks no module tree
        pairs = {
            key.removesuffix(".lora_A.weight"): (down, sd[key.replace(".lora_A.", ".lora_B.")])
            for key, down in sd.items() if key.endswith(".lora_A.weight")
        }
        if missing := sorted(set(pairs) - set(layers)):  # as peft does on a plain model: ignored, noted
            log.warning("LoRA %s: layers this model lacks are ignored: %s", ref, ", ".join(missing[:3]))
        for name, (down, up) in pairs.items():
            layer = layers.get(name)
            if layer is not None and (down.shape[1], up.shape[0]) != (layer.in_features, layer.out_features):
                raise SlotError(slot, f"the LoRA {ref!r} does not fit {name}: {tuple(down.shape)} x {tuple(up.shape)}")
        if (got := max((down.shape[0] for down, _ in pairs.values()), default=0)) > rank:
            raise ReservedRankError(
                slot, f"the LoRA {ref!r} has rank {got}, above the compiled go_fast slots' rank {rank} "
                "(FLUX_LORA_HOTSWAP_RANK)",
            )
        with torch.no_grad():
            for name, layer in layers.items():
                down_w, up_w = layer.lora_A[slot].weight, layer.lora_B[slot].weight
                down_w.zero_()
                up_w.zero_()
                if name in pairs:
                    down, up = pairs[name]
                    down_w[: down.shape[0]].copy_(down)
                    up_w[:, : up.shape[1]].copy_(up)

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
        if id(module) in self._reserved:
            # Compiled: the adapter set stays fixed; an unused slot runs at scale 0 (it adds exact zeros).
            _set_scales(module, {slot: scales.get(slot, 0.0) for slot in SLOTS}, enabled=True)
            return
        loaded = self._loaded.get(id(module), {})
        if not loaded:
            return
        active = {slot: s for slot, s in scales.items() if s != 0.0}
        _set_scales(module, active, enabled=bool(active))
