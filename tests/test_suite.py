"""The suite's own bookkeeping: what tests/conftest.py's scheduling for two workers relies on."""

from __future__ import annotations

import re

from conftest import ROOT, SESSION_SERVER_FILES


def test_every_file_using_the_session_servers_is_in_their_work_unit() -> None:
    """Read from the files themselves, so that a partial run (`-m "not slow"`, one file) checks them all."""
    users = {f"tests/{path.name}" for path in (ROOT / "tests").glob("test_*.py")
             if re.search(r"\b(hotswap|trained)_server\b", path.read_text())}
    assert users == set(SESSION_SERVER_FILES), "conftest.SESSION_SERVER_FILES: the files using the session servers"
