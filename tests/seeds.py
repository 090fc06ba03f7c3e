"""Read the two Replicate model pages in tests/data/seeds into field records (the schema contract).

The pages come in two renderings (plain text and a markdown table); both are a stream of short
tokens once split on newlines and table pipes: a field name, its type, then default / Options /
Min / Max tokens and a one-line description.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

SEEDS = Path(__file__).parent / "data" / "seeds"
TYPES = {"string", "integer", "number", "boolean", "string (enum)", "None"}


@dataclass
class SeedField:
    name: str
    type: str
    default: str | None = None
    minimum: float | None = None
    maximum: float | None = None
    options: list[str] | None = None
    description: str = ""
    extras: list[str] = field(default_factory=list)


def _tokens(text: str) -> list[str]:
    body = text.split("Output schema")[0]
    return [t.strip() for t in re.split(r"[\n|]", body) if t.strip() and not set(t.strip()) <= {"-"}]


def parse_seed(path: Path) -> list[SeedField]:
    tokens = _tokens(path.read_text())
    fields: list[SeedField] = []
    i = 0
    while i < len(tokens):
        name, tpe = tokens[i], tokens[i + 1] if i + 1 < len(tokens) else ""
        if re.fullmatch(r"[a-z_]+", name) and tpe in TYPES:
            current = SeedField(name, tpe)
            fields.append(current)
            i += 2
            continue
        if fields:
            current = fields[-1]
            token = tokens[i]
            if token == "Options:":
                current.options = [o.strip() for o in tokens[i + 1].split(",")]
                i += 2
                continue
            bounds = re.findall(r"(Min|Max): (-?[\d.]+)", token)
            for key, value in bounds:
                setattr(current, "minimum" if key == "Min" else "maximum", float(value))
            if not bounds:
                current.extras.append(token)
        i += 1
    for f in fields:  # the description is the last free token; a token before it is the default
        f.description = f.extras[-1]
        if len(f.extras) > 1:
            f.default = f.extras[0]
    return fields


def seed_fields(variant: str) -> list[SeedField]:
    return parse_seed(SEEDS / f"{variant}.txt")
