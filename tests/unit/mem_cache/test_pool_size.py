"""The default CPU KV pool follows the formula of kvyard.mem_cache.pool_size, which --help states."""
import argparse

import pytest
import torch

from kvyard.mem_cache import pool_size
from kvyard.mem_cache.kv_pool import KVPool
from kvyard.mem_cache.pool_size import default_cpu_pool_tokens

GiB = 2**30


@pytest.mark.parametrize("context, per_token, available, expected", [
    (8192, 46080, 20 * GiB, 4 * 8192),                       # the contexts bound it
    (131072, 46080, 20 * GiB, int(20 * GiB * 0.4) // 46080),  # the memory bounds it
    (128, 46080, 20 * GiB, 1024),                             # the floor
    (8192, 46080, 1 * 2**20, 1024),                           # no memory: still the floor
])
def test_default_pool_follows_the_formula(context, per_token, available, expected):
    assert default_cpu_pool_tokens(context, per_token, available) == expected
    if expected > pool_size.MIN_POOL_TOKENS:
        by_memory = int(available * pool_size.CPU_KV_MEMORY_FRACTION) // per_token
        assert expected == min(pool_size.CPU_KV_CONTEXTS * context, by_memory)


def test_help_states_the_formula():
    from kvyard.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    action = next(a for a in parser._actions if a.dest == "max_total_tokens")
    assert pool_size.FORMULA in action.help
    assert f"{pool_size.CPU_KV_CONTEXTS} x context length" in action.help


def test_model_runner_sizes_its_pool_by_the_formula(tmp_path, monkeypatch):
    from quant_helpers import save_float, tiny_llama

    from kvyard.executor import model_runner
    from kvyard.executor.model_runner import ModelRunner, RunnerConfig

    save_float(tiny_llama(max_position_embeddings=512), tmp_path)
    monkeypatch.setattr(model_runner, "available_memory", lambda: 64 * GiB)
    r = ModelRunner(RunnerConfig(model_path=str(tmp_path), dtype="float32", max_running_requests=8, num_threads=1))
    per_token = r.kv_layout.bytes_per_token(r.kv_dtype)
    assert r.max_total_tokens == default_cpu_pool_tokens(r.model_config.context_length, per_token, 64 * GiB)
    assert r.max_total_tokens == max(pool_size.MIN_POOL_TOKENS, pool_size.CPU_KV_CONTEXTS * 512)


def test_cpu_pool_is_zero_and_writable():
    pool = KVPool(2048, 2, 2, 8, torch.float32, "cpu")
    assert all(int(b.count_nonzero()) == 0 for b in pool.k_buffers + pool.v_buffers)
    loc = torch.tensor([5, 9])
    pool.set_kv(1, loc, torch.ones(2, 2, 8), torch.full((2, 2, 8), 2.0))
    assert pool.k_buffers[1][loc].eq(1).all() and pool.v_buffers[1][loc].eq(2).all()
    assert int(pool.k_buffers[0].count_nonzero()) == 0
