"""The README is the front door: a few screens, links that lead somewhere, and examples that work as copied.

Its "Use it" section is run as a newcomer runs it after the two commands: in a folder holding `.venv` and the
store the demo built (`weights/`, here the tiny store), in one shell, commands in order; `flux-lora serve`
in the background, waited for as the reader waits for its "Setup finished". Where the README shows a
command's output, the command must print exactly that (`...` stands for any text).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, free_port

README = (ROOT / "README.md").read_text()
RUNNABLE = "Use it"  # the section whose console blocks are run
MARK = "@@ README command "


def section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.M | re.S)
    assert match, f"README has no '## {title}' section"
    return match[1]


def commands(text: str) -> list[tuple[str, list[str]]]:
    """Each `$ command` of the console blocks in `text` (with its `\\` continuation lines), and the output
    lines the README shows under it."""
    out: list[tuple[str, list[str]]] = []
    for block in re.findall(r"^```console\n(.*?)^```", text, re.M | re.S):
        continued = False
        for line in block.splitlines():
            if continued:
                out[-1] = (out[-1][0] + "\n" + line, [])
            elif line.startswith("$ "):
                out.append((line[2:], []))
            else:
                out[-1][1].append(line)
            continued = line.endswith("\\")
    return out


def test_the_readme_is_a_few_screens() -> None:
    lines = README.splitlines()
    assert len(lines) <= 150
    prose = re.sub(r"^```.*?^```", "", README, flags=re.M | re.S).splitlines()
    assert [line for line in prose if len(line) > 120] == []
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", README):  # relative links lead to a file
        assert (ROOT / target).is_file(), target


def test_the_examples_use_the_port_the_server_listens_on() -> None:
    from flux_lora.serving.cli import build_parser

    default = build_parser().parse_args(["serve"]).port
    steps = [cmd for cmd, _ in commands(section(RUNNABLE))]
    used = {int(port) for cmd in steps for port in re.findall(r"(?:localhost|127\.0\.0\.1):(\d+)", cmd)}
    assert used == {default}
    assert any(cmd.startswith("flux-lora serve") and "--port" not in cmd for cmd in steps)


def _script(steps: list[tuple[str, list[str]]], port: int) -> str:
    """One bash script running the steps in order, each after a marker line; the server in the background."""
    wait = f"{sys.executable} -c 'import sys; from flux_lora.serving.server import wait_ready; " \
           f"sys.exit(not wait_ready(\"http://127.0.0.1:{port}\", timeout=600))'"
    lines = ["set -eo pipefail"]
    for i, (cmd, _) in enumerate(steps):
        cmd = cmd.replace(":5000", f":{port}")
        lines.append(f"echo '{MARK}{i}'")
        if cmd.startswith("flux-lora serve"):  # its comment dropped: the redirection and `&` follow
            serve = re.sub(r"\s+#.*", "", cmd).replace("flux-lora serve", f"flux-lora serve --port {port}", 1)
            lines += [f"{serve} >serve.log 2>&1 &", wait]
        else:
            lines.append(cmd)
    return "\n".join(lines) + "\n"


def _end_group(pgid: int, grace: float = 20) -> None:
    """SIGTERM every process of the session, SIGKILL what is still there after `grace` seconds."""
    deadline = time.monotonic() + grace
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
            while time.monotonic() < deadline:
                os.killpg(pgid, 0)
                time.sleep(0.2)
        except ProcessLookupError:
            return


def _matches(expected: list[str], actual: list[str]) -> bool:
    patterns = [re.escape(line.rstrip()).replace(re.escape("..."), ".*") for line in expected]
    return len(patterns) == len(actual) and all(
        re.fullmatch(p, a.rstrip()) for p, a in zip(patterns, actual, strict=True)
    )


@pytest.mark.slow
def test_the_use_it_examples_work_as_copied(tiny_store: Path, tmp_path: Path) -> None:
    venv = Path(sys.prefix)
    assert (venv / "bin" / "activate").is_file() and (venv / "bin" / "flux-lora").is_file(), \
        "run the suite from the project's venv (scripts/test.sh does)"
    assert shutil.which("curl"), "the README's examples use curl"
    steps = commands(section(RUNNABLE))
    assert steps[0][0] == "source .venv/bin/activate"
    (tmp_path / ".venv").symlink_to(venv)
    (tmp_path / "weights").symlink_to(tiny_store)
    # A fresh shell: flux-lora only on the PATH once the README's own command activates the venv.
    path = [d for d in os.environ["PATH"].split(os.pathsep) if not (Path(d) / "flux-lora").exists()]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COG_", "FLUX_LORA_", "VIRTUAL_ENV"))}
    env.update(PATH=os.pathsep.join(path), FLUX_LORA_CACHE=str(tmp_path / "lora-cache"))
    proc = subprocess.Popen(["bash", "-c", _script(steps, free_port())], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=900)
    finally:
        _end_group(proc.pid)  # the server the README leaves running, and its worker
    server_log = (tmp_path / "serve.log").read_text()[-2000:] if (tmp_path / "serve.log").exists() else ""
    outputs = re.split(rf"^{re.escape(MARK)}(\d+)\n", stdout, flags=re.M)[1:]
    ran = {int(i): text.splitlines() for i, text in zip(outputs[::2], outputs[1::2], strict=True)}
    failed = max(ran, default=-1)
    assert proc.returncode == 0, f"failed at: $ {steps[failed][0]}\n{stderr[-3000:]}\n{server_log}"
    assert sorted(ran) == list(range(len(steps)))
    for i, (cmd, expected) in enumerate(steps):
        if expected:
            assert _matches(expected, ran[i]), f"$ {cmd}\nREADME shows {expected}\nprinted {ran[i]}"
    assert list((tmp_path / "outputs").glob("prediction-*/out-0.webp")), "flux-lora predict wrote its image"
    # What the reader sees of `flux-lora predict`'s setup: plain lines, none of the libraries' chatter.
    assert "Setup finished" in stderr
    assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f]|torchao|torchvision|kept in float32", stderr), stderr
