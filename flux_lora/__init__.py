"""flux-lora: a Cog prediction server for FLUX.1 LoRA models (Replicate-compatible)."""

__version__ = "0.1.0"
