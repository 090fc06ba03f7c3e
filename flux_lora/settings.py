"""Environment configuration, read in one place so docs/configuration.md's table has one source."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _flag_on_by_default(name: str) -> bool:
    """On unless set to 0/false/no/off."""
    return os.environ.get(name, "").strip().lower() not in {"0", "false", "no", "off"}


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_size(text: str) -> int:
    """Bytes from "2147483648", "2GiB", "500 MB" (decimal k/M/G, binary KiB/MiB/GiB)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (use bytes, or a number with KiB/MiB/GiB or kB/MB/GB)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _host_ports(name: str) -> tuple[str, ...]:
    """The `host:port` entries of a comma-separated list (a flag value such as "1" holds none)."""
    entries = (e.strip().lower() for e in os.environ.get(name, "").split(","))
    return tuple(e for e in entries if re.fullmatch(r"\[?[\w.:-]+\]?:\d+", e))


def _size(name: str, default: str) -> int:
    return parse_size(os.environ.get(name) or default)


@dataclass(frozen=True)
class Settings:
    """Deployment settings; every field maps to one environment variable."""

    weights_dir: Path  # FLUX_LORA_WEIGHTS: the base-model store
    cache_dir: Path  # FLUX_LORA_CACHE: the LoRA weight cache
    offline: bool  # FLUX_LORA_OFFLINE: never download base weights
    compile: bool | None  # FLUX_LORA_COMPILE: 1 compiles go_fast even on CPU, 0 never; unset: CUDA only
    device: str | None  # FLUX_LORA_DEVICE: force "cpu" or "cuda"
    cache_max_bytes: int = 20 * 1024**3  # FLUX_LORA_CACHE_MAX_BYTES: LRU byte budget of the LoRA cache
    cache_min_free_bytes: int = 2 * 1024**3  # FLUX_LORA_CACHE_MIN_FREE_BYTES: evict to keep disk free
    max_download_bytes: int = 2 * 1024**3  # FLUX_LORA_MAX_DOWNLOAD_BYTES: refuse larger LoRA downloads
    download_connections: int = 8  # FLUX_LORA_DOWNLOAD_CONNECTIONS: parallel ranged requests per file
    download_timeout: float = 60.0  # FLUX_LORA_DOWNLOAD_TIMEOUT: seconds without data before a retry
    allow_private_urls: bool = False  # FLUX_LORA_ALLOW_PRIVATE_URLS=1: allow loopback/private hosts
    private_url_exceptions: tuple[str, ...] = ()  # FLUX_LORA_ALLOW_PRIVATE_URLS=host:port,...: only these
    lora_memory_bytes: int = 2 * 1024**3  # FLUX_LORA_MEMORY_CACHE_BYTES: converted LoRAs kept in RAM
    lora_max_rank: int | None = None  # FLUX_LORA_MAX_RANK: a compiled transformer's LoRA rank budget per layer (128)
    compile_backend: str = "inductor"  # FLUX_LORA_COMPILE_BACKEND: torch.compile backend ("eager": guards only)
    local_lora_dirs: tuple[Path, ...] = ()  # FLUX_LORA_LOCAL_LORA_DIRS: folders request fields may name files in
    ref_recheck_seconds: float = 60.0  # FLUX_LORA_REF_RECHECK_SECONDS: re-pin unversioned refs this often
    output_metadata: bool = True  # FLUX_LORA_OUTPUT_METADATA: 0 writes no generation parameters into images
    auto_trigger: bool = False  # FLUX_LORA_AUTO_TRIGGER: 1 prepends a LoRA's missing trigger words to the prompt

    # Read at each call, never frozen at start: endpoints and tokens may change while the process runs.

    @staticmethod
    def log_level() -> str:
        """FLUX_LORA_LOG_LEVEL: the level of our log records (INFO)."""
        return (os.environ.get("FLUX_LORA_LOG_LEVEL") or "INFO").upper()

    @staticmethod
    def cog_weights() -> str | None:
        """COG_WEIGHTS: the trained variant's LoRA, as `flux-lora predict` hands it to setup."""
        return Settings.token("COG_WEIGHTS")

    @staticmethod
    def hub_endpoint() -> str | None:
        """HF_ENDPOINT: a Hugging Face Hub mirror (None: huggingface.co)."""
        return os.environ.get("HF_ENDPOINT") or None

    @staticmethod
    def hub_secrets() -> list[str]:
        """Every Hub token in the environment (HF_TOKEN, HUGGING_FACE_HUB_TOKEN): masked in messages."""
        return [v for v in (os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")) if v]

    @staticmethod
    def replicate_url() -> str:
        """FLUX_LORA_REPLICATE_URL: where Replicate model references are fetched from."""
        return (os.environ.get("FLUX_LORA_REPLICATE_URL") or "https://replicate.com").rstrip("/")

    @staticmethod
    def civitai_url() -> str:
        """FLUX_LORA_CIVITAI_URL: where CivitAI references are resolved and fetched."""
        return (os.environ.get("FLUX_LORA_CIVITAI_URL") or "https://civitai.com").rstrip("/")

    @staticmethod
    def token(name: str) -> str | None:
        """A credential, None when unset: HF_TOKEN (private and gated Hub repos), REPLICATE_API_TOKEN (sent to
        Replicate only), CIVITAI_API_TOKEN (sent to CivitAI as a header)."""
        return os.environ.get(name) or None

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
            cache_max_bytes=_size("FLUX_LORA_CACHE_MAX_BYTES", "20GiB"),
            cache_min_free_bytes=_size("FLUX_LORA_CACHE_MIN_FREE_BYTES", "2GiB"),
            max_download_bytes=_size("FLUX_LORA_MAX_DOWNLOAD_BYTES", "2GiB"),
            download_connections=max(1, int(os.environ.get("FLUX_LORA_DOWNLOAD_CONNECTIONS") or 8)),
            download_timeout=float(os.environ.get("FLUX_LORA_DOWNLOAD_TIMEOUT") or 60),
            allow_private_urls=_flag("FLUX_LORA_ALLOW_PRIVATE_URLS"),
            private_url_exceptions=_host_ports("FLUX_LORA_ALLOW_PRIVATE_URLS"),
            lora_memory_bytes=_size("FLUX_LORA_MEMORY_CACHE_BYTES", "2GiB"),
            lora_max_rank=int(os.environ.get("FLUX_LORA_MAX_RANK") or 0) or None,
            compile_backend=os.environ.get("FLUX_LORA_COMPILE_BACKEND") or "inductor",
            ref_recheck_seconds=float(os.environ.get("FLUX_LORA_REF_RECHECK_SECONDS") or 60),
            output_metadata=_flag_on_by_default("FLUX_LORA_OUTPUT_METADATA"),
            auto_trigger=_flag("FLUX_LORA_AUTO_TRIGGER"),
            local_lora_dirs=tuple(
                Path(d) for d in os.environ.get("FLUX_LORA_LOCAL_LORA_DIRS", "").split(os.pathsep) if d.strip()
            ),
        )
