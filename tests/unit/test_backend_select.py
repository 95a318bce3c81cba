"""core/backend_select.py: automatic choices, each logged with its reason."""
from __future__ import annotations

import argparse
import logging

import pytest

from kvyard.backend_select import resolve_overlap_schedule
from kvyard.server_args import ServerArgs


# -- overlap scheduling ------------------------------------------------------------------------
@pytest.mark.parametrize("disable, device, expected", [
    (None, "cuda", True), (None, "cpu", False), (True, "cuda", False), (False, "cpu", True),
    (None, "mps", False)])
def test_overlap_default_per_device_and_the_flag_overrides_it(caplog, disable, device, expected):
    with caplog.at_level(logging.INFO, logger="kvyard.backend_select"):
        assert resolve_overlap_schedule(disable, device) is expected
    assert f"overlap schedule: {'on' if expected else 'off'}" in caplog.text
    assert ("auto on" in caplog.text) == (disable is None)


def test_embedding_models_never_overlap(caplog):
    with caplog.at_level(logging.INFO, logger="kvyard.backend_select"):
        assert resolve_overlap_schedule(False, "cuda", is_generation=False) is False
    assert "embedding model" in caplog.text


def test_disable_overlap_schedule_flag_is_unset_unless_given():
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    assert "--disable-overlap-schedule" in parser.format_help()
    given = ServerArgs.from_cli_namespace(parser.parse_args(["--disable-overlap-schedule"]))
    assert given.disable_overlap_schedule is True
    assert ServerArgs.from_cli_namespace(parser.parse_args([])).disable_overlap_schedule is None
