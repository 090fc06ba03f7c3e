"""The base-model store: which Hub files each model needs, whether they are all on disk, and fetching them.

No torch here: `setup()` calls `ensure_store` before any weights are loaded, and the CLI runs it bare.
A model counts as present only when every file a pipeline reads is there and every `.safetensors` file
is exactly as long as its own header says (so a truncated shard is never loaded), and every shard an
index names holds the tensors the index says it does.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from flux_lora.errors import NotALoraError, UserError
from flux_lora.weights.hub import HubFailure, download_snapshot, hub_failure, token_configured
from flux_lora.settings import Settings
from flux_lora.weights.weightfile import read_header

log = logging.getLogger(__name__)

DEV_DIR = "FLUX.1-dev"
SCHNELL_DIR = "FLUX.1-schnell"
SAFETY_CHECKER_DIR = "safety-checker"
FALCON_DIR = "falcon-nsfw"
LORA_CACHE_DIR = "lora-cache"
COMPLETE_MARKER = ".complete"
LOCKS_DIR = ".locks"

HUB_URL = "https://huggingface.co"


class StoreError(UserError):
    """The base weights are missing or cannot be fetched; the message says what to run or set."""


@dataclass(frozen=True)
class BaseModel:
    """One Hub repository and the part of it the pipelines use."""

    key: str  # the name `--models` and error messages use
    repo_id: str
    folder: str  # under the store root
    allow_patterns: tuple[str, ...]  # what to download: the diffusers layout, never single-file checkpoints
    required: tuple[str, ...]  # JSON files that must exist and parse
    weights: tuple[str, ...]  # folders ("" = the model folder) whose safetensors must all verify
    gated: bool = False


_DEV_COMPONENTS = (
    "scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "transformer", "vae"
)
_VIT_FILES = ("config.json", "preprocessor_config.json")

MODELS: dict[str, BaseModel] = {
    m.key: m
    for m in (
        BaseModel(
            key="dev",
            repo_id="black-forest-labs/FLUX.1-dev",
            folder=DEV_DIR,
            allow_patterns=("model_index.json", *(f"{c}/*" for c in _DEV_COMPONENTS)),
            required=(
                "model_index.json",
                "scheduler/scheduler_config.json",
                "text_encoder/config.json",
                "text_encoder_2/config.json",
                "tokenizer/tokenizer_config.json",
                "tokenizer_2/tokenizer_config.json",
                "transformer/config.json",
                "vae/config.json",
            ),
            weights=("text_encoder", "text_encoder_2", "transformer", "vae"),
            gated=True,
        ),
        # Only what differs from dev: the pipeline borrows dev's VAE, text encoders and tokenizers.
        BaseModel(
            key="schnell",
            repo_id="black-forest-labs/FLUX.1-schnell",
            folder=SCHNELL_DIR,
            allow_patterns=("model_index.json", "transformer/*", "scheduler/*"),
            required=("model_index.json", "scheduler/scheduler_config.json", "transformer/config.json"),
            weights=("transformer",),
        ),
        BaseModel(
            key="safety-checker",
            repo_id="CompVis/stable-diffusion-safety-checker",
            folder=SAFETY_CHECKER_DIR,
            allow_patterns=(*_VIT_FILES, "model.safetensors"),
            required=_VIT_FILES,
            weights=("",),
        ),
        BaseModel(
            key="falcon-nsfw",
            repo_id="Falconsai/nsfw_image_detection",
            folder=FALCON_DIR,
            allow_patterns=(*_VIT_FILES, "model.safetensors"),
            required=_VIT_FILES,
            weights=("",),
        ),
    )
}
FLUX_MODELS = ("dev", "schnell")
SAFETY_MODELS = ("safety-checker", "falcon-nsfw")
# Never fetched even if a matching folder holds them: pickles and other formats we do not load.
_IGNORE_PATTERNS = (
    "*.bin", "*.pt", "*.pth", "*.ckpt", "*.msgpack", "*.h5", "*.onnx", "*.onnx_data", "*.gguf"
)


# --- verification (local, no network) -------------------------------------------------------------------


def safetensors_problem(path: Path, expect_tensors: Iterable[str] = ()) -> str | None:
    """Why a .safetensors file cannot be used (missing, truncated, bad header), or None when whole.

    The header gives each tensor's byte range, so the right file size is known without the Hub.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            header = read_header(f, None, "it")  # the LoRA cache's parser: dtypes, shapes and offsets agree
    except FileNotFoundError:
        return "missing"
    except NotALoraError as exc:
        return str(exc)
    if size != header.total_len:
        return f"{size} bytes, its header says {header.total_len}"
    absent = sorted(set(expect_tensors) - header.tensors.keys())
    if absent:
        return f"lacks {len(absent)} tensor(s) its index puts there, e.g. {absent[0]}"
    return None


