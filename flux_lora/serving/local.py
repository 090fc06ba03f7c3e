"""`flux-lora predict`: one prediction in this process, validated exactly as the cog server does."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

from flux_lora.errors import UserError
from flux_lora.serving.schema import PREDICTORS, load_predictor_class, openapi_schema
from flux_lora.settings import Settings

LORA_FIELDS = ("replicate_weights", "extra_lora")


class InvalidInput(UserError):
    """An input the schema rejects (unknown field, wrong type, out of bounds, not a choice)."""


def _coerce(name: str, raw: str, prop: dict[str, Any]) -> Any:
    """Type a command-line string the way `cog predict` does, from the schema's property."""
    kind = prop.get("type", "string")
    if raw.startswith("@"):
        path = Path(raw[1:])
        if not path.is_file():
            raise InvalidInput(f"{name}: file not found: {path}")
        return str(path)
    try:
        if kind == "integer":
            return int(raw)
        if kind == "number":
            return float(raw)
        if kind == "boolean":
            if raw.lower() not in {"true", "false", "1", "0"}:
                raise ValueError(raw)
            return raw.lower() in {"true", "1"}
    except ValueError:
        raise InvalidInput(f"{name}: expected {kind}, got {raw!r}") from None
    return raw


def input_properties(predictor: str = "hotswap") -> dict[str, dict[str, Any]]:
    """The schema's inputs in order, each choice field's enum (a component of its own) merged in."""
    import cog

    schemas = openapi_schema(load_predictor_class(predictor), cog.__version__)["components"]["schemas"]
    props = schemas["Input"]["properties"]
    required = set(schemas["Input"].get("required", ()))
    merged = {}
    for name, prop in props.items():
        refs = [part["$ref"].rsplit("/", 1)[1] for part in prop.get("allOf", ())]
        merged[name] = {**{k: v for r in refs for k, v in schemas[r].items()}, **prop, "required": name in required}
    return merged


def _value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def inputs_help(predictor: str = "hotswap") -> str:
    """`flux-lora predict --help`'s list of inputs: type, range or choices, default, from the schema."""
    lines = [f"inputs of the {predictor} variant (-i NAME=VALUE; a file as NAME=@path):"]
    for name, prop in input_properties(predictor).items():
        kind = "file or URL" if prop.get("format") == "uri" else prop["type"]
        if name in LORA_FIELDS:
            kind = "LoRA: URL, owner/model[/version], huggingface.co/..., civitai.com/..., local file"
        elif prop["type"] == "array":
            kind = f"list of {prop['items']['type']}s: -i {name}=VALUE once per item, or a JSON array"
        elif "enum" in prop:
            kind = "one of " + ", ".join(map(_value, prop["enum"]))
        elif "minimum" in prop:
            kind += f" {_value(prop['minimum'])} to {_value(prop['maximum'])}"
        if prop["required"]:
            tail = "required"
        elif prop.get("default") is None:
            tail = "optional"
        else:
            tail = f"default {_value(prop['default'])}"
        lines.append(f"  {name:<24}{kind}; {tail}")
    lines.append("Descriptions: flux-lora schema" + ("" if predictor == "hotswap" else f" --predictor {predictor}"))
    return "\n".join(lines)


def parse_inputs(pairs: list[str], predictor: str = "hotswap") -> dict[str, Any]:
    """`name=value` pairs typed by the predictor's schema; unknown names are errors, not warnings."""
    props = input_properties(predictor)
    values: dict[str, Any] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep:
            raise InvalidInput(f"expected NAME=VALUE, got {pair!r}")
        if name not in props:
            raise InvalidInput(f"{name}: unknown input; known inputs: {', '.join(props)}")
        prop = props[name]
        if prop.get("type") == "array":  # a list: `-i name=a -i name=b`, or a JSON array `-i 'name=["a","b"]'`
            items = _json_list(name, raw) if raw.lstrip().startswith("[") else [raw]
            values.setdefault(name, []).extend(_coerce(name, str(i), prop.get("items", {})) for i in items)
        else:
            values[name] = _coerce(name, raw, prop)
    return values


def _json_list(name: str, raw: str) -> list[Any]:
    import json

    try:
        items = json.loads(raw)
    except ValueError:
        raise InvalidInput(f"{name}: expected a JSON array or one value per -i {name}=..., got {raw!r}") from None
    if not isinstance(items, list):
        raise InvalidInput(f"{name}: expected a JSON array, got {raw!r}")
    return items


def check_request(predictor: str, values: dict[str, Any]) -> None:
    """The rules between inputs (a custom size needs its width, a mask its image, ...) before setup, as the
    server applies them after it: the same function, so both fail with the same one line."""
    from flux_lora.service import VARIANTS, baked_lora_ref, request_for

    request_for(VARIANTS[predictor], baked_lora_ref(Settings.cog_weights(), Settings.from_env()), values)


def check_loras(values: dict[str, Any]) -> None:
    """The LoRA references' form, and local files' presence and header, before seconds of setup.

    A person running the command line on their own machine may name any local file (the server may not)."""
    from flux_lora.weights.cache import WeightCache

    cache = WeightCache.from_settings(Settings.from_env())
    named = [(field, values[field]) for field in LORA_FIELDS if values.get(field)]
    named += [(f"hf_loras[{i}]", ref) for i, ref in enumerate(values.get("hf_loras") or []) if str(ref).strip()]
    for field, ref in named:
        try:
            cache.check(ref, allow_local=True)
        except UserError as exc:
            raise InvalidInput(f"{field}: {exc}") from None


def run_local(predictor: str, values: dict[str, Any], output_dir: Path) -> list[Path]:
    """Validate with cog's own input checker, run setup and run, move the files under `output_dir`."""
    from cog._inspector import check_input, create_predictor

    cls = load_predictor_class(predictor)
    info = create_predictor("predict", PREDICTORS[predictor])
    try:
        kwargs = check_input(info.inputs, values)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None
    check_loras(kwargs)
    check_request(predictor, kwargs)
    runner = cls()
    runner.setup(weights=Settings.cog_weights())
    runner.service.local_loras = True  # this machine's user, not a remote request: local files are theirs
    paths = [Path(p) for p in asyncio.run(runner.run(**kwargs))]  # run is async: cog's concurrency (predict.py)
    output_dir.mkdir(parents=True, exist_ok=True)
    moved_dir = Path(shutil.move(str(paths[0].parent), output_dir)) if paths else output_dir
    return [moved_dir / p.name for p in paths]
