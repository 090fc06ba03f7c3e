"""LoRA files in every format we read, written from a FLUX transformer's real names and shapes.

One random LoRA is described once in BFL (original FLUX) terms, `{bfl_module: (down, up)}` with
alpha folded in, and written out in each format: so the same adapter in two formats must give the
same image, which tests the conversions' semantics and not only that "something changed".
The mapping to diffusers names here is written independently of flux_lora/lora/formats.py (a test oracle).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

Lora = dict[str, tuple[torch.Tensor, torch.Tensor]]  # bfl module -> (down [r, in], up [out, r])


def flux_dims(transformer: nn.Module) -> tuple[int, int, int, int]:
    """(inner dim, mlp hidden, double blocks, single blocks) of a FluxTransformer2DModel."""
    cfg = transformer.config
    dim = cfg.num_attention_heads * cfg.attention_head_dim
    return dim, int(dim * 4), cfg.num_layers, cfg.num_single_layers


def bfl_shapes(transformer: nn.Module) -> dict[str, tuple[int, int]]:
    """(in, out) of the BFL modules LoRAs usually target."""
    dim, mlp, n_double, n_single = flux_dims(transformer)
    shapes: dict[str, tuple[int, int]] = {}
    for i in range(n_double):
        for stream in ("img", "txt"):
            shapes[f"double_blocks.{i}.{stream}_attn.qkv"] = (dim, 3 * dim)
            shapes[f"double_blocks.{i}.{stream}_attn.proj"] = (dim, dim)
            shapes[f"double_blocks.{i}.{stream}_mlp.0"] = (dim, mlp)
            shapes[f"double_blocks.{i}.{stream}_mlp.2"] = (mlp, dim)
    for i in range(n_single):
        shapes[f"single_blocks.{i}.linear1"] = (dim, 3 * dim + mlp)
        shapes[f"single_blocks.{i}.linear2"] = (dim + mlp, dim)
    return shapes


def random_lora(transformer: nn.Module, seed: int, rank: int = 4, strength: float = 0.5,
                only: tuple[str, ...] | None = None) -> Lora:
    """A random LoRA strong enough to change a tiny model's image visibly."""
    gen = torch.Generator().manual_seed(seed)
    out: Lora = {}
    for name, (fan_in, fan_out) in bfl_shapes(transformer).items():
        if only is not None and not any(part in name for part in only):
            continue
        down = torch.randn(rank, fan_in, generator=gen) / fan_in**0.5
        up = torch.randn(fan_out, rank, generator=gen) * strength / rank**0.5
        out[name] = (down, up)
    return out


def _diffusers_parts(name: str, transformer: nn.Module) -> list[tuple[str, int, int]]:
    """diffusers module and the rows [start, stop) of the fused BFL output it takes."""
    dim, mlp, _, _ = flux_dims(transformer)
    kind, i, rest = name.split(".", 2)
    if kind == "double_blocks":
        b = f"transformer_blocks.{i}."
        qkv = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
               "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
        if rest in qkv:
            return [(b + m, j * dim, (j + 1) * dim) for j, m in enumerate(qkv[rest])]
        one = {"img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out", "img_mlp.0": "ff.net.0.proj",
               "img_mlp.2": "ff.net.2", "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2"}
        rows = mlp if rest.endswith("mlp.0") else dim
        return [(b + one[rest], 0, rows)]
    b = f"single_transformer_blocks.{i}."
    if rest == "linear1":
        return [(b + "attn.to_q", 0, dim), (b + "attn.to_k", dim, 2 * dim), (b + "attn.to_v", 2 * dim, 3 * dim),
                (b + "proj_mlp", 3 * dim, 3 * dim + mlp)]
    return [(b + "proj_out", 0, dim)]


def _flat(name: str) -> str:
    return name.replace(".", "_")


def as_peft(lora: Lora, transformer: nn.Module, prefix: str = "transformer.") -> dict[str, torch.Tensor]:
    """ai-toolkit / Replicate trainer / SimpleTuner: diffusers names, lora_A/lora_B, no alpha."""
    out = {}
    for name, (down, up) in lora.items():
        for module, start, stop in _diffusers_parts(name, transformer):
            out[f"{prefix}{module}.lora_A.weight"] = down.clone()
            out[f"{prefix}{module}.lora_B.weight"] = up[start:stop].clone()
    return out


def as_kohya(lora: Lora, alpha_ratio: float = 0.5) -> dict[str, torch.Tensor]:
    """sd-scripts: lora_unet_<bfl_name_with_underscores>.lora_down/up + .alpha (alpha/rank applied)."""
    out = {}
    for name, (down, up) in lora.items():
        rank = down.shape[0]
        key = "lora_unet_" + _flat(name)
        out[f"{key}.lora_down.weight"] = down.clone()
        out[f"{key}.lora_up.weight"] = up / alpha_ratio  # alpha/rank = alpha_ratio scales it back
        out[f"{key}.alpha"] = torch.tensor(float(rank * alpha_ratio))
    return out


