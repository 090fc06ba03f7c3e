"""The OpenAPI schema `cog build` would write to `.cog/openapi_schema.json`.

The pip package of cog ships no Go CLI, and without that file the cog HTTP server validates
nothing. This module reproduces the Go generator (cog's pkg/schema/openapi_spec.go) from the
predictor's signature: same components, same key order, same compact encoding (Go sorts map keys,
escapes <, > and &, and writes integral floats without a fraction).
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

from cog import FieldInfo, Secret
from cog import Path as CogPath

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PREDICT_FILE = PROJECT_ROOT / "predict.py"
PREDICTORS = {"hotswap": "HotswapPredictor", "trained": "TrainedPredictor", "multi": "MultiLoraPredictor"}
SCHEMA_RELPATH = Path(".cog") / "openapi_schema.json"


class _Ordered(dict):
    """A JSON object whose keys keep insertion order (Go's orderedMapAny); plain dicts get sorted."""


def _primitive(tpe: Any) -> dict[str, Any]:
    if tpe is bool:
        return {"type": "boolean"}
    if tpe is float:
        return {"type": "number"}
    if tpe is int:
        return {"type": "integer"}
    if tpe is str:
        return {"type": "string"}
    if tpe is CogPath:
        return {"type": "string", "format": "uri"}
    if tpe is Secret:
        return {"type": "string", "format": "password", "writeOnly": True, "x-cog-secret": True}
    return {"type": "object"}


def _unwrap_optional(tpe: Any) -> tuple[Any, bool]:
    if typing.get_origin(tpe) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tpe) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tpe)) == 2:
            return args[0], True
    return tpe, False


def _type_schema(tpe: Any) -> dict[str, Any]:
    if typing.get_origin(tpe) is list:
        (item,) = typing.get_args(tpe) or (Any,)
        return {"type": "array", "items": _primitive(item)}
    return _primitive(tpe)


def _title(name: str) -> str:
    return " ".join(part[:1].upper() + part[1:] for part in name.split("_"))


