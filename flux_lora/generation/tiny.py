"""A tiny, randomly initialised FLUX store, built offline in seconds.

Same architectures and on-disk layout as the real store (diffusers layout, see weights/README.md),
toy sizes: the loading code the tests exercise is the production loading code. Deterministic:
the same seed writes the same weights.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import Unigram
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from flux_lora.generation.pipelines import quiet_loading_bars
from flux_lora.generation.safety import make_tiny_checkers
from flux_lora.weights.store import DEV_DIR, SCHNELL_DIR

TEXT_DIM = 32  # CLIP hidden size == pooled_projection_dim; T5 d_model == joint_attention_dim
SAMPLE_LORA = "sample-lora.safetensors"  # beside the models: the README's LoRA example, offline
_WORDS = (  # noqa: SIM905
    "a photo of the cat dog man woman portrait in style with on red blue green light dark tok "
    "painting film grain sunset city street forest mountain river car house sky night day"
).split()


def tiny_transformer(guidance_embeds: bool) -> FluxTransformer2DModel:
    """FLUX's MMDiT with one double and one single block, 2 heads of 16 channels."""
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 4 x 16 latent channels: 2x2 patches packed into the channel axis
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=TEXT_DIM,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 4, 8),
    )


def flux_vae(
    block_out_channels: tuple[int, ...] = (8, 8, 8, 8), layers_per_block: int = 1, norm_num_groups: int = 4
) -> AutoencoderKL:
    """FLUX's VAE shape (16 latent channels, 8x downsampling, no quant convs); tiny widths by default.

    The real one is `flux_vae((128, 256, 512, 512), 2, 32)`.
    """
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=block_out_channels,
        layers_per_block=layers_per_block,
        latent_channels=16,
        norm_num_groups=norm_num_groups,
        sample_size=32,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def tiny_clip_tokenizer(workdir: Path) -> CLIPTokenizer:
    """A byte-level BPE with every byte as a token and a few whole-word merges."""
    byte_chars = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    vocab: dict[str, int] = {}
    for token in [*byte_chars, *(c + "</w>" for c in byte_chars)]:
        vocab.setdefault(token, len(vocab))
    merges: list[str] = []
    for word in _WORDS:  # merge left to right into whole words
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            merged = parts[0] + parts[1]
            merges.append(f"{parts[0]} {parts[1]}")
            vocab.setdefault(merged, len(vocab))
            parts = [merged, *parts[2:]]
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    (workdir / "vocab.json").write_text(json.dumps(vocab))
    (workdir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return CLIPTokenizer(
        vocab_file=str(workdir / "vocab.json"), merges_file=str(workdir / "merges.txt"), model_max_length=77
    )


def tiny_t5_tokenizer() -> T5TokenizerFast:
    """A sentencepiece-style Unigram tokenizer: <pad>=0, </s>=1, <unk>=2, then words and letters."""
    pieces = ["<pad>", "</s>", "<unk>", *("▁" + w for w in _WORDS), "▁", *"abcdefghijklmnopqrstuvwxyz"]
    pieces = list(dict.fromkeys(pieces))
    vocab = [(p, 0.0 if i < 3 else -float(len(p) < 3) - 1.0) for i, p in enumerate(pieces)]
    tok = Tokenizer(Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0,
        model_max_length=512,
    )


def dev_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1-dev's scheduler: resolution-dependent shift."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def schnell_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1-schnell's scheduler: no shift."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)


def make_tiny_store(root: Path, seed: int = 0) -> Path:
    """Write dev, schnell (transformer + scheduler only) and tiny safety checkers under `root`."""
    quiet_loading_bars()
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        clip_tokenizer = tiny_clip_tokenizer(Path(tmp))
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=clip_tokenizer.vocab_size + 2,
            hidden_size=TEXT_DIM,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=TEXT_DIM,
            bos_token_id=clip_tokenizer.bos_token_id,
            eos_token_id=clip_tokenizer.eos_token_id,
            pad_token_id=clip_tokenizer.pad_token_id,
        )
    )
    t5_tokenizer = tiny_t5_tokenizer()
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tokenizer),
            d_model=TEXT_DIM,
            d_ff=64,
            d_kv=8,
            num_heads=4,
            num_layers=2,
            feed_forward_proj="gated-gelu",
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    dev = FluxPipeline(
        scheduler=dev_scheduler(),
        vae=flux_vae(),
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tokenizer,
        transformer=tiny_transformer(guidance_embeds=True),
    )
    dev.save_pretrained(root / DEV_DIR)

    schnell_dir = root / SCHNELL_DIR
    tiny_transformer(guidance_embeds=False).save_pretrained(schnell_dir / "transformer")
    schnell_scheduler().save_pretrained(schnell_dir / "scheduler")
    (schnell_dir / "model_index.json").write_text((root / DEV_DIR / "model_index.json").read_text())

    make_tiny_checkers(root)
    make_sample_lora(root / SAMPLE_LORA, dev.transformer)
    return root


def make_sample_lora(path: Path, transformer: FluxTransformer2DModel, rank: int = 4) -> Path:
    """A random LoRA (peft names, as Replicate's trainer writes them) on every attention projection of
    the tiny transformer, strong enough to change its image; trigger word "TOK" in its metadata."""
    gen = torch.Generator().manual_seed(1)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and ".attn." in name:
            prefix = f"transformer.{name}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=gen) / 4
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=gen) / 4
    save_file(tensors, path, metadata={"format": "pt", "modelspec.trigger_phrase": "TOK"})
    return path
