"""`flux-lora predict`: one prediction in this process, validated exactly as the cog server does."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

from flux_lora.errors import UserError
from flux_lora.serving.schema import PREDICTORS, load_predictor_class, openapi_schema
from flux_lora.settings import Settings


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


def parse_inputs(pairs: list[str], predictor: str = "hotswap") -> dict[str, Any]:
    """`name=value` pairs typed by the predictor's schema; unknown names are errors, not warnings."""
    import cog

    schema = openapi_schema(load_predictor_class(predictor), cog.__version__)
    props = schema["components"]["schemas"]["Input"]["properties"]
    values: dict[str, Any] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep:
            raise InvalidInput(f"expected NAME=VALUE, got {pair!r}")
        if name not in props:
            raise InvalidInput(f"{name}: unknown input; known inputs: {', '.join(props)}")
        enum = next((s for s in schema["components"]["schemas"].values() if s.get("title") == name), None)
        prop = enum or props[name]
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


def run_local(predictor: str, values: dict[str, Any], output_dir: Path) -> list[Path]:
    """Validate with cog's own input checker, run setup and run, move the files under `output_dir`."""
    from cog._inspector import check_input, create_predictor

    cls = load_predictor_class(predictor)
    info = create_predictor("predict", PREDICTORS[predictor])
    try:
        kwargs = check_input(info.inputs, values)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None
    runner = cls()
    runner.setup(weights=Settings.cog_weights())
    paths = [Path(p) for p in asyncio.run(runner.run(**kwargs))]  # run is async: cog's concurrency (predict.py)
    output_dir.mkdir(parents=True, exist_ok=True)
    moved_dir = Path(shutil.move(str(paths[0].parent), output_dir)) if paths else output_dir
    return [moved_dir / p.name for p in paths]
