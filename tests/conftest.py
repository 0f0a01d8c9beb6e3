"""Fixtures shared by the test modules."""

import logging

import pytest


@pytest.fixture
def flwr_log():
    """Records of Flower's logger (it does not propagate to pytest's caplog)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("flwr")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)
