"""The suite's own bookkeeping: what tests/conftest.py's scheduling for two workers relies on."""

from __future__ import annotations

import pytest
from conftest import SESSION_SERVER_FILES


def test_every_file_using_the_session_servers_is_in_their_work_unit(request: pytest.FixtureRequest) -> None:
    users = {item.nodeid.split("::", 1)[0] for item in request.session.items
             if {"hotswap_server", "trained_server"} & set(getattr(item, "fixturenames", ()))}
    assert users <= set(SESSION_SERVER_FILES), "add these files to conftest.SESSION_SERVER_FILES"
