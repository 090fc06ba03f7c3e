"""FLUX LoRAs: detect the file's format, convert it against the loaded model, switch adapters.

Every supported format (peft/diffusers, kohya/sd-scripts, ComfyUI `diffusion_model.`, the "mixture"
`lora_transformer_` form, XLabs `processor` keys, CLIP text-encoder LoRAs) is parsed into one
canonical form: per target module a `lora_A` (down) and `lora_B` (up) with alpha/rank already folded
into `lora_B`, so every adapter runs with scaling 1.0 times the user's scale. Fused BFL layers
(`qkv`, single-block `linear1`) are split with the widths read off the model itself, not the real
FLUX widths diffusers' converters assume. Keys that match nothing, or match another architecture,
are errors: a LoRA never runs silently as the base model.

`LoraManager` keeps adapters resident per component (two transformers, one shared CLIP): a request
whose references did not change only sets scales; converted state dicts stay in a bounded LRU so
switching back costs no disk or conversion; with `hotswap_rank` the transformers take new LoRAs by
hot-swapping weights into padded adapters, so a torch.compile'd transformer does not recompile.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from flux_lora.errors import UserError
from flux_lora.refs import redact_url
from flux_lora.request import LoraSpec

log = logging.getLogger(__name__)

# The schema's "for go_fast we apply a 1.5x multiplier" makes up for the reference merging the LoRA into fp8
# weights, which weakens it. Here adapters stay unmerged in the compute dtype on top of the fp8 linears, so
# a LoRA is as strong with go_fast as without: the same scale gives the same strength, a multiplier of 1.
GO_FAST_SCALE = 1.0
SLOTS = ("main", "extra")


class LoraError(UserError):
    """A LoRA file we cannot apply: wrong architecture, empty, unsupported variant, bad shapes."""


def shown(ref: str) -> str:
    """A reference as logs and errors may show it: no query strings, credentials or data: payloads."""
    if ref.startswith("data:"):
        return f"data: URI ({len(ref)} characters)"
    return redact_url(ref)


def effective_scale(scale: float, go_fast: bool) -> float:
    """The strength the adapter runs at: the user's scale, under go_fast too (see GO_FAST_SCALE)."""
    return scale * GO_FAST_SCALE if go_fast else scale


# --------------------------------------------------------------------------- parsing raw keys

# Suffix -> role. Longest first: ".lora.down.weight" must win over ".down.weight".
_SUFFIXES: tuple[tuple[str, str], ...] = (
    # diffusers' convert_state_dict_to_diffusers (SimpleTuner's text encoders): CLIP attention projections
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_A.default.weight", "down"),
    (".lora_B.default.weight", "up"),
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".down.weight", "down"),
    (".up.weight", "up"),
    (".alpha", "alpha"),
)
_DORA = ("dora_scale", "lora_magnitude_vector")
# LyCORIS variants, told by a key's last name (`<module>.hada_w1_a`) or the one before `.weight`
# (`<module>.lora_mid.weight`): never a substring test, `model.diffusion_model.` contains ".diff".
_LYCORIS_LAST_PREFIXES = ("hada_w", "hada_t", "lokr_w", "lokr_t", "oft_")
_LYCORIS_LAST = ("diff", "diff_b")
_LYCORIS_WEIGHT_OF = ("lora_mid", "a1", "a2", "b1", "b2")
# Key fragments of other diffusion architectures (flattened: dots become underscores).
_FOREIGN: tuple[tuple[str, str], ...] = (
    ("input_blocks_", "SDXL/SD 1.5 (original UNet names)"),
    ("output_blocks_", "SDXL/SD 1.5 (original UNet names)"),
    ("middle_block_", "SDXL/SD 1.5 (original UNet names)"),
    ("down_blocks_", "Stable Diffusion (SD 1.5/SDXL UNet)"),
    ("up_blocks_", "Stable Diffusion (SD 1.5/SDXL UNet)"),
    ("mid_block_", "Stable Diffusion (SD 1.5/SDXL UNet)"),
    ("joint_blocks_", "Stable Diffusion 3"),
    ("context_block_", "Stable Diffusion 3"),
)
# Prefixes that name where a key lives; stripped before matching module names.
_TRANSFORMER_PREFIXES = (
    "base_model.model.",
    "model.diffusion_model.",
    "diffusion_model.",
    "transformer.",
    "lora_unet_",
    "lora_transformer_",
    "unet.",
)
# CLIP as trainers write it: kohya/sd-scripts `lora_te1_`, SD-1.5-style `lora_te_` (ComfyUI reads it as
# clip_l), diffusers/SimpleTuner `text_encoder.`, ComfyUI's own saves `text_encoders.clip_l.transformer.`.
_CLIP_PREFIXES = ("lora_te1_", "lora_te_", "text_encoders.clip_l.transformer.", "text_encoder.", "te1.")
# T5: sd-scripts FLUX `lora_te3_` (`lora_te2_` in its first FLUX versions), diffusers, ComfyUI.
_T5_PREFIXES = ("lora_te2_", "lora_te3_", "text_encoder_2.", "text_encoders.t5xxl.transformer.", "te2.")
# transformers < 5 named CLIPTextModel's modules `text_model.encoder...`, as files still spell them; 5 dropped it.
_CLIP_TEXT_MODEL = "text_model."


