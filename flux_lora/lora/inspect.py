"""What a LoRA file holds, as the server reads it (`flux-lora lora inspect REF`).

The same reading a prediction makes (`read_lora`, then `convert_lora` onto the model's module names),
reported instead of applied: the format, the transformer and CLIP modules it reaches, what is left out
and why, its ranks and alphas, and whether it fits a compiled go_fast transformer's rank budget.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

from flux_lora.errors import LoraError
from flux_lora.lora.formats import convert_lora, read_lora
from flux_lora.lora.names import ModelNames

GROUPS = (("transformer_blocks.", "double blocks"), ("single_transformer_blocks.", "single blocks"))


@dataclass
class Inspection:
    """One file's report; `lines()` for people, `asdict` for `--json`."""

    file: str
    size: int
    sha256: str
    tensors: int
    dtypes: list[str]
    format: str
    transformer_modules: list[str]
    clip_modules: list[str]
    ignored: list[tuple[str, str]]
    ranks: dict[str, list[int]]  # block group -> [lowest, highest]
    alphas: list[float]
    trigger_words: list[str]
    rank: int  # the highest rank on any one layer: what it takes of a compiled rank budget
    rank_budget: int
    fits_budget: bool

    def to_json(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        alphas = ", ".join(f"{a:g}" for a in self.alphas) or "none in the file (scale 1 per rank)"
        fits = (
            f"yes: rank {self.rank} of {self.rank_budget}, go_fast runs it compiled"
            if self.fits_budget else
            f"no: rank {self.rank} > {self.rank_budget}, go_fast requests with it run on the plain transformer"
        )
        out = [
            f"file          {self.file}",
            f"size          {self.size} bytes, {self.tensors} tensors ({', '.join(self.dtypes)})",
            f"sha256        {self.sha256}",
            f"format        {self.format}",
            f"transformer   {len(self.transformer_modules)} module(s)",
            f"CLIP          {len(self.clip_modules)} module(s)",
            *(f"rank          {group}: {low}" + (f"-{high}" if high != low else "")
              for group, (low, high) in self.ranks.items()),
            f"alpha         {alphas}",
            f"triggers      {', '.join(self.trigger_words) or 'none found'}",
            f"rank budget   {fits} (FLUX_LORA_MAX_RANK)",
        ]
        for key, why in self.ignored:
            out.append(f"not applied   {key}: {why}")
        return out


def _group(module: str) -> str:
    return next((name for prefix, name in GROUPS if module.startswith(prefix)), "other transformer layers")


def inspect_lora(path: Path, name: str, names: ModelNames, rank_budget: int, trigger_words: list[str]) -> Inspection:
    """Read `path` as a prediction would; a file a prediction refuses raises the same one-line LoraError."""
    try:
        raw, metadata = read_lora(path)
        lora = convert_lora(raw, names, metadata)
    except LoraError as exc:
        raise LoraError(f"the LoRA {name!r} {exc}") from None
    ranks: dict[str, list[int]] = {}
    parts = [(m, t) for m, t in lora.transformer.items()] + [(f"CLIP {m}", t) for m, t in lora.text_encoder.items()]
    for key, tensor in parts:
        if key.endswith(".lora_A.weight"):
            group = "CLIP" if key.startswith("CLIP ") else _group(key)
            low, high = ranks.get(group, [tensor.shape[0], tensor.shape[0]])
            ranks[group] = [min(low, tensor.shape[0]), max(high, tensor.shape[0])]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    modules = sorted(k.removesuffix(".lora_A.weight") for k in lora.transformer if k.endswith(".lora_A.weight"))
    clip = sorted(k.removesuffix(".lora_A.weight") for k in lora.text_encoder if k.endswith(".lora_A.weight"))
    return Inspection(
        file=str(path), size=Path(path).stat().st_size, sha256=digest.hexdigest(), tensors=len(raw),
        dtypes=sorted({str(t.dtype).removeprefix("torch.") for t in raw.values()}), format=lora.format,
        transformer_modules=modules, clip_modules=clip, ignored=lora.ignored, ranks=ranks,
        alphas=sorted(set(lora.alphas.values())), trigger_words=list(trigger_words), rank=lora.max_rank,
        rank_budget=rank_budget, fits_budget=lora.max_rank <= rank_budget,
    )