def _weights_problems(folder: Path, prefix: str) -> dict[str, str]:
    """Problems with the safetensors weights of one component folder (sharded or single file)."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    wanted: dict[str, set[str]] = {}
    problems: dict[str, str] = {}
    for index in indexes:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            problems[prefix + index.name] = f"unreadable index ({type(exc).__name__})"
            continue
        for tensor, shard in weight_map.items():
            wanted.setdefault(shard, set()).add(tensor)
    if not indexes:
        wanted = {p.name: set() for p in folder.glob("*.safetensors")}
    if not wanted and not problems:
        return {prefix + "*.safetensors": "missing"}
    for name, tensors in sorted(wanted.items()):
        problem = safetensors_problem(folder / name, tensors)
        if problem:
            problems[prefix + name] = problem
    return problems


def model_problems(root: Path, model: BaseModel) -> dict[str, str]:
    """Each missing or damaged file of one model, by path in its folder; empty when it can be loaded."""
    folder = root / model.folder
    if not folder.is_dir():
        return {".": "not downloaded"}
    problems = {}
    for name in model.required:
        try:
            json.loads((folder / name).read_text())
        except FileNotFoundError:
            problems[name] = "missing"
        except (OSError, ValueError):
            problems[name] = "unreadable"
    for sub in model.weights:
        problems |= _weights_problems(folder / sub, f"{sub}/" if sub else "")
    return problems


def describe(problems: dict[str, str], limit: int = 3) -> str:
    """`transformer/x.safetensors: missing; ...` for an error message, the first few only."""
    text = "; ".join(why if path == "." else f"{path}: {why}" for path, why in list(problems.items())[:limit])
    return text + (f" (and {len(problems) - limit} more)" if len(problems) > limit else "")


def _download_unfinished(folder: Path) -> bool:
    """A download started here (huggingface_hub keeps its records in .cache/) and never finished.

    Verification alone cannot see a small file (a tokenizer's vocab) that a killed download never
    fetched; the marker written after a finished download can. A folder placed by other means (a copy,
    `flux-lora make-tiny`) has no download records and is judged by verification alone.
    """
    return (folder / ".cache" / "huggingface").is_dir() and not (folder / COMPLETE_MARKER).is_file()


def store_problems(root: Path, model: BaseModel) -> dict[str, str]:
    """`model_problems`, plus an interrupted download; empty when the model can be served."""
    problems = model_problems(root, model)
    if not problems and _download_unfinished(root / model.folder):
        problems = {".": "download interrupted"}
    return problems


def is_complete(root: Path, model: BaseModel) -> bool:
    """Whether the model is whole: verified, and not the remains of an interrupted download."""
    return not store_problems(root, model)


def _mark_complete(root: Path, model: BaseModel, revision: str | None) -> None:
    """Record what was verified (repo, commit, file sizes) so `ls` and humans can tell what is there."""
    folder = root / model.folder
    files = {
        p.relative_to(folder).as_posix(): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    }
    marker = {"repo_id": model.repo_id, "revision": revision, "files": files}
    tmp = folder / f"{COMPLETE_MARKER}.tmp"
    tmp.write_text(json.dumps(marker, indent=1))
    tmp.replace(folder / COMPLETE_MARKER)


# --- selection and the command to run -------------------------------------------------------------------


def select_models(models: Sequence[str] = FLUX_MODELS, *, safety: bool = True) -> list[BaseModel]:
    """The store entries a deployment needs: the chosen FLUX models, plus both safety checkers."""
    unknown = [m for m in models if m not in FLUX_MODELS]
    if unknown:
        raise StoreError(f"--models: unknown model {unknown[0]!r}; allowed: {', '.join(FLUX_MODELS)}")
    return [MODELS[k] for k in dict.fromkeys(models)] + ([MODELS[k] for k in SAFETY_MODELS] if safety else [])


def parse_models(value: str) -> list[str]:
    """`--models dev,schnell` -> ["dev", "schnell"], validated."""
    models = [m.strip() for m in value.split(",") if m.strip()]
    if not models:
        raise StoreError(f"--models: give at least one of {', '.join(FLUX_MODELS)}")
    select_models(models)
    return models


def download_command(root: Path, models: Sequence[str], safety: bool) -> str:
    """The shell command that fills `root` with what `ensure_store(root, models, safety)` needs."""
    flags = (f" --models {','.join(models)}" if models else "") + ("" if safety else " --no-safety")
    return f"FLUX_LORA_WEIGHTS={root} flux-lora weights download-base{flags}"


# --- downloading ----------------------------------------------------------------------------------------


def _endpoint() -> str:
    """The Hub to use: HF_ENDPOINT (a mirror, a test server) read now rather than at import time."""
    return (Settings.hub_endpoint() or HUB_URL).rstrip("/")


def _access_error(model: BaseModel, status: int | None) -> StoreError:
    """Why a gated repo refused us, and the two things to do about it."""
    page = f"{_endpoint()}/{model.repo_id}"
    if not token_configured():
        return StoreError(
            f"{model.repo_id} is gated: set HF_TOKEN to a Hugging Face access token (read access) "
            f"and accept the licence on {page}"
        )
    return StoreError(
        f"HF_TOKEN was refused for {model.repo_id} (HTTP {status}): accept the licence on {page} "
        "with the account that owns the token, and check the token has read access"
    )


def _download_error(model: BaseModel, endpoint: str, failure: HubFailure) -> StoreError:
    """The one-line error for a failed download of a base model; every one of them can be resumed."""
    # Without a token the Hub answers 401 "not found" for a gated repo, so gating is decided here.
    if failure.kind == "gated" or (model.gated and failure.kind in ("repo", "denied") and failure.status in (401, 403)):
        return _access_error(model, failure.status)
    if failure.kind == "repo":
        return StoreError(f"{model.repo_id} not found on {endpoint} (HTTP {failure.status})")
    if failure.kind == "unreachable":
        return StoreError(f"could not reach {endpoint} for {model.repo_id}: {failure.detail}; run again to resume")
    return StoreError(f"could not download {model.repo_id} from {endpoint}: {failure.detail}; run again to resume")


def _quiet_http_logs() -> None:
    """One INFO line per HTTP request drowns the per-model progress; keep those at WARNING unless set."""
    for name in ("httpx", "httpx2"):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)


def _clean_partials(folder: Path) -> None:
    """Drop temporary files a killed download left behind (we hold the model's lock: none is live)."""
    for tmp in (folder / ".cache" / "huggingface").rglob("*.incomplete"):
        tmp.unlink(missing_ok=True)


def download_model(root: Path, model: BaseModel) -> None:
    """Fetch one model's diffusers-layout files into the store, then verify and mark it complete.

    Files already downloaded are kept (huggingface_hub records their commit and etag beside them), so
    an interrupted run resumes where it stopped; a dropped connection mid-file resumes with a range
    request. Another process downloading the same model is waited for, not raced.
    """
    folder = root / model.folder
    _quiet_http_logs()
    (root / LOCKS_DIR).mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / LOCKS_DIR / f"{model.folder}.lock")):
        if is_complete(root, model):
            return
        (folder / COMPLETE_MARKER).unlink(missing_ok=True)
        if folder.is_dir():
            _clean_partials(folder)
            # A damaged file whose download was recorded as finished would otherwise be kept as is.
            for path in model_problems(root, model):
                if (folder / path).is_file():
                    log.warning("%s: removing damaged %s", model.folder, path)
                    (folder / path).unlink()
        endpoint = _endpoint()
        log.info("%s: downloading %s from %s", model.folder, model.repo_id, endpoint)
        started = time.monotonic()
        try:
            revision = download_snapshot(
                model.repo_id, endpoint, folder, list(model.allow_patterns), list(_IGNORE_PATTERNS)
            )
        except Exception as exc:
            failure = hub_failure(exc)
            if failure is None:
                raise
            raise _download_error(model, endpoint, failure) from None
        problems = model_problems(root, model)
        if problems:
            raise StoreError(
                f"{model.repo_id} from {endpoint} is incomplete after download: {describe(problems)}"
            )
        _mark_complete(root, model, revision)
        size = sum(json.loads((folder / COMPLETE_MARKER).read_text())["files"].values())
        log.info("%s: complete, %.2f GB in %.1f s", model.folder, size / 1e9, time.monotonic() - started)


def ensure_store(
    root: Path, *, models: Sequence[str] = FLUX_MODELS, safety: bool = True, offline: bool = False
) -> None:
    """Make sure every base model a deployment needs is whole in `root`, downloading what is not.

    With `offline` (FLUX_LORA_OFFLINE=1) nothing is downloaded: a missing or damaged model raises a
    StoreError naming the command that fills the store.
    """
    root = Path(root)
    wanted = select_models(models, safety=safety)
    missing = [m for m in wanted if not is_complete(root, m)]
    if not missing:
        return
    if offline:
        details = "; ".join(f"{m.folder} ({describe(store_problems(root, m), 1)})" for m in missing)
        raise StoreError(
            f"base weights incomplete in {root}: {details}. FLUX_LORA_OFFLINE=1 forbids downloading; "
            f"run `{download_command(root, models, safety)}` first"
        )
    for model in missing:
        download_model(root, model)