def _flat(name: str) -> str:
    return name.replace(".", "_")


def _split_key(key: str) -> tuple[str, str] | None:
    for suffix, role in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def _strip(stem: str, prefixes: Iterable[str]) -> str | None:
    for prefix in prefixes:
        if stem.startswith(prefix):
            return stem[len(prefix) :]
    return None


@dataclass
class _RawModule:
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None


# --------------------------------------------------------------------------- the model's names


@dataclass(frozen=True)
class _Part:
    """One target of a (possibly fused) LoRA: rows of the up matrix, columns of the down input."""

    module: str
    rows: slice | None = None  # which output rows of the fused layer this module takes
    fused_rows: int = 0  # the fused layer's total output rows (its LoRA's up matrix height)
    pad_input: bool = False  # the LoRA reads only the first input columns (XLabs single-block proj)
    swap_halves: bool = False  # BFL final adaLN is (shift, scale); diffusers is (scale, shift)


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every linear layer by name; a layer peft already wrapped counts as its base layer."""
    out: dict[str, nn.Linear] = {}
    for name, module in model.named_modules():
        base = getattr(module, "base_layer", None)
        if isinstance(base, nn.Linear):
            out[name] = base
        elif isinstance(module, nn.Linear) and not {"base_layer", "lora_A", "lora_B"} & set(name.split(".")):
            out[name] = module
    return out


def _split_rows(modules: dict[str, nn.Linear], names: list[str]) -> list[_Part]:
    total = sum(modules[name].out_features for name in names)
    parts, start = [], 0
    for name in names:
        size = modules[name].out_features
        parts.append(_Part(name, slice(start, start + size), fused_rows=total))
        start += size
    return parts


def _bfl_table(linears: dict[str, nn.Linear]) -> dict[str, list[_Part]]:
    """BFL (original FLUX) module names -> diffusers modules, widths read off the loaded model."""
    table: dict[str, list[_Part]] = {}
    blocks = sorted({int(m.group(1)) for n in linears if (m := re.match(r"transformer_blocks\.(\d+)\.", n))})
    singles = sorted({int(m.group(1)) for n in linears if (m := re.match(r"single_transformer_blocks\.(\d+)\.", n))})
    for i in blocks:
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        table[b + "img_attn.qkv"] = _split_rows(linears, [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"])
        table[b + "txt_attn.qkv"] = _split_rows(
            linears, [d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"]
        )
        for bfl, ours in (
            ("img_attn.proj", "attn.to_out.0"),
            ("txt_attn.proj", "attn.to_add_out"),
            ("img_mlp.0", "ff.net.0.proj"),
            ("img_mlp.2", "ff.net.2"),
            ("txt_mlp.0", "ff_context.net.0.proj"),
            ("txt_mlp.2", "ff_context.net.2"),
            ("img_mod.lin", "norm1.linear"),
            ("txt_mod.lin", "norm1_context.linear"),
        ):
            table[b + bfl] = [_Part(d + ours)]
        # XLabs attention processors: lora1 = image stream, lora2 = text stream.
        table[b + "processor.qkv_lora1"] = table[b + "img_attn.qkv"]
        table[b + "processor.proj_lora1"] = table[b + "img_attn.proj"]
        table[b + "processor.qkv_lora2"] = table[b + "txt_attn.qkv"]
        table[b + "processor.proj_lora2"] = table[b + "txt_attn.proj"]
    for i in singles:
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        qkv = [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"]
        table[b + "linear1"] = _split_rows(linears, [*qkv, d + "proj_mlp"])
        table[b + "linear2"] = [_Part(d + "proj_out")]
        table[b + "modulation.lin"] = [_Part(d + "norm.linear")]
        table[b + "processor.qkv_lora"] = _split_rows(linears, qkv)
        # XLabs' single-block proj LoRA reads the attention output only: the first columns of proj_out's input.
        table[b + "processor.proj_lora"] = [_Part(d + "proj_out", pad_input=True)]
    for bfl, ours in (
        ("img_in", "x_embedder"),
        ("txt_in", "context_embedder"),
        ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
        ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
        ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
        ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
        ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
        ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
        ("final_layer.linear", "proj_out"),
    ):
        if ours in linears:
            table[bfl] = [_Part(ours)]
    if "norm_out.linear" in linears:
        table["final_layer.adaLN_modulation.1"] = [_Part("norm_out.linear", swap_halves=True)]
    return table


@dataclass(frozen=True)
class ModelNames:
    """Flattened module names of the loaded model -> where a LoRA on them goes. Built once per model."""

    transformer: dict[str, list[_Part]]
    transformer_linears: dict[str, nn.Linear]
    clip: dict[str, list[_Part]]
    clip_linears: dict[str, nn.Linear]

    @classmethod
    def of(cls, transformer: nn.Module, text_encoder: nn.Module | None) -> ModelNames:
        t_lin = _linears(transformer)
        t_table = {_flat(name): [_Part(name)] for name in t_lin}
        t_table.update({_flat(name): parts for name, parts in _bfl_table(t_lin).items()})
        c_lin = _linears(text_encoder) if text_encoder is not None else {}
        c_table = {}
        for name in c_lin:  # each CLIP module under both spellings, whichever the loaded transformers uses
            bare = name.removeprefix(_CLIP_TEXT_MODEL)
            c_table[_flat(bare)] = c_table[_flat(_CLIP_TEXT_MODEL + bare)] = [_Part(name)]
        return cls(t_table, t_lin, c_table, c_lin)


# --------------------------------------------------------------------------- conversion


@dataclass
class ConvertedLora:
    """A LoRA in diffusers/peft keys (`<module>.lora_A.weight`), alpha folded in, ready to load."""

    format: str
    transformer: dict[str, torch.Tensor] = field(default_factory=dict)
    text_encoder: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for sd in (self.transformer, self.text_encoder) for t in sd.values())

    @property
    def max_rank(self) -> int:
        return max((t.shape[0] for k, t in self.transformer.items() if k.endswith("lora_A.weight")), default=0)


def detect_format(keys: Iterable[str]) -> str:
    """A name for logs and errors; conversion itself is driven by the model's names, not by this."""
    keys = list(keys)
    if any(".processor." in k for k in keys):
        return "xlabs"
    if any(k.startswith("lora_transformer_") for k in keys):
        return "mixture (lora_transformer_)"
    if any(k.startswith(("lora_unet_", "lora_te")) for k in keys):
        return "kohya"
    if any(k.startswith(("diffusion_model.", "model.diffusion_model.", "text_encoders.")) for k in keys):
        return "comfyui (diffusion_model.)"
    return "peft/diffusers"


