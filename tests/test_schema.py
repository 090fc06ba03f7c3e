"""The served schema is the contract: every field of both Replicate model pages, attribute for attribute."""

from __future__ import annotations

import json

import pytest
from seeds import seed_fields

from flux_lora.serving.schema import encode, schema_json

ENUM_TYPES = {"string (enum)", "None"}  # the two page renderings of a choices field


def _schema(variant: str) -> dict:
    return json.loads(schema_json(variant))


@pytest.mark.parametrize("variant", ["trained", "hotswap"])
def test_fields_match_the_model_page(variant: str) -> None:
    schema = _schema(variant)
    components = schema["components"]["schemas"]
    props = components["Input"]["properties"]
    seeds = seed_fields(variant)
    assert [f.name for f in seeds] == list(props), "field names and order"
    for order, seed in enumerate(seeds):
        prop = props[seed.name]
        assert prop["x-order"] == order
        assert prop["description"] == seed.description, seed.name
        if seed.type in ENUM_TYPES:
            enum = components[seed.name]
            assert prop["allOf"] == [{"$ref": f"#/components/schemas/{seed.name}"}]
            assert enum["type"] == "string"
            if seed.options is not None:
                assert enum["enum"] == seed.options, seed.name
        else:
            assert prop["type"] == seed.type, seed.name
        if seed.default is None:
            assert prop.get("default") is None, seed.name
        elif seed.type == "boolean":
            assert prop["default"] is (seed.default == "True"), seed.name
        elif seed.type in ("integer", "number"):
            assert prop["default"] == float(seed.default), seed.name
        else:
            assert prop["default"] == seed.default, seed.name
        # The page omits a zero minimum: a maximum alone means the minimum is 0.
        expected_min = seed.minimum if seed.minimum is not None else (0 if seed.maximum is not None else None)
        assert prop.get("minimum") == expected_min, seed.name
        assert prop.get("maximum") == seed.maximum, seed.name


@pytest.mark.parametrize("variant", ["trained", "hotswap"])
def test_only_prompt_is_required_and_optionals_are_nullable(variant: str) -> None:
    inputs = _schema(variant)["components"]["schemas"]["Input"]
    assert inputs["required"] == ["prompt"]
    for name in ("image", "mask", "height", "width", "seed", "extra_lora"):
        assert inputs["properties"][name]["nullable"] is True
    assert inputs["properties"]["image"]["format"] == "uri"


def test_output_is_an_array_of_uris() -> None:
    for variant in ("trained", "hotswap"):
        output = _schema(variant)["components"]["schemas"]["Output"]
        assert output == {"items": {"format": "uri", "type": "string"}, "title": "Output", "type": "array"}


def test_variants_differ_only_in_replicate_weights_and_go_fast_default() -> None:
    trained = _schema("trained")["components"]["schemas"]["Input"]["properties"]
    hotswap = _schema("hotswap")["components"]["schemas"]["Input"]["properties"]
    assert set(hotswap) - set(trained) == {"replicate_weights"}
    assert trained["go_fast"]["default"] is True and hotswap["go_fast"]["default"] is False


def test_encoding_matches_go_json_marshal() -> None:
    text = schema_json("hotswap")
    assert text.startswith('{"components":{"schemas":{"Input":{"properties":{"prompt":')
    assert ", " not in text.split('"description"')[0]  # compact separators
    assert "\\u003cowner\\u003e" in text and "<owner>" not in text  # Go escapes <, > and &
    assert '"lora_scale":{"default":1,' in text  # float 1.0 written as 1
    assert list(json.loads(text)["components"]["schemas"])[:2] == ["Input", "Output"]
    assert encode({"b": 1.5, "a": [2.0]}) == '{"a":[2],"b":1.5}'
