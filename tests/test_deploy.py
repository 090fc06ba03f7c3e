"""The deployment files agree with the code: cog.yaml, requirements.txt (GPU image), .dockerignore."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


def requirements_txt() -> dict[str, Requirement]:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    reqs = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    return {r.name.lower().replace("_", "-"): r for r in reqs}


def test_gpu_requirements_are_pinned_and_match_pyproject_except_torch() -> None:
    image = requirements_txt()
    assert all(str(r.specifier).startswith("==") and len(r.specifier) == 1 for r in image.values())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in map(Requirement, project):
        name = dep.name.lower().replace("_", "-")
        if name in {"torch", "cog"}:  # torch: the GPU build's own pin; cog: cog.yaml's sdk_version
            continue
        assert name in image, f"{name} is in pyproject.toml but not in requirements.txt"
        pinned = next(iter(image[name].specifier)).version
        assert dep.specifier.contains(pinned), f"{name}: requirements.txt {pinned} vs pyproject {dep.specifier}"
    assert "torch" in image


def test_cog_yaml_builds_the_gpu_image_of_an_existing_predictor() -> None:
    config = yaml.safe_load((ROOT / "cog.yaml").read_text())
    build = config["build"]
    assert build["gpu"] is True and build["python_version"] == "3.12"
    assert (ROOT / build["python_requirements"]).is_file()
    torch = next(iter(requirements_txt()["torch"].specifier)).version
    # torch 2.11.0's CUDA builds in cog's compatibility matrix: 12.6, 12.8, 12.9, 13.0.
    assert torch == "2.11.0" and build["cuda"] in {"12.6", "12.8", "12.9", "13.0"}
    module, _, cls = config["predict"].partition(":")
    tree = ast.parse((ROOT / module).read_text())
    assert cls in {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
    assert cls == "HotswapPredictor"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    cog_pin = next(d for d in pyproject["project"]["dependencies"] if d.startswith("cog"))
    assert cog_pin == f"cog=={build['sdk_version']}"


def test_dockerignore_keeps_environments_caches_and_outputs_out() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv", "weights", "outputs", ".cog-run", ".git"} <= ignored
    assert not {"flux_lora", "predict.py", "requirements.txt"} & ignored