def _is_lycoris(key: str) -> bool:
    parts = key.split(".")
    last = parts[-1]
    if last in _LYCORIS_LAST or last.startswith(_LYCORIS_LAST_PREFIXES):
        return True
    return last == "weight" and len(parts) > 1 and parts[-2] in _LYCORIS_WEIGHT_OF


def _reject_variants(keys: list[str]) -> None:
    if any(marker in k for k in keys for marker in _DORA):
        raise LoraError(
            "is a DoRA LoRA (keys with dora_scale/lora_magnitude_vector); DoRA is not supported: "
            "use a plain LoRA (lora_A/lora_B or lora_down/lora_up)"
        )
    if any(_is_lycoris(k) for k in keys):
        raise LoraError(
            "is a LyCORIS LoRA (LoHa/LoKr/OFT/full-diff keys); only plain LoRAs are supported: "
            "convert it to a standard LoRA or use another file"
        )


def _foreign_architecture(stems: Iterable[str]) -> str | None:
    flat = [_flat(s) for s in stems]
    for marker, arch in _FOREIGN:
        if any(marker in s for s in flat):
            return arch
    return None


def _number(value: object) -> float | None:
    """A finite real number, or None (JSON null, strings, lists, booleans, NaN are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _metadata_alphas(metadata: dict[str, str] | None) -> dict[str, tuple[float | None, dict[str, float]]]:
    """peft/diffusers files may keep lora_alpha in the safetensors header instead of `.alpha` keys, per
    component (`transformer.lora_alpha`, `text_encoder.lora_alpha`; unprefixed ones apply to both).
    Returns {"transformer" | "text_encoder": (alpha, alpha_pattern)}."""
    if not metadata or "lora_adapter_metadata" not in metadata:
        return {}
    try:
        meta = json.loads(metadata["lora_adapter_metadata"])
    except (TypeError, ValueError):
        raise LoraError("has a lora_adapter_metadata header that is not JSON") from None
    if not isinstance(meta, dict):
        raise LoraError("has a lora_adapter_metadata header that is not a JSON object")
    out: dict[str, tuple[float | None, dict[str, float]]] = {}
    for component in ("transformer", "text_encoder"):
        alpha = meta.get(f"{component}.lora_alpha", meta.get("lora_alpha"))
        pattern = meta.get(f"{component}.alpha_pattern", meta.get("alpha_pattern")) or {}
        if alpha is not None and _number(alpha) is None:
            raise LoraError(f"has a lora_alpha in its metadata that is not a number ({alpha!r})")
        if not isinstance(pattern, dict) or any(_number(v) is None for v in pattern.values()):
            raise LoraError("has an alpha_pattern in its metadata that is not an object of numbers")
        out[component] = _number(alpha), {k: float(v) for k, v in pattern.items()}
    return out


def _pattern_alpha(pattern: dict[str, float], name: str) -> float | None:
    """peft's alpha_pattern keys name a module exactly (`^name`, as diffusers writes them) or a suffix of it."""
    if name in pattern or f"^{name}" in pattern:
        return pattern.get(name, pattern.get(f"^{name}"))
    return next((alpha for key, alpha in pattern.items() if name.endswith("." + key)), None)


