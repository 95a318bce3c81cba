"""CUDA graphs of the speculative steps on a CUDA device (skipped elsewhere): the target's verify
steps, a STANDALONE draft model's chain and catch-up steps, an EAGLE / EAGLE-3 head's chain steps
and the target's decode steps returning the head's hidden states all replay captured graphs, and
greedy output with graphs on equals graphs off equals no speculation, at batch 1 and 8 (tiny
random Llama, random heads in the published layouts, triton attention, float32).
--disable-cuda-graph turns every one of them off; --cuda-graph-max-bs caps their buckets.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

from gpu_guard import require_gpu

require_gpu()

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "unit", "scheduler"))
from eagle_heads import save_eagle3_head, save_eagle_head  # noqa: E402
from kvyard.executor.cuda_graph_runner import CudaGraphRunner  # noqa: E402
from kvyard.sampling.params import SamplingParams  # noqa: E402
from kvyard.scheduler.io_struct import TokenizedGenerateReq  # noqa: E402
from kvyard.scheduler.process import build_scheduler  # noqa: E402
from kvyard.server_args import ServerArgs  # noqa: E402

PROMPTS = [[(7 * i + 3 * j) % 250 + 1 for j in range(5 + 2 * i)] for i in range(8)]


def params(max_new: int) -> SamplingParams:
    p = SamplingParams.from_dict({"max_new_tokens": max_new, "temperature": 0.0, "ignore_eos": True})
    p.verify(256)
    return p.normalize(None)


class ReplayCounter:
    """Counts replays of a graph runner (CUDA graphs keep no count of their own)."""

    def __init__(self, runner):
        self.count = 0
        if runner is not None:
            replay = runner.replay

            def counted(*args, **kwargs):
                self.count += 1
                return replay(*args, **kwargs)
            runner.replay = counted


def generate(path: str, n: int, max_new: int = 24, **extra) -> tuple[dict, object, dict]:
    """({rid: tokens}, the scheduler (closed), replay counts by runner name)."""
    args = ServerArgs(model_path=path, device="cuda", dtype="float32", skip_tokenizer_init=True,
                      attention_backend="triton", max_total_tokens=4096, max_running_requests=8,
                      disable_overlap_schedule=True, debug_kv_integrity=True, log_level="warning", **extra)
    sched = build_scheduler(args)
    counters = {"target decode": ReplayCounter(sched.runner.decode_graphs),
                "target verify": ReplayCounter(sched.runner.extend_graphs)}
    algo = sched.speculation.algorithm if sched.speculation is not None else None
    if hasattr(algo, "draft"):
        counters["draft decode"] = ReplayCounter(algo.draft.runner.decode_graphs)
        counters["draft catch-up"] = ReplayCounter(algo.draft.runner.extend_graphs)
    if hasattr(algo, "runner"):
        counters["head chain"] = ReplayCounter(algo.runner.chain_graphs)
        counters["head extend"] = ReplayCounter(algo.runner.observe_graphs)
    for i, ids in enumerate(PROMPTS[:n]):   # staggered lengths: the batch shrinks through the buckets
        sched.add_request(TokenizedGenerateReq(f"r{i}", ids, params(max_new + 4 * i)))
    outs = {}
    while sched.has_work():
        outs.update({u.rid: list(u.new_token_ids) for u in sched.step() if u.finished_reason})
    sched.check_integrity()
    sched.close()
    return outs, sched, {k: c.count for k, c in counters.items()}


@pytest.fixture(scope="module")
def heads(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    model = tiny_models["llama"][1]
    return {"EAGLE": save_eagle_head(root / "eagle", model, seed=1),
            "EAGLE3": save_eagle3_head(root / "eagle3", model, seed=2)}


def spec(algorithm: str, path: str, heads: dict) -> dict:
    draft = path if algorithm == "STANDALONE" else heads[algorithm]
    return dict(speculative_algorithm=algorithm, speculative_draft_model_path=draft, speculative_num_steps=3)


@pytest.mark.parametrize("n", [1, 8])
@pytest.mark.parametrize("algorithm", ["STANDALONE", "EAGLE", "EAGLE3"])
def test_graphs_on_equal_graphs_off_equal_no_speculation(tiny_models, heads, algorithm, n):
    path, _ = tiny_models["llama"]
    plain, _, _ = generate(path, n, disable_cuda_graph=True)
    off, off_sched, off_counts = generate(path, n, disable_cuda_graph=True, **spec(algorithm, path, heads))
    on, on_sched, counts = generate(path, n, **spec(algorithm, path, heads))
    assert off == plain and on == plain
    assert off_sched.runner.extend_graphs is None and not any(off_counts.values())
    assert counts["target verify"] > 0, counts
    if algorithm == "STANDALONE":
        assert counts["draft decode"] > 0 and counts["draft catch-up"] > 0, counts
        stats = on_sched.speculation.stats            # draft = target: all accepted but float32 near-ties
        assert stats.accepted >= 0.9 * stats.drafted, stats
    else:
        assert counts["head chain"] > 0 and counts["head extend"] > 0, counts
        assert on_sched.runner.decode_graphs.capture_layers == on_sched.runner.capture_layers


def test_graphs_respect_the_max_batch_size(tiny_models):
    path, _ = tiny_models["llama"]
    plain, _, _ = generate(path, 8, disable_cuda_graph=True)
    outs, sched, counts = generate(path, 8, cuda_graph_max_bs=4, **spec("STANDALONE", path, {}))
    assert outs == plain
    assert sched.runner.extend_graphs.sizes == [1, 2, 4]
    assert type(sched.runner.decode_graphs) is CudaGraphRunner and sched.runner.decode_graphs.sizes == [1, 2, 4]
    assert counts["target verify"] > 0                      # once at most 4 requests were left
