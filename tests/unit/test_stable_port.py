"""``liveavatar up`` puts the session API on a stable port: the preferred one, else the next free one."""

from __future__ import annotations

import socket

import pytest

from infra.local.stack import LOOPBACK, free_port_block
from services.cli.stack_cmd import stable_port

pytestmark = pytest.mark.unit


def test_the_preferred_port_when_free_else_the_next_free_one():
    base = free_port_block(3)
    assert stable_port(base) == base
    with socket.socket() as a, socket.socket() as b:
        a.bind((LOOPBACK, base))
        a.listen()
        assert stable_port(base) == base + 1
        b.bind((LOOPBACK, base + 1))
        b.listen()
        assert stable_port(base) == base + 2
