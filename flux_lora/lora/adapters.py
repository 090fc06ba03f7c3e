"""A request's LoRAs on the loaded transformers and the shared CLIP: read, convert, pack, keep in memory.

`LoraManager` takes local files and scales, nothing else: where a file came from (the weight cache)
and which request input named it (the service) are not its business. Every linear of every model it
manages carries one packed adapter (`packed.py`) holding all of the request's LoRAs side by side, so any
number of LoRAs costs one GEMM pair per linear. A request whose files did not change only writes new
scales; converted LoRAs stay in a bounded LRU so switching back costs no disk or conversion.

Two kinds of model:
- plain ones (and the shared CLIP) hold exactly the ranks of the LoRAs on each layer;
- a transformer that will be torch.compile'd is *reserved* first (`reserve`): every linear holds the rank
  budget R (FLUX_LORA_MAX_RANK) from then on, zeros where unused, so LoRAs are written in and nothing
  recompiles, whatever their number, targets or ranks, as long as the ranks on any one layer add up to R
  at most. Above that, `RankBudgetError`, and the service runs that request on the plain transformer.

The same file twice in one request (two spellings of one reference, or one LoRA listed twice) runs once
at the sum of its scales: what two adapters of the same weights would compute.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from flux_lora import cancel
from flux_lora.errors import LoraError
from flux_lora.lora.formats import ConvertedLora, ModelNames, convert_lora, read_lora
from flux_lora.lora.packed import PackedLoraLinear, Piece, adapters_bypassed, wrap_linears

__all__ = ["AdapterError", "DEFAULT_MAX_RANK", "LoraManager", "RankBudgetError", "Wanted", "adapters_bypassed"]

log = logging.getLogger(__name__)

# Rank budget of a compiled transformer's adapters (FLUX_LORA_MAX_RANK): the ranks of all LoRAs on one layer
# add up to this at most. Trainers' defaults are 16 (Replicate's trainer, ai-toolkit, XLabs) to 32-64 (kohya,
# fluxgym): 128 holds a rank-64 main with a rank-64 extra, or eight rank-16 LoRAs. The adapters' cost per
# step barely depends on it (memory-bound: scripts/roofline.py), their memory does (docs/memory-plan.md).
DEFAULT_MAX_RANK = 128
FP8_MULTIPLE = 16  # a budget is rounded up to this: fp8 GEMMs (the folded down matrix) need widths of 16s


def rank_budget(max_rank: int | None) -> int:
    """The rank budget a compiled transformer reserves for FLUX_LORA_MAX_RANK (rounded up to whole 16s)."""
    return -(-(max_rank or DEFAULT_MAX_RANK) // FP8_MULTIPLE) * FP8_MULTIPLE


class AdapterError(LoraError):
    """A LoRA that cannot be applied: `label` is the request input it came from, for the service to name."""

    def __init__(self, label: str, message: str) -> None:
        super().__init__(message)
        self.label = label


class RankBudgetError(AdapterError):
    """LoRAs whose ranks on one layer add up to more than a compiled transformer's budget."""


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
    """One LoRA to run: the request input it came from, the local file, its scale, and how logs name it."""

    label: str
    path: Path
    scale: float
    name: str  # the reference as logs and errors show it (no secrets)


@dataclass
class _Entry:
    """A LoRA as one model receives it: its file identity, scale and matrices per layer of that model."""

    want: Wanted
    identity: str
    scale: float
    pairs: dict[str, tuple]  # layer name -> (down, up)


@dataclass
class _Model:
    """One managed model (a transformer or CLIP): its adapter layers and what they hold now."""

    layers: dict[str, PackedLoraLinear]
    budget: int | None = None  # the rank budget once reserved (compiled), else None (sized to the LoRAs)
    holds: tuple[tuple[str, float], ...] | None = ()  # (identity, scale) in order; None: unknown, rewrite all
    kind: str = "transformer"


def _pairs(sd: dict) -> dict[str, tuple]:
    """`<layer>.lora_A.weight` / `<layer>.lora_B.weight` -> {layer: (down, up)}."""
    return {
        key.removesuffix(".lora_A.weight"): (down, sd[key.replace(".lora_A.", ".lora_B.")])
        for key, down in sd.items()
        if key.endswith(".lora_A.weight")
    }


