"""Trigger words: what a LoRA was trained to respond to, read from the LoRA's own data (no torch).

"My LoRA does nothing" usually means a prompt without the trigger word. Only explicit trigger fields
count, never caption tag frequencies (`ss_tag_frequency`), which name every tag the captions held:
- the training config inside Replicate trainer tars (ai-toolkit's `config.yaml`:
  `config.process[].trigger_word`), or any YAML/JSON config in the archive with a `trigger_word`;
- safetensors metadata keys trainers and converters write: `METADATA_KEYS`.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Sequence

import yaml

log = logging.getLogger(__name__)

# The ModelSpec standard's key (sd-scripts' sai_model_spec, SimpleTuner), then the plain spellings
# other trainers and converters write (ai-toolkit-style configs, CivitAI exports).
METADATA_KEYS = ("modelspec.trigger_phrase", "trigger_word", "trigger_words", "trigger_phrase")
CONFIG_KEY = "trigger_word"  # ai-toolkit (Replicate's FLUX trainer) and most YAML trainer configs
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
MAX_CONFIG_BYTES = 1 << 20  # a training config is a few kB; larger members are not read
_MAX_WORD = 200  # characters: a longer "trigger word" is a caption, not a trigger


def _words(value: object) -> list[str]:
    """A field's trigger words: a string (comma separated) or a list of strings."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):  # some tools write a JSON list into a string field
            try:
                return _words(json.loads(text))
            except ValueError:
                pass
        items: Iterable[object] = text.split(",")
    elif isinstance(value, list):
        items = value
    else:
        return []
    return [w for item in items if isinstance(item, str) and 0 < len(w := item.strip()) <= _MAX_WORD]


def _unique(words: Iterable[str]) -> list[str]:
    seen: dict[str, str] = {}
    for word in words:
        seen.setdefault(word.casefold(), word)
    return list(seen.values())


def from_metadata(metadata: dict[str, str]) -> list[str]:
    """Trigger words from a safetensors header's `__metadata__`."""
    return _unique(w for key in METADATA_KEYS for w in _words(metadata.get(key)))


def _find(node: object, depth: int = 0) -> Iterable[str]:
    if depth > 8:
        return
    if isinstance(node, dict):
        for key, value in node.items():
            if key == CONFIG_KEY:
                yield from _words(value)
            else:
                yield from _find(value, depth + 1)
    elif isinstance(node, list):
        for item in node:
            yield from _find(item, depth + 1)


def from_config(text: str) -> list[str]:
    """Trigger words from a training config (YAML or JSON); nothing when it does not parse."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return []
    return _unique(_find(data))


def missing(prompt: str, words: Iterable[str]) -> list[str]:
    """The trigger words `prompt` does not contain (case insensitive, whole words where they are words)."""
    folded = prompt.casefold()
    out = []
    for word in words:
        pattern = re.escape(word.casefold())
        if word[:1].isalnum():
            pattern = r"(?<!\w)" + pattern
        if word[-1:].isalnum():
            pattern += r"(?!\w)"
        if not re.search(pattern, folded):
            out.append(word)
    return out


def with_triggers(prompt: str, words: Iterable[str]) -> str:
    """`prompt` with its missing trigger words in front (FLUX_LORA_AUTO_TRIGGER)."""
    absent = missing(prompt, words)
    if not absent:
        return prompt
    return ", ".join([*absent, prompt.strip()]) if prompt.strip() else ", ".join(absent)


def check_prompt(prompt: str, loras: Sequence[tuple[str, str, Sequence[str]]], auto: bool) -> str:
    """Log each LoRA's trigger words and warn about those `prompt` lacks; the prompt to run.

    `loras` holds (input field, reference as shown, trigger words) for main then extra. The prompt is
    never changed unless `auto` (FLUX_LORA_AUTO_TRIGGER=1), which prepends each LoRA's missing words,
    main and extra separately, and logs it.
    """
    prefix: list[str] = []
    for field, shown, words in loras:
        if not words:
            continue
        log.info("%s %s: trigger word%s %s", field, shown, "s" if len(words) > 1 else "", _listed(words))
        absent = [w for w in missing(prompt, words) if w not in prefix]
        if not absent:
            continue
        if auto:
            prefix += absent
            log.info("Prepended %s (%s) to the prompt (FLUX_LORA_AUTO_TRIGGER=1)", _listed(absent), field)
        else:
            log.warning(
                "The prompt does not contain %s, the trigger word%s of %s: the LoRA may have little effect. "
                "Add it to the prompt (or set FLUX_LORA_AUTO_TRIGGER=1 on the server).",
                _listed(absent), "s" if len(absent) > 1 else "", field,
            )
    return with_triggers(prompt, prefix) if prefix else prompt


def _listed(words: Sequence[str]) -> str:
    return ", ".join(repr(w) for w in words)