def _input_schema(run: Any) -> tuple[dict[str, Any], list[tuple[str, dict[str, Any]]]]:
    hints = typing.get_type_hints(run)
    properties = _Ordered()
    required: list[str] = []
    enums: list[tuple[str, dict[str, Any]]] = []
    params = [p for p in inspect.signature(run).parameters.values() if p.name != "self"]
    for order, param in enumerate(params):
        tpe, nullable = _unwrap_optional(hints[param.name])
        info = param.default if isinstance(param.default, FieldInfo) else None
        has_default = param.default is not inspect.Parameter.empty
        default = info.default if info else (None if not has_default else param.default)
        prop: dict[str, Any] = {"x-order": order}
        if info and info.choices:
            enums.append(
                (
                    param.name,
                    {
                        "title": param.name,
                        "description": "An enumeration.",
                        "enum": list(info.choices),
                        "type": _primitive(tpe)["type"],
                    },
                )
            )
            prop["allOf"] = [{"$ref": f"#/components/schemas/{param.name}"}]
        else:
            prop["title"] = _title(param.name)
            prop.update(_type_schema(tpe))
        # Input(default=None) on a non-Optional type means "no default": the field is required.
        effective_default = has_default and (default is not None or nullable)
        if not effective_default and not nullable:
            required.append(param.name)
        if effective_default:
            prop["default"] = default
        if nullable:
            prop["nullable"] = True
        if info:
            for key, value in (
                ("description", info.description),
                ("minimum", info.ge),
                ("maximum", info.le),
                ("minLength", info.min_length),
                ("maxLength", info.max_length),
                ("pattern", info.regex),
                ("x-cog-accept", info.accept),
            ):
                if value is not None:
                    prop[key] = value
            if info.deprecated:
                prop["deprecated"] = True
        properties[param.name] = prop
    schema: dict[str, Any] = {"title": "Input", "type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return schema, enums


def _output_schema(run: Any) -> dict[str, Any]:
    schema = _type_schema(typing.get_type_hints(run)["return"])
    schema["title"] = "Output"
    return schema


def _responses(ok_schema: dict[str, Any], validation: bool) -> dict[str, Any]:
    responses: dict[str, Any] = {
        "200": {"description": "Successful Response", "content": {"application/json": {"schema": ok_schema}}}
    }
    if validation:
        responses["422"] = {
            "description": "Validation Error",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/HTTPValidationError"}}},
        }
    return responses


def _date(title: str) -> dict[str, Any]:
    return {"title": title, "type": "string", "format": "date-time"}


def openapi_schema(predictor_cls: type, version: str) -> dict[str, Any]:
    """The OpenAPI 3.0.2 document for a predictor class, as cog's Go generator builds it."""
    run = predictor_cls.run
    input_schema, enums = _input_schema(run)
    components = _Ordered(Input=input_schema, Output=_output_schema(run))
    components.update(enums)
    components["PredictionRequest"] = {
        "title": "PredictionRequest",
        "type": "object",
        "properties": {
            "id": {"title": "Id", "type": "string"},
            "input": {"$ref": "#/components/schemas/Input"},
        },
    }
    components["PredictionResponse"] = {
        "title": "PredictionResponse",
        "type": "object",
        "properties": {
            "input": {"$ref": "#/components/schemas/Input"},
            "output": {"$ref": "#/components/schemas/Output"},
            "id": {"title": "Id", "type": "string"},
            "version": {"title": "Version", "type": "string"},
            "created_at": _date("Created At"),
            "started_at": _date("Started At"),
            "completed_at": _date("Completed At"),
            "status": {"title": "Status", "type": "string"},
            "error": {"title": "Error", "type": "string"},
            "logs": {"title": "Logs", "type": "string"},
            "metrics": {"title": "Metrics", "type": "object"},
        },
    }
    components["Status"] = {
        "title": "Status",
        "description": "An enumeration.",
        "enum": ["starting", "processing", "succeeded", "canceled", "failed"],
        "type": "string",
    }
    components["HTTPValidationError"] = {
        "title": "HTTPValidationError",
        "type": "object",
        "properties": {
            "detail": {
                "title": "Detail",
                "type": "array",
                "items": {"$ref": "#/components/schemas/ValidationError"},
            }
        },
    }
    components["ValidationError"] = {
        "title": "ValidationError",
        "required": ["loc", "msg", "type"],
        "type": "object",
        "properties": {
            "loc": {
                "title": "Location",
                "type": "array",
                "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
            },
            "msg": {"title": "Message", "type": "string"},
            "type": {"title": "Error Type", "type": "string"},
        },
    }
    paths = _Ordered()
    paths["/"] = {"get": {"summary": "Root", "operationId": "root__get", "responses": _responses({}, False)}}
    paths["/health-check"] = {
        "get": {
            "summary": "Healthcheck",
            "operationId": "healthcheck_health_check_get",
            "responses": _responses({}, False),
        }
    }
    paths["/predictions"] = {
        "post": {
            "summary": "Predict",
            "description": "Run a single prediction on the model",
            "operationId": "predict_predictions_post",
            "requestBody": {
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PredictionRequest"}}}
            },
            "responses": _responses({"$ref": "#/components/schemas/PredictionResponse"}, True),
        }
    }
    paths["/predictions/{prediction_id}/cancel"] = {
        "post": {
            "summary": "Cancel",
            "operationId": "cancel_predictions__prediction_id__cancel_post",
            "parameters": [
                {
                    "required": True,
                    "schema": {"title": "Prediction Id", "type": "string"},
                    "name": "prediction_id",
                    "in": "path",
                }
            ],
            "responses": _responses({}, True),
        }
    }
    return {
        "openapi": "3.0.2",
        "info": {"title": "Cog", "version": version},
        "paths": paths,
        "components": {"schemas": components},
    }


def _go_order(value: Any) -> Any:
    """Sort plain dicts' keys as Go's encoding/json does; keep _Ordered maps as inserted."""
    if isinstance(value, _Ordered):
        return {k: _go_order(v) for k, v in value.items()}
    if isinstance(value, dict):
        return {k: _go_order(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_go_order(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)  # Go writes float64(3) as 3
    return value


def encode(schema: dict[str, Any]) -> str:
    """Compact JSON byte-for-byte as Go's json.Marshal writes it."""
    text = json.dumps(_go_order(schema), separators=(",", ":"), ensure_ascii=False)
    for char, escaped in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e")):
        text = text.replace(char, escaped)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def load_predictor_class(predictor: str, predict_file: Path = PREDICT_FILE) -> type:
    """Import predict.py by path (as cog does) and return the named variant's class."""
    if predictor not in PREDICTORS:
        raise ValueError(f"predictor must be one of {', '.join(PREDICTORS)}, got {predictor!r}")
    module = sys.modules.get("predict")
    if module is None or Path(getattr(module, "__file__", "")).resolve() != predict_file.resolve():
        spec = importlib.util.spec_from_file_location("predict", predict_file)
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules["predict"] = module
        spec.loader.exec_module(module)
    return getattr(module, PREDICTORS[predictor])


def schema_json(predictor: str) -> str:
    """The schema text for a variant ('hotswap', 'trained' or 'multi')."""
    import cog

    return encode(openapi_schema(load_predictor_class(predictor), cog.__version__))


def write_schema(predictor: str, workdir: Path) -> Path:
    """Write `<workdir>/.cog/openapi_schema.json`, where the cog server looks for it."""
    target = workdir / SCHEMA_RELPATH
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(schema_json(predictor))
    return target