def _alpha(stem: str, value: torch.Tensor) -> float:
    """A `.alpha` entry: one finite number (a 0-d or one-element tensor)."""
    number = float(value.float().item()) if value.numel() == 1 else math.nan
    if not math.isfinite(number):
        raise LoraError(f"has a malformed alpha for {stem} (shape {tuple(value.shape)}): expected one finite number")
    return number


def _check_matrices(stem: str, down: torch.Tensor, up: torch.Tensor) -> None:
    """down [rank, in] and up [out, rank], floating point, rank >= 1: before anything reads a rank."""
    if (
        down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]
        or not down.is_floating_point() or not up.is_floating_point()
    ):
        raise LoraError(
            f"has malformed weights for {stem}: down {tuple(down.shape)} {down.dtype}, up {tuple(up.shape)} {up.dtype}"
        )
    if down.shape[0] == 0:
        raise LoraError(f"has rank 0 for {stem}: a LoRA needs rank 1 or more")


def convert_lora(
    raw: dict[str, torch.Tensor], names: ModelNames, metadata: dict[str, str] | None = None
) -> ConvertedLora:
    """Any supported FLUX LoRA -> canonical peft keys for our transformer and CLIP, shapes checked."""
    keys = list(raw)
    if not keys:
        raise LoraError("is empty: the file holds no tensors")
    _reject_variants(keys)
    fmt = detect_format(keys)

    grouped: dict[str, _RawModule] = {}
    unknown: list[str] = []
    for key in keys:
        split = _split_key(key)
        if split is None:
            unknown.append(key)
            continue
        stem, role = split
        entry = grouped.setdefault(stem, _RawModule())
        if role == "alpha":
            entry.alpha = _alpha(stem, raw[key])
        else:
            setattr(entry, role, raw[key])

    foreign = _foreign_architecture(grouped) or _foreign_architecture(unknown)
    if foreign:
        raise LoraError(f"is a {foreign} LoRA, not a FLUX.1 LoRA: it cannot be applied to FLUX")
    if not grouped:
        raise LoraError(f"has no LoRA weights (no lora_A/lora_B or lora_down/lora_up keys among {len(keys)} keys)")

    meta = _metadata_alphas(metadata)
    out = ConvertedLora(fmt)
    skipped_t5, unmatched = 0, list(unknown)
    for stem, entry in grouped.items():
        if entry.down is None or entry.up is None:
            unmatched.append(stem)
            continue
        _check_matrices(stem, entry.down, entry.up)
        if _strip(stem, _T5_PREFIXES) is not None:
            skipped_t5 += 1
            continue
        clip_name = _strip(stem, _CLIP_PREFIXES)
        if clip_name is not None:
            table, linears, target = names.clip, names.clip_linears, out.text_encoder
            name, component = clip_name, "text_encoder"
        else:
            table, linears, target = names.transformer, names.transformer_linears, out.transformer
            name, component = _strip(stem, _TRANSFORMER_PREFIXES) or stem, "transformer"
        parts = table.get(_flat(name))
        if parts is None:
            unmatched.append(stem)
            continue
        rank = entry.down.shape[0]
        alpha = entry.alpha
        if alpha is None and component in meta:
            meta_alpha, pattern = meta[component]
            alpha = _pattern_alpha(pattern, name)
            alpha = meta_alpha if alpha is None else alpha
        scale = alpha / rank if alpha is not None else 1.0
        for part in parts:
            down, up = _part_weights(stem, entry.down, entry.up, part, linears[part.module])
            target[f"{part.module}.lora_A.weight"] = down.contiguous()
            target[f"{part.module}.lora_B.weight"] = (up.float() * scale).to(up.dtype).contiguous()

    if skipped_t5:
        log.warning("LoRA (%s): skipping %d T5 text-encoder module(s); T5 LoRAs are not applied", fmt, skipped_t5)
    if not out.transformer and not out.text_encoder:
        sample = ", ".join(unmatched[:3])
        raise LoraError(
            f"matches no module of FLUX.1 ({fmt} keys like {sample}): it is not a FLUX.1 LoRA, "
            "or a format this server does not read"
        )
    if unmatched:
        log.warning(
            "LoRA (%s): %d key group(s) match no FLUX module and are ignored, e.g. %s",
            fmt, len(unmatched), ", ".join(unmatched[:3]),
        )
    log.info(
        "LoRA format %s: %d transformer + %d text-encoder module(s), rank up to %d",
        fmt, len(out.transformer) // 2, len(out.text_encoder) // 2, out.max_rank,
    )
    return out


