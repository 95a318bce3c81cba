"""The CUDA-graph runner's bucketing, padding and buffer logic on the CPU, through the eager
record-and-replay capture stand-in; then a tiny Llama decoding through it with the triton
backend (interpreter) gives the same logits as eager decode steps."""
import os

os.environ["TRITON_INTERPRET"] = "1"   # before triton is imported anywhere in this process

import pytest
import torch

from forward_harness import Harness, PagedKV, Seq, tiny_llama_on_triton
from kvyard.attention import AttentionBackend
from kvyard.executor.cuda_graph_runner import (CudaGraphConfig, CudaGraphRunner, DecodeInputBuffers,
                                      EagerReplayCapture, default_buckets, padded_size)
from kvyard.forward_batch import ForwardMode
from kvyard.server_args import ServerArgs


# -- buckets -----------------------------------------------------------------------------------
def test_default_buckets_reach_the_limit():
    assert default_buckets(1) == [1]
    assert default_buckets(3) == [1, 2, 3]
    assert default_buckets(8) == [1, 2, 4, 8]
    assert default_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert default_buckets(160)[-3:] == [144, 152, 160] and len(default_buckets(160)) == 23


def test_capture_sizes_follow_the_flags():
    assert CudaGraphConfig().capture_sizes(512)[-1] == 160
    assert CudaGraphConfig().capture_sizes(12) == [1, 2, 4, 8, 12]
    assert CudaGraphConfig(max_bs=4).capture_sizes(512) == [1, 2, 4]
    assert CudaGraphConfig(batch_sizes=(8, 1, 2, 2, 64)).capture_sizes(16) == [1, 2, 8]
    assert CudaGraphConfig(batch_sizes=(64,)).capture_sizes(16) == [16]
    assert CudaGraphConfig(disable=True).capture_sizes(512) == []
    with pytest.raises(ValueError, match="cuda_graph_max_bs"):
        CudaGraphConfig(max_bs=0)
    with pytest.raises(ValueError, match="cuda_graph_bs"):
        CudaGraphConfig(batch_sizes=(1, 0))


def test_padding_picks_the_next_bucket_or_none():
    sizes = [1, 2, 4, 8]
    assert [padded_size(sizes, b, True) for b in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, None]
    assert [padded_size(sizes, b, False) for b in (1, 3, 4, 9)] == [1, None, 4, None]


def test_server_args_flags_build_the_config():
    args = ServerArgs(cuda_graph_bs=[1, 4], disable_cuda_graph_padding=True)
    cfg = args.cuda_graph_config()
    assert cfg.batch_sizes == (1, 4) and cfg.disable_padding and not cfg.disable
    assert ServerArgs(disable_cuda_graph=True, cuda_graph_max_bs=8).cuda_graph_config().capture_sizes(64) == []
    with pytest.raises(ValueError, match="cuda_graph_bs"):
        ServerArgs(cuda_graph_bs=[0])
    with pytest.raises(ValueError, match="cuda_graph_max_bs"):
        ServerArgs(cuda_graph_max_bs=0)


def test_cli_parses_the_graph_and_attention_flags():
    import argparse
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    ns = parser.parse_args(["--cuda-graph-bs", "1", "2", "4", "--disable-cuda-graph-padding",
                            "--triton-attention-num-kv-splits", "4", "--triton-attention-reduce-in-fp32",
                            "--decode-attention-backend", "triton"])
    args = ServerArgs.from_cli_namespace(ns)
    assert args.cuda_graph_bs == [1, 2, 4] and args.disable_cuda_graph_padding
    assert args.attention_options() == {"triton_attention_num_kv_splits": 4,
                                        "triton_attention_reduce_in_fp32": True}
    assert args.decode_attention_backend == "triton" and args.prefill_attention_backend is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--prefill-attention-backend", "no_such_backend"])


# -- buffers -----------------------------------------------------------------------------------
def decode_fb(rows: list[int], seq_lens: list[int], slots: list[int], backend=None):
    h = Harness(model=None, backend=backend, kv=PagedKV(1, 1, 8, num_pages=64))
    fb = h._batch(ForwardMode.DECODE, [Seq(r, []) for r in rows], [7 + r for r in rows],
                  [n - 1 for n in seq_lens], torch.tensor(slots), seq_lens, [n - 1 for n in seq_lens],
                  [1] * len(rows), list(range(len(rows))), list(range(len(rows))))
    return fb


def test_fill_copies_real_rows_and_pads_with_the_dummy_request():
    buffers = DecodeInputBuffers(8, "cpu")
    addresses = [t.data_ptr() for t in (buffers.input_ids, buffers.seq_lens)]
    buffers.fill(decode_fb([3, 5, 1], [10, 4, 7], [33, 12, 40]), 4)
    assert buffers.input_ids[:4].tolist() == [10, 12, 8, 0]
    assert buffers.positions[:4].tolist() == [9, 3, 6, 0]
    assert buffers.out_cache_loc[:4].tolist() == [33, 12, 40, 0]      # dummy slot 0
    assert buffers.req_pool_indices[:4].tolist() == [3, 5, 1, 0]     # dummy row 0
    assert buffers.seq_lens[:4].tolist() == [10, 4, 7, 1]
    buffers.fill(decode_fb([2], [5], [9]), 2)                         # a smaller batch after
    assert buffers.req_pool_indices[:2].tolist() == [2, 0] and buffers.seq_lens[:2].tolist() == [5, 1]
    assert [t.data_ptr() for t in (buffers.input_ids, buffers.seq_lens)] == addresses
    with pytest.raises(ValueError, match="padded batch size"):
        buffers.fill(decode_fb([2, 3], [5, 5], [9, 8]), 9)


