"""The loaded model's module names, and where a LoRA written against other names goes.

Trainers name FLUX modules three ways (diffusers, BFL's original `double_blocks`, kohya's flattened
forms) and CLIP two ways (with and without transformers < 5's `text_model.`). `ModelNames` maps every
spelling onto the loaded model's own linear layers, with fused BFL layers (`qkv`, `linear1`) split by
the widths read off the model, so conversion (`formats.py`) never assumes the real FLUX sizes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

# transformers < 5 named CLIPTextModel's modules `text_model.encoder...`, as files still spell them; 5 dropped it.
_CLIP_TEXT_MODEL = "text_model."


def flat_name(name: str) -> str:
    """A module name as kohya and friends flatten it (dots become underscores)."""
    return name.replace(".", "_")


@dataclass(frozen=True)
class Part:
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


def _split_rows(modules: dict[str, nn.Linear], names: list[str]) -> list[Part]:
    total = sum(modules[name].out_features for name in names)
    parts, start = [], 0
    for name in names:
        size = modules[name].out_features
        parts.append(Part(name, slice(start, start + size), fused_rows=total))
        start += size
    return parts


def _bfl_table(linears: dict[str, nn.Linear]) -> dict[str, list[Part]]:
    """BFL (original FLUX) module names -> diffusers modules, widths read off the loaded model."""
    table: dict[str, list[Part]] = {}
    blocks = sorted({int(m.group(1)) for n in linears if (m := re.match(r"transformer_blocks\.(\d+)\.", n))})
    singles = sorted({int(m.group(1)) for n in linears if (m := re.match(r"single_transformer_blocks\.(\d+)\.", n))})
    for i in blocks:
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        table[b + "img_attn.qkv"] = _split_rows(linears, [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"])
        table[b + "txt_attn.qkv"] = _split_rows(
            linears, [d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"]
        )
        for bfl, ours in (
            ("img_attn.proj", "attn.to_out.0"), ("txt_attn.proj", "attn.to_add_out"),
            ("img_mlp.0", "ff.net.0.proj"), ("img_mlp.2", "ff.net.2"),
            ("txt_mlp.0", "ff_context.net.0.proj"), ("txt_mlp.2", "ff_context.net.2"),
            ("img_mod.lin", "norm1.linear"), ("txt_mod.lin", "norm1_context.linear"),
        ):
            table[b + bfl] = [Part(d + ours)]
        # XLabs attention processors: lora1 = image stream, lora2 = text stream.
        table[b + "processor.qkv_lora1"] = table[b + "img_attn.qkv"]
        table[b + "processor.proj_lora1"] = table[b + "img_attn.proj"]
        table[b + "processor.qkv_lora2"] = table[b + "txt_attn.qkv"]
        table[b + "processor.proj_lora2"] = table[b + "txt_attn.proj"]
    for i in singles:
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        qkv = [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"]
        table[b + "linear1"] = _split_rows(linears, [*qkv, d + "proj_mlp"])
        table[b + "linear2"] = [Part(d + "proj_out")]
        table[b + "modulation.lin"] = [Part(d + "norm.linear")]
        table[b + "processor.qkv_lora"] = _split_rows(linears, qkv)
        # XLabs' single-block proj LoRA reads the attention output only: the first columns of proj_out's input.
        table[b + "processor.proj_lora"] = [Part(d + "proj_out", pad_input=True)]
    for bfl, ours in (
        ("img_in", "x_embedder"), ("txt_in", "context_embedder"), ("final_layer.linear", "proj_out"),
        ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
        ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
        ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
        ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
        ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
        ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
    ):
        if ours in linears:
            table[bfl] = [Part(ours)]
    if "norm_out.linear" in linears:
        table["final_layer.adaLN_modulation.1"] = [Part("norm_out.linear", swap_halves=True)]
    return table


@dataclass(frozen=True)
class ModelNames:
    """Flattened module names of the loaded model -> where a LoRA on them goes. Built once per model."""

    transformer: dict[str, list[Part]]
    transformer_linears: dict[str, nn.Linear]
    clip: dict[str, list[Part]]
    clip_linears: dict[str, nn.Linear]

    @classmethod
    def of(cls, transformer: nn.Module, text_encoder: nn.Module | None) -> ModelNames:
        t_lin = _linears(transformer)
        t_table = {flat_name(name): [Part(name)] for name in t_lin}
        t_table.update({flat_name(name): parts for name, parts in _bfl_table(t_lin).items()})
        c_lin = _linears(text_encoder) if text_encoder is not None else {}
        c_table = {}
        for name in c_lin:  # each CLIP module under both spellings, whichever the loaded transformers uses
            bare = name.removeprefix(_CLIP_TEXT_MODEL)
            c_table[flat_name(bare)] = c_table[flat_name(_CLIP_TEXT_MODEL + bare)] = [Part(name)]
        return cls(t_table, t_lin, c_table, c_lin)
