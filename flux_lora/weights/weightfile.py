"""Inspect weight files without torch: safetensors headers, LoRA-shaped keys, safe tar extraction.

A file is accepted only when its safetensors header parses, its tensor sizes and offsets add up to the
file's length exactly (a truncated download fails here), and its tensor names look like low-rank
adapter pairs. Pickle checkpoints are recognised by their bytes and refused, never unpickled.
"""

from __future__ import annotations

import json
import math
import re
import struct
import tarfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from flux_lora.lora import triggers
from flux_lora.errors import NotALoraError, WeightsError, WeightsNotFound, WeightsTooLarge

MAX_HEADER_BYTES = 100 * 1024 * 1024
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}
# Low-rank adapter tensors: peft A/B, kohya down/up, XLabs *_lora*.down/up, LyCORIS LoKr/LoHa.
_ADAPTER_DOWN = re.compile(r"(lora_A|lora_down|lora\.down|_lora\d*\.down|lora_linear_layer\.down)\b")
_ADAPTER_UP = re.compile(r"(lora_B|lora_up|lora\.up|_lora\d*\.up|lora_linear_layer\.up)\b")
_LYCORIS = re.compile(r"\.(lokr_w[12]|hada_w[12]_[ab])\b")
# Names a FLUX transformer LoRA uses (diffusers, BFL, kohya, XLabs), for choosing among several files.
_FLUX_HINT = re.compile(
    r"(single_transformer_blocks|transformer_blocks|double_blocks|single_blocks|lora_unet_(double|single)"
    r"|lora_transformer_)"
)


@dataclass(frozen=True)
class SafetensorsHeader:
    """The parsed header of a safetensors file: tensor names and the file length it implies."""

    tensors: dict[str, dict]
    metadata: dict[str, str]
    header_len: int
    data_len: int

    @property
    def total_len(self) -> int:
        return 8 + self.header_len + self.data_len


def sniff(head: bytes) -> str:
    """What the first bytes of a payload are: safetensors, tar, gzip, pickle, zip, html, or unknown."""
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    if head[:4] == b"PK\x03\x04":
        return "zip"
    text = head[:512].lstrip().lower()
    if text.startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<body")):
        return "html"
    if text.startswith(b"{") or text.startswith(b"["):
        return "json"
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= MAX_HEADER_BYTES and head[8:9] == b"{":
            return "safetensors"
    return "unknown"


_KIND_MESSAGES = {
    "pickle": "a pickle checkpoint (.ckpt/.pt/.bin), which is never loaded: use a .safetensors LoRA",
    "zip": "a zip/PyTorch checkpoint, which is never loaded: use a .safetensors LoRA",
    "html": "an HTML page (a login or error page?), not a weights file",
    "json": "a JSON document, not a weights file",
    "gzip": "a gzip file that is not a tar archive of a .safetensors",
    "tar": "a tar archive",
    "unknown": "not a safetensors file",
}