class RecordingBackend(AttentionBackend):
    """Records the graph hooks; its 'attention' is a function of the buffers it reads."""
    name = "recording"
    supports_cuda_graph = True

    def __init__(self):
        self.calls = []

    def forward_extend(self, q, layer, fb):
        raise AssertionError("graphs are decode only")

    def forward_decode(self, q, layer, fb):
        raise AssertionError("unused")

    def init_cuda_graph_state(self, max_bs):
        self.calls.append(("state", max_bs))

    def init_forward_metadata_capture(self, fb):
        self.calls.append(("capture", fb.batch_size))

    def init_forward_metadata_replay(self, fb):
        self.calls.append(("replay", fb.batch_size, fb.real_batch_size, list(fb.seq_lens_cpu)))


def toy_step(fb):
    """A 'model': [B, 3] rows of (input id, slot, table row * 100 + seq len)."""
    return torch.stack([fb.input_ids, fb.out_cache_loc, fb.req_pool_indices * 100 + fb.seq_lens], 1).float()


def make_runner(config, backend, max_reqs=16):
    kv = PagedKV(1, 1, 8, num_pages=64)
    return CudaGraphRunner(config, toy_step, backend, kv.pool, kv.req_to_token, max_reqs, "cpu")


def test_runner_captures_largest_first_and_replays_padded():
    backend = RecordingBackend()
    runner = make_runner(CudaGraphConfig(max_bs=8), backend)
    runner.capture()
    assert backend.calls == [("state", 8), ("capture", 8), ("capture", 4), ("capture", 2), ("capture", 1)]
    assert all(isinstance(g, EagerReplayCapture) for g in runner.graphs.values())
    fb = decode_fb([3, 5, 1], [10, 4, 7], [33, 12, 40], backend)
    assert runner.can_run(fb)
    out = runner.replay(fb)
    assert out.tolist() == toy_step(fb).tolist()                     # real rows only
    assert backend.calls[-1] == ("replay", 4, 3, [10, 4, 7, 1])
    static = runner.graphs[4].output
    assert static[3].tolist() == [0, 0, 1] and out.data_ptr() == static.data_ptr()
    assert runner.graphs[4].replays == 1 and runner.graphs[8].replays == 0


def test_runner_declines_what_it_cannot_replay():
    backend = RecordingBackend()
    runner = make_runner(CudaGraphConfig(batch_sizes=(2, 4), disable_padding=True), backend)
    runner.capture()
    assert runner.can_run(decode_fb([1, 2], [3, 3], [5, 6], backend))
    assert not runner.can_run(decode_fb([1, 2, 3], [3, 3, 3], [5, 6, 7], backend))     # no padding
    assert not runner.can_run(decode_fb([1, 2, 3, 4, 5], [3] * 5, [5, 6, 7, 8, 9], backend))
    extend = decode_fb([1], [3], [5], backend)
    extend.mode = ForwardMode.EXTEND
    assert not runner.can_run(extend)
    off = make_runner(CudaGraphConfig(disable=True), backend)
    off.capture()
    assert not off.can_run(decode_fb([1], [3], [5], backend)) and not off.graphs


def test_a_backend_without_graph_support_is_a_clear_error():
    backend = RecordingBackend()
    backend.supports_cuda_graph = False
    with pytest.raises(ValueError, match="does not support CUDA graphs"):
        make_runner(CudaGraphConfig(max_bs=2), backend).capture()


# -- a real model through the runner -------------------------------------------------------------
def test_tiny_llama_decode_through_graphs_equals_eager():
    pytest.importorskip("triton")
    model, backend, kv = tiny_llama_on_triton(triton_attention_num_kv_splits=2)
    harness = Harness(model, backend, kv)
    runner = CudaGraphRunner(CudaGraphConfig(batch_sizes=(2, 4)), lambda fb: model.compute_logits(model(fb.input_ids, fb.positions, fb)),
                             backend, kv.pool, kv.req_to_token, 4, "cpu")
    runner.capture()

    seqs = harness.add([[5, 9, 2, 7], [1] * 19, [3, 3]])
    logits = harness.prefill(seqs)
    for step in range(3):
        if step == 2:
            seqs = seqs[:2]                      # a request finished: 3 rows (bucket 4) -> 2 (bucket 2)
            logits = logits[:2]
        for seq, token in zip(seqs, logits.argmax(-1).tolist()):
            seq.tokens.append(token)
        fb = harness.decode_batch(seqs)
        assert runner.can_run(fb)
        graph_logits = runner.replay(fb).clone()
        logits = harness.run(fb, seqs)           # eager: same slots, same k/v written again
        torch.testing.assert_close(graph_logits, logits, rtol=1e-5, atol=1e-5)
        assert graph_logits.argmax(-1).tolist() == logits.argmax(-1).tolist()
