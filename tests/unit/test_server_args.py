"""ServerArgs: parse-time checks, YAML config files, flags overriding the file."""
from __future__ import annotations

import argparse

import pytest

from kvyard.server_args import ServerArgs


def parse(argv):
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    return ServerArgs.from_cli_namespace(parser.parse_args(argv))


def test_defaults_and_flags():
    args = parse(["--port", "1234", "--disable-radix-cache", "--chunked-prefill-size", "16"])
    assert (args.port, args.disable_radix_cache, args.chunked_prefill_size) == (1234, True, 16)
    assert args.schedule_policy == "fcfs"


def test_yaml_config_with_flag_override(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("port: 4000\nschedule-policy: lpm\npage_size: 4\n")
    args = parse(["--config", str(cfg), "--port", "5000"])
    assert (args.port, args.schedule_policy, args.page_size) == (5000, "lpm", 4)


def test_yaml_unknown_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("no_such_flag: 1\n")
    with pytest.raises(ValueError, match="config: unknown argument 'no_such_flag'"):
        parse(["--config", str(cfg)])


@pytest.mark.parametrize("kwargs, message", [
    ({"page_size": 0}, "page_size must be >= 1"),
    ({"chunked_prefill_size": 0}, "chunked_prefill_size"),
    ({"mem_fraction_static": 1.5}, "mem_fraction_static"),
    ({"json_model_override_args": "{bad"}, "json_model_override_args"),
    ({"schedule_policy": "nope"}, "schedule_policy"),
])
def test_bad_values_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ServerArgs(**kwargs)
