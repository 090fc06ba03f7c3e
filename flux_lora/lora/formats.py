"""FLUX LoRA formats: detect a file's format and convert it onto the loaded model's modules.

Every supported format (peft/diffusers, kohya/sd-scripts, ComfyUI `diffusion_model.`, the "mixture"
`lora_transformer_` form, XLabs `processor` keys, CLIP text-encoder LoRAs) is parsed into one
canonical form: per target module a `lora_A` (down) and `lora_B` (up) with alpha/rank already folded
into `lora_B`, so every adapter runs with scaling 1.0 times the user's scale. Fused BFL layers
(`qkv`, single-block `linear1`) are split with the widths read off the model itself, not the real
FLUX widths diffusers' converters assume. Keys that match nothing, or match another architecture,
are errors: a LoRA never runs silently as the base model. Adding a format is adding its prefixes or
names here; the adapter slots (`adapters.py`) only ever see the canonical form.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from flux_lora.errors import LoraError
from flux_lora.lora.names import ModelNames, Part, flat_name

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- parsing raw keys
# Suffix -> role. Longest first: ".lora.down.weight" must win over ".down.weight".
_SUFFIXES: tuple[tuple[str, str], ...] = (
    # diffusers' convert_state_dict_to_diffusers (SimpleTuner's text encoders): CLIP attention projections
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".down.weight", "down"), (".up.weight", "up"),
    (".alpha", "alpha"),
)
_DORA = ("dora_scale", "lora_magnitude_vector")
# LyCORIS variants, told by a key's last name (`<module>.hada_w1_a`) or the one before `.weight`
# (`<module>.lora_mid.weight`): never a substring test, `model.diffusion_model.` contains ".diff".
_LYCORIS_LAST_PREFIXES = ("hada_w", "hada_t", "lokr_w", "lokr_t", "oft_")
# ComfyUI's "Extract and Save Lora" (bias_diff, the default) writes lora_up/lora_down pairs plus differences
# an adapter cannot carry: `.diff_b` (a linear's bias) and 1-D `.diff` (a norm's weight). Those are dropped,
# named in a warning, as diffusers does; a 2-D `.diff` (a whole weight's difference) is refused.
_DIFF_BIAS, _DIFF = ".diff_b", ".diff"
_LYCORIS_WEIGHT_OF = ("lora_mid", "a1", "a2", "b1", "b2")
# Key fragments of other diffusion architectures (flattened: dots become underscores).
_SD_UNET, _SD_DIFFUSERS = "SDXL/SD 1.5 (original UNet names)", "Stable Diffusion (SD 1.5/SDXL UNet)"
_FOREIGN: tuple[tuple[str, str], ...] = (
    ("input_blocks_", _SD_UNET), ("output_blocks_", _SD_UNET), ("middle_block_", _SD_UNET),
    ("down_blocks_", _SD_DIFFUSERS), ("up_blocks_", _SD_DIFFUSERS), ("mid_block_", _SD_DIFFUSERS),
    ("joint_blocks_", "Stable Diffusion 3"), ("context_block_", "Stable Diffusion 3"),
)
# Prefixes that name where a key lives; stripped before matching module names.
_TRANSFORMER_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.",
                         "lora_unet_", "lora_transformer_", "unet.")
# CLIP as trainers write it: kohya/sd-scripts `lora_te1_`, SD-1.5-style `lora_te_` (ComfyUI reads it as
# clip_l), diffusers/SimpleTuner `text_encoder.`, ComfyUI's own saves `text_encoders.clip_l.transformer.`.
_CLIP_PREFIXES = ("lora_te1_", "lora_te_", "text_encoders.clip_l.transformer.", "text_encoder.", "te1.")
# T5: sd-scripts FLUX `lora_te3_` (`lora_te2_` in its first FLUX versions), diffusers, ComfyUI.
_T5_PREFIXES = ("lora_te2_", "lora_te3_", "text_encoder_2.", "text_encoders.t5xxl.transformer.", "te2.")


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


# --------------------------------------------------------------------------- conversion


@dataclass
class ConvertedLora:
    """A LoRA in diffusers/peft keys (`<module>.lora_A.weight`), alpha folded in, ready to load."""

    format: str
    transformer: dict[str, torch.Tensor] = field(default_factory=dict)
    text_encoder: dict[str, torch.Tensor] = field(default_factory=dict)
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (key or module, why it is not applied)
    alphas: dict[str, float] = field(default_factory=dict)  # module -> alpha, where the file gave one

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
    if last.startswith(_LYCORIS_LAST_PREFIXES):
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
            "is a LyCORIS LoRA (LoHa/LoKr/OFT keys); only plain LoRAs are supported: "
            "convert it to a standard LoRA or use another file"
        )


def _differences(raw: dict[str, torch.Tensor]) -> list[tuple[str, str]]:
    """ComfyUI's extracted differences, as (key, why it is dropped); a full weight difference is refused."""
    dropped = []
    for key, value in raw.items():
        if key.endswith(_DIFF_BIAS):
            dropped.append((key, "bias difference (.diff_b): an adapter carries no bias; dropped"))
        elif key.endswith(_DIFF):
            if value.ndim >= 2:
                raise LoraError(
                    f"holds full weight differences ({key}: a {tuple(value.shape)} `.diff` matrix, as LyCORIS "
                    "full or ComfyUI's full-difference extraction write), not a low-rank LoRA: extract it as a "
                    "LoRA (lora_up/lora_down) instead"
                )
            dropped.append((key, "norm weight difference (1-D .diff): an adapter carries no norm; dropped"))
    return dropped