class LoraManager:
    """Packed adapters on the loaded models: write only what changed, switch scales in place.

    `transformers` are keyed by whatever the caller looks pipelines up by (the service: a PipelineKey); one
    module under several keys (go_fast without fp8 runs the plain transformer) is managed once.
    """

    def __init__(
        self,
        transformers: dict[Hashable, nn.Module],
        text_encoder: nn.Module | None,
        memory_bytes: int = 2 << 30,
        max_rank: int | None = None,
    ) -> None:
        self.transformers = transformers
        self.text_encoder = text_encoder
        self.max_rank = max_rank or DEFAULT_MAX_RANK
        self.cache = _Lru(memory_bytes)
        first = next(iter(transformers.values()))
        self.names = ModelNames.of(first, text_encoder)
        self._models: dict[int, _Model] = {}
        for module in transformers.values():
            if id(module) not in self._models:  # schnell has no guidance layers: each model's own linears
                linears = ModelNames.of(module, None).transformer_linears
                self._models[id(module)] = _Model(wrap_linears(module, list(linears)))
        if text_encoder is not None:
            self._models[id(text_encoder)] = _Model(
                wrap_linears(text_encoder, list(self.names.clip_linears)), kind="text_encoder"
            )
        self.loads = 0  # LoRA files newly placed on a model so far (tests and the benchmark read it)

    def reserve(self, key: Hashable, rank: int | None = None) -> int:
        """Give `key`'s transformer the fixed rank budget `rank` (default `max_rank`) on every linear, holding
        zeros: call before compiling it. What it held is dropped; apply again. Returns the budget."""
        model = self._models[id(self.transformers[key])]
        if model.budget is not None:
            return model.budget
        rank = rank_budget(rank or self.max_rank)
        for layer in model.layers.values():
            layer.fix(rank)
        model.budget, model.holds = rank, ()
        log.info("LoRA adapters reserved at rank %d on %s (%d linears)", rank, key, len(model.layers))
        return rank

    def reserved_rank(self, key: Hashable) -> int | None:
        """The rank budget of `key`'s transformer once reserved (a compiled transformer), else None."""
        return self._models[id(self.transformers[key])].budget

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
        """Make `key`'s transformer (and the shared CLIP) run exactly the wanted LoRAs, in order. A LoRA that
        cannot be applied raises an AdapterError naming its label; nothing of this request is applied then."""
        start = time.perf_counter()
        merged: dict[str, tuple[Wanted, float, ConvertedLora]] = {}
        for want in wanted:
            try:
                identity, lora = self.converted(want.path, want.name)
            except LoraError as exc:
                raise AdapterError(want.label, str(exc)) from None
            if identity in merged:  # two spellings of one reference, or one LoRA listed twice
                first, scale, _ = merged[identity]
                log.warning("%s is the same LoRA as %s (%s): it runs once at the sum of their scales",
                            want.label, first.label, want.name)
                merged[identity] = (first, scale + want.scale, lora)
            else:
                merged[identity] = (want, want.scale, lora)
        # A LoRA at scale 0 adds exact zeros: leaving it out is the same image with less work.
        running = [(identity, w, s, lora) for identity, (w, s, lora) in merged.items() if s != 0.0]
        models = [(self._models[id(self.transformers[key])], "transformer")]
        if self.text_encoder is not None:
            models.append((self._models[id(self.text_encoder)], "text_encoder"))
        plans = []
        for model, kind in models:  # everything checked before anything is written
            entries = [
                _Entry(w, identity, s, _pairs(lora.transformer if kind == "transformer" else lora.text_encoder))
                for identity, w, s, lora in running
            ]
            entries = [e for e in entries if e.pairs]
            plans.append((model, self._plan(model, entries, key)))
        cancel.check()  # read, converted and checked, nothing written yet: the last safe point to stop
        loaded = sum(self._write(model, entries, plan) for model, (entries, plan) in plans)
        log.info(
            "LoRA %s on %s in %.3fs%s",
            ", ".join(f"{w.label}={w.name}@{s:g}" for _, w, s, _ in running) or "none",
            key, time.perf_counter() - start, f" ({loaded} loaded)" if loaded else "",
        )

    def _plan(self, model: _Model, entries: list[_Entry], key: Hashable) -> tuple[list[_Entry], dict[str, list]]:
        """Per layer, the pieces it will hold; checks every shape and, when reserved, the rank budget."""
        plan: dict[str, list[tuple[_Entry, Piece]]] = {}
        for entry in entries:
            missing = sorted(set(entry.pairs) - set(model.layers))
            if missing:  # as peft does on a plain model: ignored, noted (schnell has no guidance layers)
                log.warning("LoRA %s: layers this model lacks are ignored: %s", entry.want.name, ", ".join(missing[:3]))
            for name, (down, up) in entry.pairs.items():
                layer = model.layers.get(name)
                if layer is None:
                    continue
                if (down.shape[1], up.shape[0]) != (layer.in_features, layer.out_features):
                    raise AdapterError(
                        entry.want.label,
                        f"the LoRA {entry.want.name!r} does not fit {name}: {tuple(down.shape)} x {tuple(up.shape)}",
                    )
                plan.setdefault(name, []).append((entry, Piece(down, up, entry.scale)))
        if model.budget is not None:
            for name, pieces in plan.items():
                rank = sum(piece.rank for _, piece in pieces)
                if rank > model.budget:
                    last = pieces[-1][0].want
                    names = " + ".join(f"{e.want.name!r} ({p.rank})" for e, p in pieces)
                    raise RankBudgetError(
                        last.label,
                        f"the LoRA{'s' if len(pieces) > 1 else ''} {names} need{'' if len(pieces) > 1 else 's'} "
                        f"rank {rank} on {name}, above the compiled go_fast rank budget {model.budget} "
                        f"(FLUX_LORA_MAX_RANK) on {key}",
                    )
        return entries, {name: [piece for _, piece in pieces] for name, pieces in plan.items()}

    def _write(self, model: _Model, entries: list[_Entry], plan: dict[str, list[Piece]]) -> int:
        """Write the plan into `model`'s layers; returns how many files were new there."""
        holds = tuple((e.identity, e.scale) for e in entries)
        if holds == model.holds:
            return 0
        before = model.holds or ()
        rescale = model.holds is not None and [i for i, _ in holds] == [i for i, _ in before]
        model.holds = None  # until every layer is written: a failure half-way means "rewrite everything"
        try:
            for name, layer in model.layers.items():
                pieces = plan.get(name)
                if rescale:
                    if pieces:
                        layer.rescale(pieces)
                elif pieces:
                    layer.fill(pieces)
                else:
                    layer.clear()
        except (RuntimeError, ValueError) as exc:  # out of memory, say: named for what this request changed
            held = {i for i, _ in before}
            changed = [e for e in entries if e.identity not in held] or entries
            label = changed[0].want.label if changed else "lora"
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise AdapterError(label, f"the LoRAs could not be applied ({model.kind}): {first}") from None
        model.holds = holds
        new = {i for i, _ in holds} - {i for i, _ in before}
        self.loads += len(new)
        return len(new)
