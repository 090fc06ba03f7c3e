"""The GPU machine's wheelhouse rules (scripts/wheelhouse.py) and the first GPU command (scripts/gpu_env.py).

No network: wheels and metadata are made up here; scripts/gpu_wheels.sh's download is not run.
"""

from __future__ import annotations

import runpy
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
wheelhouse = runpy.run_path(str(ROOT / "scripts" / "wheelhouse.py"))
Wheel, check = wheelhouse["Wheel"], wheelhouse["check"]


def wheel(spec: str, *requires: str) -> object:
    name, version = spec.split("==")
    return Wheel(name, Version(version), list(requires))


DEVICE = {"torch": Version("2.11.0"), "numpy": None, "huggingface-hub": Version("1.33.0")}


def test_a_closed_set_passes_and_markers_are_read_for_cpython_312_linux_x86_64() -> None:
    carried = [
        wheel("diffusers==0.42.1", "importlib_metadata", "numpy", "huggingface-hub<3.0,>=1.32.0"),
        wheel("importlib-metadata==10.2.0", "zipp>=3.20; python_version < '3.11'", "pytest; extra == 'test'"),
        wheel("peft==0.21.2", "torch>=1.13.0", "colorama; platform_system == 'Windows'"),
    ]
    report = check(carried, DEVICE)
    assert report.errors == [] and report.unverified == []


def test_each_unmet_requirement_is_named_with_who_needs_it() -> None:
    carried = [
        wheel("diffusers==0.42.1", "importlib_metadata"),  # neither carried nor there
        wheel("transformers==5.23.0", "huggingface-hub>=2.0", "tokenizers>=0.23.1"),  # too old there; missing
        wheel("httpx2==2.16.2", "httpcore2==2.16.2", "hf-xet>=1.6; platform_machine == 'x86_64'"),
        wheel("httpcore2==2.16.1"),  # carried at the wrong version
    ]
    errors = check(carried, DEVICE).errors
    assert errors == [
        "diffusers 0.42.1 needs importlib_metadata: neither carried nor on the device",
        "transformers 5.23.0 needs huggingface-hub>=2.0: the device has 1.33.0, carry one that fits",
        "transformers 5.23.0 needs tokenizers>=0.23.1: neither carried nor on the device",
        "httpx2 2.16.2 needs httpcore2==2.16.2: carried 2.16.1",
        "httpx2 2.16.2 needs hf-xet>=1.6: neither carried nor on the device",
    ]


def test_two_versions_of_one_name_stop_the_install_and_unknown_device_versions_are_listed() -> None:
    report = check([wheel("Zipp==4.1.2"), wheel("zipp==4.1.1"), wheel("cog==0.23.1", "numpy>=2")], DEVICE)
    assert report.errors == ["zipp: two versions carried (4.1.2, 4.1.1)"]
    assert report.unverified == ["cog 0.23.1 needs numpy>=2: on the device, version unrecorded"]


def make_wheel(folder: Path, name: str, version: str, *requires: str, padding: int = 0) -> None:
    path = folder / f"{name}-{version}-py3-none-any.whl"
    needs = "".join(f"Requires-Dist: {r}\n" for r in requires)
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n{needs}"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name}-{version}.dist-info/METADATA", meta)
        zf.writestr(f"{name}/pad.bin", b"\0" * padding)


def test_main_reads_wheels_prints_the_install_line_and_fails_over_the_size_limit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    device = tmp_path / "device.txt"
    device.write_text("# comment\ntorch==2.11.0\nnumpy  # version unknown\n")
    make_wheel(tmp_path, "torchao", "0.18.0")
    make_wheel(tmp_path, "lazy_importer", "0.1.0", "numpy")
    assert wheelhouse["main"]([str(tmp_path), str(device)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == (
        f"python3 -m pip install -q --no-index --find-links {tmp_path} --no-cache-dir --no-compile "
        "lazy-importer==0.1.0 torchao==0.18.0"
    )
    make_wheel(tmp_path, "big", "1.0", "missing-thing", padding=61 * 2**20)
    assert wheelhouse["main"]([str(tmp_path), str(device)]) == 1
    err = capsys.readouterr().err
    assert "big 1.0 needs missing-thing: neither carried nor on the device" in err
    assert "MiB carried, over the 60 MiB limit" in err


def pins(path: Path) -> dict[str, Requirement]:
    lines = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    reqs = [Requirement(line) for line in lines if line]
    return {r.name.lower().replace("_", "-"): r for r in reqs}


def test_carried_pins_are_exact_match_requirements_txt_and_never_replace_torch() -> None:
    carried = pins(ROOT / "scripts" / "gpu-wheels.txt")
    image = pins(ROOT / "requirements.txt")
    assert all(str(r.specifier).startswith("==") and len(r.specifier) == 1 for r in carried.values())
    assert {"diffusers", "torchao", "cog", "coglet", "importlib-metadata"} <= carried.keys()
    assert "torch" not in carried
    for name in carried.keys() & image.keys():
        assert carried[name].specifier == image[name].specifier, f"{name}: gpu-wheels.txt vs requirements.txt"
    device = wheelhouse["read_device_packages"](ROOT / "scripts" / "device-packages.txt")
    assert device["torch"] == Version("2.11.0") and "importlib-metadata" not in device


def test_first_gpu_command_reports_versions_and_torchao_extension_on_cpu_too(tmp_path: Path) -> None:
    import torch

    info = runpy.run_path(str(ROOT / "scripts" / "gpu_env.py"))["describe"](tmp_path)
    assert info["torch"] == torch.__version__ and info["versions"]["diffusers"] is not None
    assert info["pillow_webp"] is True  # WebP is the default output format
    assert info["unverified"] == {}  # no carried wheel here needs anything
    ext = info["torchao_extension"]
    assert set(ext["loaded"]) | set(ext["errors"]) == set(ext["files"])
    assert ext["fp8_matmul"] in {"torch._scaled_mm", "mslk"}
    if not torch.cuda.is_available():
        assert info["gpu"] is None and not ext["all_loaded"]


def test_first_gpu_command_reports_the_versions_wheelhouse_took_on_trust(tmp_path: Path) -> None:
    """What a carried wheel needs from the device at a version never recorded there: its installed version."""
    import importlib.metadata

    device = tmp_path / "device.txt"
    device.write_text("pillow\nrequests\npackaging==99.0\n")
    make_wheel(tmp_path, "cog", "0.23.1", "pillow>=10", "requests", "packaging>=20")
    unverified = runpy.run_path(str(ROOT / "scripts" / "gpu_env.py"))["unverified_versions"](tmp_path, device)
    # requests: no version asked for; packaging: its version there is recorded (and fits)
    assert unverified == {"pillow": importlib.metadata.version("pillow")}