def _foreign_architecture(stems: Iterable[str]) -> str | None:
    flat = [flat_name(s) for s in stems]
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
    dropped = _differences(raw)
    keys = [k for k in keys if not k.endswith((_DIFF_BIAS, _DIFF))]
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
    out = ConvertedLora(fmt, ignored=list(dropped))
    skipped_t5, unmatched = 0, list(unknown)
    out.ignored += [(key, "not a LoRA key (no lora_A/lora_B, lora_down/lora_up or alpha)") for key in unknown]
    for stem, entry in grouped.items():
        if entry.down is None or entry.up is None:
            unmatched.append(stem)
            out.ignored.append((stem, "an incomplete pair (a down or an up matrix is missing)"))
            continue
        _check_matrices(stem, entry.down, entry.up)
        if _strip(stem, _T5_PREFIXES) is not None:
            skipped_t5 += 1
            out.ignored.append((stem, "T5 text encoder: T5 LoRAs are not applied"))
            continue
        clip_name = _strip(stem, _CLIP_PREFIXES)
        if clip_name is not None:
            table, linears, target = names.clip, names.clip_linears, out.text_encoder
            name, component = clip_name, "text_encoder"
        else:
            table, linears, target = names.transformer, names.transformer_linears, out.transformer
            name, component = _strip(stem, _TRANSFORMER_PREFIXES) or stem, "transformer"
        parts = table.get(flat_name(name))
        if parts is None:
            unmatched.append(stem)
            out.ignored.append((stem, "matches no module of FLUX.1 (transformer or CLIP)"))
            continue
        rank = entry.down.shape[0]
        alpha = entry.alpha
        if alpha is None and component in meta:
            meta_alpha, pattern = meta[component]
            alpha = _pattern_alpha(pattern, name)
            alpha = meta_alpha if alpha is None else alpha
        scale = alpha / rank if alpha is not None else 1.0
        if alpha is not None:
            out.alphas[stem] = alpha
        for part in parts:
            down, up = _part_weights(stem, entry.down, entry.up, part, linears[part.module])
            target[f"{part.module}.lora_A.weight"] = down.contiguous()
            target[f"{part.module}.lora_B.weight"] = (up.float() * scale).to(up.dtype).contiguous()

    if skipped_t5:
        log.warning("LoRA (%s): skipping %d T5 text-encoder module(s); T5 LoRAs are not applied", fmt, skipped_t5)
    if dropped:
        log.warning(
            "LoRA (%s): dropping %d weight difference(s) an adapter cannot carry (bias .diff_b, norm .diff), e.g. %s",
            fmt, len(dropped), ", ".join(key for key, _ in dropped[:3]),
        )
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
    stem: str, down: torch.Tensor, up: torch.Tensor, part: Part, module: nn.Linear
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