def as_comfyui(lora: Lora, prefix: str = "diffusion_model.") -> dict[str, torch.Tensor]:
    """ComfyUI: BFL names under `diffusion_model.` (or `model.diffusion_model.`), lora_A/lora_B, no marker."""
    out = {}
    for name, (down, up) in lora.items():
        out[f"{prefix}{name}.lora_A.weight"] = down.clone()
        out[f"{prefix}{name}.lora_B.weight"] = up.clone()
    return out


def as_comfyui_extracted(lora: Lora) -> dict[str, torch.Tensor]:
    """ComfyUI's "Extract and Save Lora" with its default bias_diff: lora_up/lora_down + alpha per BFL module
    under `diffusion_model.`, plus `.diff_b` (bias differences) and 1-D `.diff` (norm weight differences)."""
    out = {}
    for name, (down, up) in lora.items():
        key = f"diffusion_model.{name}"
        out |= {f"{key}.lora_down.weight": down.clone(), f"{key}.lora_up.weight": up.clone(),
                f"{key}.alpha": torch.tensor(float(down.shape[0])), f"{key}.diff_b": torch.full((up.shape[0],), 0.5)}
    out["diffusion_model.double_blocks.0.img_attn.norm.query_norm.scale.diff"] = torch.full((16,), 0.25)
    out["diffusion_model.final_layer.norm_final.diff"] = torch.full((32,), 0.25)
    return out


def as_mixture(lora: Lora, transformer: nn.Module) -> dict[str, torch.Tensor]:
    """The "mixture" form: diffusers names flattened under lora_transformer_, kohya down/up + alpha."""
    out = {}
    for name, (down, up) in lora.items():
        for module, start, stop in _diffusers_parts(name, transformer):
            key = "lora_transformer_" + _flat(module)
            out[f"{key}.lora_down.weight"] = down.clone()
            out[f"{key}.lora_up.weight"] = up[start:stop].clone()
            out[f"{key}.alpha"] = torch.tensor(float(down.shape[0]))
    return out


def as_xlabs(lora: Lora) -> dict[str, torch.Tensor]:
    """XLabs: attention processors of double blocks (lora1 = image, lora2 = text), down/up."""
    names = {"img_attn.qkv": "qkv_lora1", "img_attn.proj": "proj_lora1",
             "txt_attn.qkv": "qkv_lora2", "txt_attn.proj": "proj_lora2"}
    out = {}
    for name, (down, up) in lora.items():
        kind, i, rest = name.split(".", 2)
        if kind != "double_blocks" or rest not in names:
            raise ValueError(f"XLabs LoRAs cover double-block attention only, not {name}")
        out[f"double_blocks.{i}.processor.{names[rest]}.down.weight"] = down.clone()
        out[f"double_blocks.{i}.processor.{names[rest]}.up.weight"] = up.clone()
    return out


def clip_lora(text_encoder: nn.Module, seed: int, rank: int = 4, kohya: bool = False) -> dict[str, torch.Tensor]:
    """A CLIP text-encoder LoRA on every attention projection: `text_encoder.` (peft) or `lora_te1_` (kohya),
    named as the loaded CLIP names its modules: what a trainer on the same transformers writes. Files from
    older trainers spell CLIP differently: `clip_as` below writes those."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, module in text_encoder.named_modules():
        name = name.removesuffix(".base_layer")  # a layer peft wrapped counts as the layer itself
        if not isinstance(module, nn.Linear) or "self_attn" not in name or "lora_" in name:
            continue
        down = torch.randn(rank, module.in_features, generator=gen) / module.in_features**0.5
        up = torch.randn(module.out_features, rank, generator=gen) * 2.0
        if kohya:
            key = "lora_te1_" + _flat(name)
            out |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                    f"{key}.alpha": torch.tensor(float(rank))}
        else:
            out |= {f"text_encoder.{name}.lora_A.weight": down, f"text_encoder.{name}.lora_B.weight": up}
    return out


# CLIP text-encoder LoRAs as trainers write them. Keys are literal strings in each trainer's spelling (the
# `text_model.` of transformers < 5 included), never derived from the installed transformers' module names:
# that is what lets these fixtures see a renaming there. Modules are named relative to the CLIP encoder,
# `layers.{i}.self_attn.q_proj`, and shapes come from the config alone.
ClipLora = dict[str, tuple[torch.Tensor, torch.Tensor]]  # "layers.{i}.<module>" -> (down [r, in], up [out, r])
CLIP_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")


def random_clip_lora(config: object, seed: int, rank: int = 4, mlp: bool = True) -> ClipLora:
    """A random LoRA on CLIP's attention projections (and MLPs), sized from a CLIPTextConfig."""
    hidden, inner = config.hidden_size, config.intermediate_size
    shapes = {name: (hidden, hidden) for name in CLIP_ATTENTION}
    if mlp:
        shapes |= {"mlp.fc1": (hidden, inner), "mlp.fc2": (inner, hidden)}
    gen = torch.Generator().manual_seed(seed)
    out: ClipLora = {}
    for i in range(config.num_hidden_layers):
        for name, (fan_in, fan_out) in shapes.items():
            down = torch.randn(rank, fan_in, generator=gen) / fan_in**0.5
            out[f"layers.{i}.{name}"] = (down, torch.randn(fan_out, rank, generator=gen) * 2.0)
    return out


