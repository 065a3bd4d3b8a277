"""kafka-python's slow-task warning is off in every process that builds clients through services.common.kafka.

The warning measures wall time, so on a shared CPU it fires whenever the process waits for a core; it
used to leak "Task ... is blocking the event loop" into ``make demo``'s output.
"""

from __future__ import annotations

import logging
import time

import pytest
from kafka.net.selector import NetworkSelector

import services.common.kafka  # noqa: F401  (sets the selector's default)

pytestmark = pytest.mark.unit


def _slow_step(net: NetworkSelector) -> None:
    async def slow():
        time.sleep(0.15)          # one task step over kafka-python's 0.1 s threshold
        return 7

    assert net.run(slow) == 7


def test_a_slow_selector_step_logs_no_warning(caplog):
    net = NetworkSelector()
    try:
        assert net.config["slow_task_threshold_secs"] == 0
        with caplog.at_level(logging.WARNING, logger="kafka"):
            _slow_step(net)
    finally:
        net.close()
    assert not [r for r in caplog.records if "blocking the event loop" in r.getMessage()]


def test_the_check_would_warn_with_the_library_default(caplog):
    """The same step with kafka-python's own 0.1 s threshold does warn: the test above can fail."""
    net = NetworkSelector(slow_task_threshold_secs=0.1)
    try:
        with caplog.at_level(logging.WARNING, logger="kafka"):
            _slow_step(net)
    finally:
        net.close()
    assert [r for r in caplog.records if "blocking the event loop" in r.getMessage()]
