"""Every SGLang launch flag parses on kvyard's commands: kvyard's own act, the rest are refused
by name ("not supported by kvyard", non-zero exit) unless their value is what kvyard does anyway;
no prefix abbreviation."""
from __future__ import annotations

import subprocess
import sys

import pytest

from kvyard.compat import flags, sglang_flag_names as names
from kvyard.server_args import ServerArgs

OWN = set(ServerArgs.__dataclass_fields__)


def parser():
    from kvyard.cli.serve import build_parser
    return build_parser()


def argv_for(name: str) -> list[str]:
    if name in names.SWITCH or name in names.BOOL_OPTIONAL or name in names.OPTIONAL_VALUE:
        return ["--" + name]
    if name in names.MULTI:
        return ["--" + name, "a", "b"]
    return ["--" + name, "7"]


def test_every_unsupported_sglang_flag_is_refused_by_name():
    p, unsupported = parser(), [n for n in flags.ALL if n.replace("-", "_") not in OWN]
    assert len(unsupported) > 400
    for name in unsupported:
        ns = p.parse_args(argv_for(name))
        with pytest.raises(ValueError, match=f"--{name} is not supported by kvyard"):
            ServerArgs.from_cli_namespace(ns)


def test_every_flag_and_alias_parses():
    p = parser()
    for name in flags.ALL:
        p.parse_args(argv_for(name) if name.replace("-", "_") not in OWN or name in names.SWITCH else [])
    for alias in names.ALIASES:
        assert "--" + alias in p._option_string_actions, alias


def test_neutral_values_are_accepted():
    ns = parser().parse_args(["--tp", "1", "--dp-size", "1", "--kv-cache-dtype", "auto",
                              "--sampling-backend", "pytorch", "--model", "/some/model"])
    assert ServerArgs.from_cli_namespace(ns).model_path == "/some/model"
    with pytest.raises(ValueError, match="sampling_backend: flashinfer is not supported yet"):
        ServerArgs.from_cli_namespace(parser().parse_args(["--sampling-backend", "flashinfer"]))


def test_no_prefix_abbreviation():
    from kvyard.bench.one_batch import build_parser
    assert build_parser().parse_args(["--model", "M"]).model_path == "M"
    with pytest.raises(SystemExit):
        parser().parse_args(["--model-pat", "M"])


def test_refusal_exits_non_zero_with_one_line():
    r = subprocess.run([sys.executable, "-m", "kvyard.cli", "serve", "--ep", "2", "--cpu-offload-gb", "4"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "--ep-size, --cpu-offload-gb are not supported by kvyard" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_engine_keyword_arguments():
    assert flags.engine_kwargs({"ep_size": 1, "log_level": "info"}, OWN) == {"log_level": "info"}
    with pytest.raises(ValueError, match="enable_two_batch_overlap is not supported by kvyard"):
        flags.engine_kwargs({"enable_two_batch_overlap": True}, OWN)


HONOURED = ("enable-return-hidden-states", "enable-mixed-chunk", "decode-log-interval", "show-time-cost",
            "download-dir", "base-gpu-id", "gpu-id-step", "sampling-backend", "prefill-only-one-req",
            "prefill-max-requests", "delete-ckpt-after-loading")


def test_flags_kvyard_honours_parse_as_sglang_writes_them():
    assert all(name.replace("-", "_") in OWN for name in HONOURED)
    ns = parser().parse_args(["--enable-mixed-chunk", "--decode-log-interval", "10", "--show-time-cost",
                              "--prefill-only-one-req", "--enable-return-hidden-states"])
    args = ServerArgs.from_cli_namespace(ns)
    config = args.scheduler_config(8, 2048, False)
    assert config.enable_mixed_chunk and config.decode_log_interval == 10 and config.show_time_cost
    assert config.prefill_max_requests == 1 and args.enable_return_hidden_states
    off = ServerArgs.from_cli_namespace(parser().parse_args(["--prefill-only-one-req", "false"]))
    assert off.scheduler_config(8, 2048, False).prefill_max_requests is None
    with pytest.raises(SystemExit):
        parser().parse_args(["--prefill-only-one-req", "maybe"])
    with pytest.raises(ValueError, match="--cpu-offload-gb is not supported by kvyard"):
        ServerArgs.from_cli_namespace(parser().parse_args(["--cpu-offload-gb", "4"]))