def clip_as(lora: ClipLora, spelling: str) -> dict[str, torch.Tensor]:
    """One CLIP LoRA in the key spelling of a trainer:

    - "kohya": sd-scripts (`networks/lora_flux.py`, LORA_PREFIX_TEXT_ENCODER_CLIP = "lora_te1"), down/up, alpha;
    - "diffusers": diffusers' FLUX DreamBooth script (`get_peft_model_state_dict` + `save_lora_weights`);
    - "simpletuner": the same through `convert_state_dict_to_diffusers`, which renames the attention
      projections' lora_A/lora_B to `lora_linear_layer.down/up` (MLPs keep lora_A/lora_B);
    - "comfyui": ComfyUI's LoraSave node, `text_encoders.` + its CLIP state-dict name, lora_down/lora_up.
    """
    out = {}
    for module, (down, up) in lora.items():
        dotted, flat = f"text_model.encoder.{module}", f"text_model_encoder_{_flat(module)}"
        if spelling == "kohya":
            key = f"lora_te1_{flat}"
            rank = down.shape[0]
            out |= {f"{key}.lora_down.weight": down.clone(), f"{key}.lora_up.weight": up / 0.5,
                    f"{key}.alpha": torch.tensor(rank * 0.5)}
        elif spelling == "diffusers":
            out |= {f"text_encoder.{dotted}.lora_A.weight": down.clone(),
                    f"text_encoder.{dotted}.lora_B.weight": up.clone()}
        elif spelling == "simpletuner":
            a, b = ("lora_linear_layer.down", "lora_linear_layer.up") if "self_attn" in module else ("lora_A", "lora_B")
            out |= {f"text_encoder.{dotted}.{a}.weight": down.clone(), f"text_encoder.{dotted}.{b}.weight": up.clone()}
        elif spelling == "comfyui":
            key = f"text_encoders.clip_l.transformer.{dotted}"
            out |= {f"{key}.lora_down.weight": down.clone(), f"{key}.lora_up.weight": up.clone()}
        else:
            raise ValueError(f"unknown CLIP LoRA spelling {spelling!r}")
    return out


CLIP_SPELLINGS = ("kohya", "diffusers", "simpletuner", "comfyui")


def t5_kohya(seed: int, d_model: int = 32, rank: int = 4) -> dict[str, torch.Tensor]:
    """sd-scripts' FLUX T5 part (`lora_te3_`), which the server skips."""
    gen = torch.Generator().manual_seed(seed)
    key = "lora_te3_encoder_block_0_layer_0_SelfAttention_q"
    return {f"{key}.lora_down.weight": torch.randn(rank, d_model, generator=gen),
            f"{key}.lora_up.weight": torch.randn(d_model, rank, generator=gen), f"{key}.alpha": torch.tensor(4.0)}


def sdxl_lora() -> dict[str, torch.Tensor]:
    """Keys of a kohya SDXL LoRA (original UNet names, two text encoders)."""
    return {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.randn(4, 640),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.randn(640, 4),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha": torch.tensor(4.0),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(4, 1280),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(1280, 4),
    }


def sd15_lora() -> dict[str, torch.Tensor]:
    """Keys of a diffusers-format SD 1.5 LoRA."""
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    return {f"{key}.lora_A.weight": torch.randn(4, 320), f"{key}.lora_B.weight": torch.randn(320, 4)}


def unmatched_lora() -> dict[str, torch.Tensor]:
    """LoRA-shaped, but naming modules no FLUX model has."""
    return {"transformer.nope.block.lora_A.weight": torch.randn(4, 32),
            "transformer.nope.block.lora_B.weight": torch.randn(32, 4)}


def dora_lora(transformer: nn.Module) -> dict[str, torch.Tensor]:
    lora = as_peft(random_lora(transformer, 9, only=("img_attn.proj",)), transformer)
    lora["transformer.transformer_blocks.0.attn.to_out.0.lora_magnitude_vector"] = torch.ones(32)
    return lora


def save(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path
