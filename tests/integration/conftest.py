"""The real broker and the real Redis, started once per test session on free loopback ports."""

from __future__ import annotations

import pytest

from infra.local.stack import LocalStack, StackInfo


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory) -> StackInfo:
    stack = LocalStack(tmp_path_factory.mktemp("stack"))
    info = stack.up()
    yield info
    stack.down()


@pytest.fixture(scope="session")
def kafka_bootstrap(local_stack) -> str:
    return local_stack.kafka_bootstrap


@pytest.fixture(scope="session")
def redis_url(local_stack) -> str:
    return local_stack.redis_url