def read_header(f: BinaryIO, size: int | None = None, what: str = "the file") -> SafetensorsHeader:
    """Parse a safetensors header from `f` (at offset 0); checks dtypes, shapes and offsets agree."""
    head = f.read(8)
    if len(head) < 8:
        raise NotALoraError(f"{what} is empty or truncated (not a safetensors file)")
    (n,) = struct.unpack("<Q", head)
    if not 2 <= n <= MAX_HEADER_BYTES:
        raise NotALoraError(f"{what} is not a safetensors file")
    raw = f.read(n)
    if len(raw) < n:
        raise NotALoraError(f"{what} is truncated (its safetensors header is cut short)")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise NotALoraError(f"{what} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise NotALoraError(f"{what} is not a safetensors file (its header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    spans = []
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            expected = math.prod(shape) * DTYPE_BYTES[dtype]
        except (KeyError, TypeError, ValueError):
            raise NotALoraError(f"{what} has a malformed safetensors entry for {name!r}") from None
        if not (isinstance(begin, int) and isinstance(end, int)) or end - begin != expected or begin < 0:
            raise NotALoraError(f"{what} has inconsistent sizes for tensor {name!r}")
        spans.append((begin, end))
    spans.sort()
    position = 0
    for begin, end in spans:
        if begin != position:
            raise NotALoraError(f"{what} has overlapping or gapped tensor data (corrupt safetensors)")
        position = end
    parsed = SafetensorsHeader(header, metadata if isinstance(metadata, dict) else {}, n, position)
    if size is not None and size != parsed.total_len:
        state = "truncated" if size < parsed.total_len else "longer than its header says"
        raise NotALoraError(
            f"{what} is {state}: {size} bytes, its safetensors header describes {parsed.total_len}"
        )
    return parsed


def lora_problem(names: Iterable[str]) -> str | None:
    """None when the tensor names look like a LoRA; otherwise why not (with a few names as examples)."""
    names = list(names)
    if not names:
        return "it holds no tensors"
    down = any(_ADAPTER_DOWN.search(n) for n in names)
    up = any(_ADAPTER_UP.search(n) for n in names)
    if (down and up) or any(_LYCORIS.search(n) for n in names):
        return None
    sample = ", ".join(sorted(names)[:4])
    pairs = "lora_A/lora_B, lora_down/lora_up, lokr, hada"
    return f"its tensors are not low-rank adapter pairs ({pairs}): {sample}"


def looks_like_flux_lora(names: Iterable[str]) -> bool:
    names = list(names)
    return lora_problem(names) is None and any(_FLUX_HINT.search(n) for n in names)


def verify_lora_file(path: Path, what: str) -> SafetensorsHeader:
    """Check that `path` is a complete safetensors file of LoRA tensors; raise NotALoraError if not."""
    size = path.stat().st_size
    with path.open("rb") as f:
        kind = sniff(f.read(1024))
        f.seek(0)
        if kind not in ("safetensors", "unknown"):
            raise NotALoraError(f"{what} is {_KIND_MESSAGES[kind]}")
        header = read_header(f, size, what)
    problem = lora_problem(header.tensors)
    if problem:
        raise NotALoraError(f"{what} is not a LoRA: {problem}")
    return header


def file_kind(path: Path) -> str:
    with path.open("rb") as f:
        return sniff(f.read(1024))


# --- choosing the LoRA among several files -------------------------------------------------------------

SELECTION_RULE = (
    "the only .safetensors file; else the only one at the top level; else the only one whose name "
    "contains 'lora'; else the only one whose header looks like a FLUX LoRA"
)


def choose_lora(candidates: list[str], names_of: Callable[[str], Iterable[str] | None], where: str) -> str:
    """Pick the LoRA among `.safetensors` paths by SELECTION_RULE; fail listing them when undecided.

    `names_of(path)` returns the tensor names in that file's header (None when unreadable); it is only
    called when the names alone cannot decide, since it may cost a request per file.
    """
    files = sorted(c for c in candidates if c.lower().endswith(".safetensors"))
    if not files:
        shown = ", ".join(sorted(candidates)[:10]) or "nothing"
        raise WeightsNotFound(f"{where} holds no .safetensors file (found: {shown})")
    for narrow in (
        lambda fs: fs,
        lambda fs: [f for f in fs if "/" not in f],
        lambda fs: [f for f in fs if "lora" in PurePosixPath(f).name.lower()],
    ):
        chosen = narrow(files)
        if len(chosen) == 1:
            return chosen[0]
    flux = [f for f in files if looks_like_flux_lora(names_of(f) or ())]
    if len(flux) == 1:
        return flux[0]
    raise WeightsError(
        f"{where} holds several .safetensors files and the rule ({SELECTION_RULE}) cannot pick one: "
        f"{', '.join(files[:10])}; name the file in the reference"
    )


# --- tar archives ----------------------------------------------------------------------------------------


def _config_triggers(tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo]) -> list[str]:
    """Trigger words from the training configs (small YAML/JSON members) of an archive."""
    words: list[str] = []
    for name, member in members.items():
        if not name.lower().endswith(triggers.CONFIG_SUFFIXES) or member.size > triggers.MAX_CONFIG_BYTES:
            continue
        fileobj = tar.extractfile(member)
        if fileobj is not None:
            words += triggers.from_config(fileobj.read().decode("utf-8", "replace"))
    return list(dict.fromkeys(words))


def _safe_member(member: tarfile.TarInfo) -> bool:
    """Regular files that tarfile's "data" extraction filter passes (no name escaping the destination, no
    links or devices), and stricter still: no absolute name, `..` or drive part at all."""
    try:
        tarfile.data_filter(member, "/extract")
    except tarfile.FilterError:
        return False
    name = member.name
    parts = PurePosixPath(name).parts
    return member.isreg() and not name.startswith(("/", "\\")) and ".." not in parts and ":" not in parts[0]


def extract_lora_from_tar(archive: Path, dest: Path, max_bytes: int, what: str) -> tuple[str, list[str]]:
    """Copy the LoRA inside `archive` (a tar or tar.gz) to `dest`; return its name in the archive and the
    trigger words its training config names (Replicate's trainer tars hold one; see flux_lora.lora.triggers).

    Nothing is written under the archive's own names: the chosen member is streamed to `dest`, so
    absolute paths, `..` and links in the archive cannot write anywhere else.
    """
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            members = {m.name.lstrip("./") or m.name: m for m in tar.getmembers() if _safe_member(m)}

            def names_of(name: str) -> list[str] | None:
                fileobj = tar.extractfile(members[name])
                if fileobj is None:
                    return None
                try:
                    return list(read_header(fileobj, None, name).tensors)
                except WeightsError:
                    return None

            chosen = choose_lora(list(members), names_of, what)
            member = members[chosen]
            if member.size > max_bytes:
                too_big = f"{what}: {chosen} is {member.size} bytes, over the {max_bytes}-byte limit"
                raise WeightsTooLarge(too_big)
            source = tar.extractfile(member)
            assert source is not None  # a regular file always has a file object
            with dest.open("wb") as out:
                while chunk := source.read(1 << 20):
                    out.write(chunk)
            return chosen, _config_triggers(tar, members)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        if isinstance(exc, OSError) and not isinstance(exc, EOFError) and exc.errno is not None:
            raise
        raise NotALoraError(f"{what} is a damaged or truncated tar archive") from None
