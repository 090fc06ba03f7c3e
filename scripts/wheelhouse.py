"""Check the wheels carried to the GPU machine and print the one line that installs them there.

Why: that machine reaches no registry, so a dependency missing from `.whl/` fails the install there and
costs a lent GPU call. Every `Requires-Dist` of every carried wheel (markers evaluated for the machine:
CPython 3.12 on Linux x86-64) must be met by a carried wheel or by a package preinstalled there
(scripts/device-packages.txt). Pure rules, no network: tests/test_wheelhouse.py runs them on made-up metadata.

    python scripts/wheelhouse.py .whl scripts/device-packages.txt
"""

from __future__ import annotations

import sys
import zipfile
from dataclasses import dataclass, field
from email.parser import HeaderParser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name, parse_wheel_filename
from packaging.version import Version

LIMIT_MIB = 60.0  # the device call carries 64 MiB in all, the working tree included

# PEP 508 marker values of the GPU machine's python3 (CPython 3.12.3, Linux, x86-64).
DEVICE_MARKERS = {
    "implementation_name": "cpython",
    "implementation_version": "3.12.3",
    "os_name": "posix",
    "platform_machine": "x86_64",
    "platform_python_implementation": "CPython",
    "platform_release": "",
    "platform_system": "Linux",
    "platform_version": "",
    "python_full_version": "3.12.3",
    "python_version": "3.12",
    "sys_platform": "linux",
    "extra": "",
}


@dataclass
class Wheel:
    """One carried distribution: its name, version, size and install-time requirements."""

    name: NormalizedName
    version: Version
    requires: list[str]
    size: int = 0


@dataclass
class Report:
    """What the check found: errors stop the install; unverified needs were taken on trust."""

    errors: list[str] = field(default_factory=list)
    unverified: list[str] = field(default_factory=list)
    unverified_names: set[NormalizedName] = field(default_factory=set)  # scripts/gpu_env.py prints their versions


def read_wheel(path: Path) -> Wheel:
    """Name, version and Requires-Dist read from the wheel's own METADATA."""
    name, version, _, _ = parse_wheel_filename(path.name)
    with zipfile.ZipFile(path) as zf:
        meta = f"{name.replace('-', '_')}-{version}.dist-info/METADATA"
        candidates = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        text = zf.read(meta if meta in candidates else candidates[0]).decode()
    headers = HeaderParser().parsestr(text)
    return Wheel(name, version, headers.get_all("Requires-Dist") or [], path.stat().st_size)


def read_device_packages(path: Path) -> dict[NormalizedName, Version | None]:
    """`name` or `name==version` per line, `#` comments; None where the version was never recorded."""
    packages: dict[NormalizedName, Version | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            packages[canonicalize_name(name)] = Version(version) if version else None
    return packages


def check(carried: list[Wheel], device: dict[NormalizedName, Version | None]) -> Report:
    """Every install-time need of every carried wheel met by one carried version or by the device."""
    report = Report()
    by_name: dict[NormalizedName, Wheel] = {}
    for wheel in carried:
        name = canonicalize_name(wheel.name)
        if name in by_name:
            report.errors.append(f"{name}: two versions carried ({by_name[name].version}, {wheel.version})")
        by_name[name] = wheel
    for wheel in carried:
        for line in wheel.requires:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate(DEVICE_MARKERS):
                continue
            need, spec = canonicalize_name(req.name), req.specifier
            what = f"{wheel.name} {wheel.version} needs {req.name}{spec}"
            if need in by_name:
                if not spec.contains(by_name[need].version, prereleases=True):
                    report.errors.append(f"{what}: carried {by_name[need].version}")
            elif need not in device:
                report.errors.append(f"{what}: neither carried nor on the device")
            elif device[need] is None:
                if spec:
                    report.unverified.append(f"{what}: on the device, version unrecorded")
                    report.unverified_names.add(need)
            elif not spec.contains(device[need], prereleases=True):
                report.errors.append(f"{what}: the device has {device[need]}, carry one that fits")
    return report


def install_line(carried: list[Wheel], folder: str = ".whl") -> str:
    """The device command that installs exactly the carried versions, resolving the rest against what is there."""
    pins = " ".join(sorted(f"{w.name}=={w.version}" for w in carried))
    return f"python3 -m pip install -q --no-index --find-links {folder} --no-cache-dir --no-compile {pins}"


def main(argv: list[str]) -> int:
    folder, device_list = Path(argv[0]), Path(argv[1])
    carried = [read_wheel(p) for p in sorted(folder.glob("*.whl"))]
    report = check(carried, read_device_packages(device_list))
    total = sum(w.size for w in carried) / 2**20
    for wheel in sorted(carried, key=lambda w: -w.size):
        print(f"  {wheel.size / 2**20:6.2f} MiB  {wheel.name}=={wheel.version}")
    print(f"  {total:6.2f} MiB  total, {len(carried)} wheels (limit {LIMIT_MIB:.0f} MiB)")
    for line in report.unverified:
        print(f"unverified: {line}")
    if total > LIMIT_MIB:
        report.errors.append(f"{total:.1f} MiB carried, over the {LIMIT_MIB:.0f} MiB limit")
    for line in report.errors:
        print(f"ERROR: {line}", file=sys.stderr)
    if report.errors:
        return 1
    print(f"\nInstall on the device (carry [\"{folder}\"]):\n{install_line(carried, str(folder))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