def _part_weights(
    stem: str, down: torch.Tensor, up: torch.Tensor, part: _Part, module: nn.Linear
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a fused LoRA down to one target module, checking every shape against the real layer."""
    if part.rows is not None:
        if up.shape[0] != part.fused_rows:
            raise _shape_error(stem, part.module, module, down, up)
        up = up[part.rows]
    if part.swap_halves:
        half = up.shape[0] // 2
        up = torch.cat([up[half:], up[:half]])
    if part.pad_input and down.shape[1] < module.in_features:
        padded = down.new_zeros(down.shape[0], module.in_features)
        padded[:, : down.shape[1]] = down
        down = padded
    if down.shape[1] != module.in_features or up.shape[0] != module.out_features:
        raise _shape_error(stem, part.module, module, down, up)
    return down, up


def _shape_error(stem: str, name: str, module: nn.Linear, down: torch.Tensor, up: torch.Tensor) -> LoraError:
    return LoraError(
        f"does not fit this model: {stem} has in={down.shape[1]}, out={up.shape[0]} but {name} is "
        f"{module.in_features}->{module.out_features}; it was trained for another model "
        "(FLUX.1 dev/schnell LoRAs only)"
    )


def read_lora(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a .safetensors file, on CPU."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoraError(f"is not a readable .safetensors file ({exc})") from None


# --------------------------------------------------------------------------- the adapter manager


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
            log.info("LoRA memory cache: evicted %s", shown(evicted))

    def __contains__(self, key: str) -> bool:
        return key in self._items


@dataclass(frozen=True)
class Wanted:
    """One adapter a request asks for: its slot, the input it came from, reference and final scale."""

    slot: str
    field: str
    ref: str
    scale: float


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

    `resolve` turns a reference into a local .safetensors (the weight cache's `fetch`).
    `hotswap_rank`: set it when the transformers will be torch.compile'd (go_fast); new LoRAs then
    overwrite padded adapters of that rank instead of adding modules, so nothing recompiles.
    """

    def __init__(
        self,
        transformers: dict[str, nn.Module],
        text_encoder: nn.Module | None,
        resolve: Callable[[str], Path],
        memory_bytes: int = 2 << 30,
        hotswap_rank: int | None = None,
    ) -> None:
        self.transformers = transformers
        self.text_encoder = text_encoder
        self.resolve = resolve
        self.hotswap_rank = hotswap_rank
        self.cache = _Lru(memory_bytes)
        first = next(iter(transformers.values()))
        self.names = ModelNames.of(first, text_encoder)
        # component id -> slot -> identity (path:size:mtime) of the file loaded there
        self._loaded: dict[int, dict[str, str]] = {}
        self.loads = 0  # adapter loads so far (tests and the benchmark read it)

    def converted(self, ref: str, field: str) -> tuple[str, ConvertedLora]:
        """The file identity (path, size, mtime) a reference resolves to now, and its converted LoRA, from
        memory when that same file was read recently: a file replaced in place, or a new version behind an
        unversioned reference, is a new identity; a data: URI is never kept as a key."""
        start = time.perf_counter()
        try:
            path = self.resolve(ref)
        except LoraError:
            raise
        except UserError as exc:  # the cache's own message, tied to the input it came from
            raise LoraError(f"{field}: {exc}") from None
        stat = Path(path).stat()
        identity = f"{path}:{stat.st_size}:{stat.st_mtime_ns}"
        cached = self.cache.get(identity)
        if cached is not None:
            return identity, cached
        try:
            raw, metadata = read_lora(Path(path))
            lora = convert_lora(raw, self.names, metadata)
        except LoraError as exc:
            raise LoraError(f"{field}: the LoRA {shown(ref)!r} {exc}") from None
        self.cache.put(identity, lora)
        elapsed = time.perf_counter() - start
        log.info("Read LoRA %s (%s, %.1f MB) in %.2fs", shown(ref), lora.format, lora.nbytes / 1e6, elapsed)
        return identity, lora

    def wanted(
        self, main: LoraSpec | None, extra: LoraSpec | None, go_fast: bool, main_field: str = "replicate_weights"
    ) -> list[Wanted]:
        """The adapters a request asks for (`apply` counts the same file as main and extra once)."""
        out: list[Wanted] = []
        if main is not None:
            out.append(Wanted("main", main_field, main.ref, effective_scale(main.scale, go_fast)))
        if extra is not None:
            out.append(Wanted("extra", "extra_lora", extra.ref, effective_scale(extra.scale, go_fast)))
        return out

    def apply(self, model: str, wanted: list[Wanted]) -> None:
        """Make `model`'s transformer (and the shared CLIP) run exactly the wanted adapters."""
        start = time.perf_counter()
        loras: dict[str, tuple[Wanted, str, ConvertedLora]] = {}
        for want in wanted:
            identity, lora = self.converted(want.ref, want.field)
            # The same file under two spellings (owner/model, https://replicate.com/owner/model) counts once.
            if any(identity == other for _, other, _ in loras.values()):
                log.warning("%s is the same LoRA as the main one (%s): applying it once", want.field, shown(want.ref))
                continue
            loras[want.slot] = (want, identity, lora)
        wanted = [w for w, _, _ in loras.values()]
        components: list[tuple[nn.Module, str]] = [(self.transformers[model], "transformer")]
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
            ", ".join(f"{w.slot}={shown(w.ref)}@{w.scale:g}" for w in wanted) or "none",
            model, time.perf_counter() - start, " (loaded)" if changed else "",
        )

    def _ensure(self, module: nn.Module, kind: str, want: Wanted, identity: str, sd: dict[str, torch.Tensor]) -> bool:
        """Load the file `identity` into `want.slot` of `module` unless already there. True when something loaded."""
        slot, ref = want.slot, want.ref
        loaded = self._loaded.setdefault(id(module), {})
        if loaded.get(slot) == identity:
            return False
        hotswap = kind == "transformer" and self.hotswap_rank is not None
        rank = max((t.shape[0] for k, t in sd.items() if k.endswith("lora_A.weight")), default=0)
        if slot in loaded:
            if hotswap and rank > self.hotswap_rank:
                log.warning(
                    "LoRA %s has rank %d, above the hot-swap rank %d (FLUX_LORA_HOTSWAP_RANK): slow path, a compiled "
                    "model recompiles", shown(ref), rank, self.hotswap_rank,
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
            raise LoraError(f"{want.field}: the LoRA {shown(ref)!r} cannot be loaded ({kind}): {first}") from None
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
                "LoRA %s cannot hot-swap into %s (%s): slow path, a compiled model recompiles", shown(ref), slot, exc
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
