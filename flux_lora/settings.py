"""Environment configuration, read in one place so the README's table has one source."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class Settings:
    """Deployment settings; every field maps to one environment variable."""

    weights_dir: Path  # FLUX_LORA_WEIGHTS: the base-model store
    cache_dir: Path  # FLUX_LORA_CACHE: the LoRA weight cache
    offline: bool  # FLUX_LORA_OFFLINE: never download base weights
    compile: bool | None  # FLUX_LORA_COMPILE: 1 compiles go_fast even on CPU, 0 never; unset: CUDA only
    device: str | None  # FLUX_LORA_DEVICE: force "cpu" or "cuda"

    @classmethod
    def from_env(cls) -> Settings:
        weights = Path(os.environ.get("FLUX_LORA_WEIGHTS") or "weights")
        cache = os.environ.get("FLUX_LORA_CACHE")
        return cls(
            weights_dir=weights,
            cache_dir=Path(cache) if cache else weights / "lora-cache",
            offline=_flag("FLUX_LORA_OFFLINE"),
            compile=_flag("FLUX_LORA_COMPILE") if os.environ.get("FLUX_LORA_COMPILE", "").strip() else None,
            device=os.environ.get("FLUX_LORA_DEVICE") or None,
        )
