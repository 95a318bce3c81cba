"""Speculative decoding through the graph runners on the CPU: the target's verify steps replay its
extend graphs, a STANDALONE draft model's chain steps and catch-up extends replay its own graphs,
and with an EAGLE head the target's decode and verify graphs also return the hidden states the
head reads, and the head's chain steps and extends over the target's pairs replay graphs of
their own. The capture is the eager record-and-replay stand-in (kvyard.executor.cuda_graph_runner)
over the triton backend (interpreter), so the graph code paths and the padded layouts run for
real; the output must equal plain decoding token for token. (tests/gpu runs real CUDA graphs.)"""
import os

os.environ["TRITON_INTERPRET"] = "1"   # before triton is imported anywhere in this process

import pytest

from eagle_heads import save_eagle3_head
from kvyard.executor.cuda_graph_runner import CudaGraphConfig, CudaGraphRunner
from kvyard.scheduler.io_struct import TokenizedGenerateReq
from kvyard.scheduler.process import build_scheduler
from kvyard.server_args import ServerArgs
from test_scheduler_workload import make_params

pytest.importorskip("triton")

PROMPTS = [[(7 * i + 3 * j) % 250 + 1 for j in range(5 + i)] for i in range(8)]


def with_graphs(runner, width: int, pad_table_entries: bool = True):
    """The runner's decode steps and extends of up to ``width`` tokens through the graph runners,
    as on CUDA (on the CPU the capture factory is the eager stand-in)."""
    runner.decode_graphs = CudaGraphRunner(CudaGraphConfig(max_bs=8), runner._graph_step, runner.attn_backend,
                                           runner.kv_pool, runner.req_to_token.table, runner.max_running_requests,
                                           "cpu", capture_layers=runner.capture_layers)
    runner.decode_graphs.capture()
    runner.enable_extend_graphs(width, pad_table_entries)
    assert runner.extend_graphs is not None
    return runner


def replays(runner) -> tuple[int, ...]:
    """(decode replays, extend replays) of a ModelRunner so far; (chain-step, observe-extend
    replays) of a draft head."""
    runners = ((runner.chain_graphs, runner.observe_graphs) if hasattr(runner, "chain_graphs")
               else (runner.decode_graphs, runner.extend_graphs))
    return tuple(sum(g.replays for g in graphs.graphs.values()) for graphs in runners)


def generate(path: str, prompts, graphs: bool, max_new: int = 10, **spec):
    args = ServerArgs(model_path=path, dtype="float32", skip_tokenizer_init=True, max_total_tokens=1024,
                      max_running_requests=8, attention_backend="triton", log_level="warning",
                      disable_overlap_schedule=True, debug_kv_integrity=True, **spec)
    sched = build_scheduler(args)
    runners = []
    if graphs:
        cfg = sched.speculation.config
        runners.append(with_graphs(sched.runner, cfg.num_draft_tokens))
        algorithm = sched.speculation.algorithm
        if hasattr(algorithm, "draft"):               # STANDALONE: the draft model's own runner
            from kvyard.executor.draft_model import CATCH_UP_TOKENS
            runners.append(with_graphs(algorithm.draft.runner, CATCH_UP_TOKENS, pad_table_entries=False))  # as DraftModel
        else:                                         # a draft head: its chain steps
            head = algorithm.runner
            head.chain_graphs = head._init_chain_graphs(sched.runner)
            head.observe_graphs = head._init_observe_graphs(sched.runner)
            runners.append(head)
    for i, ids in enumerate(prompts):
        sched.add_request(TokenizedGenerateReq(f"r{i}", ids, make_params(max_new)))
    outs = {}
    while sched.has_work():
        outs.update({u.rid: u.new_token_ids for u in sched.step() if u.finished_reason})
    sched.check_integrity()
    counts = [replays(r) for r in runners]
    stats = sched.load_info()
    sched.close()
    return outs, counts, stats


class PlainOutputs(dict):
    """Plain decoding's outputs of the first n prompts, computed on first use."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def __missing__(self, n: int):
        self[n] = generate(self.path, PROMPTS[:n], graphs=False)[0]
        return self[n]


@pytest.fixture(scope="module")
def plain(tiny_models):
    return PlainOutputs(tiny_models["llama"][0])


def test_standalone_self_draft_through_graphs_equals_plain(tiny_models, plain):
    path, _ = tiny_models["llama"]
    outs, counts, stats = generate(path, PROMPTS[:1], graphs=True, speculative_algorithm="STANDALONE",
                                   speculative_draft_model_path=path, speculative_num_steps=3)
    assert outs == plain[1]
    (target_decode, target_verify), (draft_decode, draft_catch_up) = counts
    assert target_verify > 0 and draft_decode > 0 and draft_catch_up > 0
    assert stats["spec_accept_rate"] == 1.0          # the draft is the target


@pytest.mark.slow
def test_standalone_batch_8_through_graphs_equals_plain(tiny_models, plain):
    path, _ = tiny_models["llama"]
    outs, counts, _ = generate(path, PROMPTS, graphs=True, speculative_algorithm="STANDALONE",
                               speculative_draft_model_path=path, speculative_num_steps=2)
    assert outs == plain[8] and counts[0][1] > 0


@pytest.mark.parametrize("n", [1, pytest.param(8, marks=pytest.mark.slow)])
def test_eagle3_verify_and_decode_graphs_return_the_hidden_states(tiny_models, plain, tmp_path, n):
    path, model = tiny_models["llama"]
    head = save_eagle3_head(tmp_path / "eagle3", model, seed=2)
    outs, counts, _ = generate(path, PROMPTS[:n], graphs=True, speculative_algorithm="EAGLE3",
                               speculative_draft_model_path=head, speculative_num_steps=3)
    assert outs == plain[n]
    assert counts[0][1] > 0                          # verify steps replayed (with the hidden states)
    assert counts[1][0] > 0 and counts[1][1] > 0     # the head's chain steps and extends replayed
