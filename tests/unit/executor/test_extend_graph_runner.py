"""Extend CUDA graphs (the speculative verify step) on the CPU: the padded layout, the buffers, the
triton backend's static metadata against its eager metadata, and a tiny Llama whose verify-shaped
extends replayed through the runner (eager record-and-replay stand-in, triton interpreter) give
the eager logits and hidden states."""
import os

os.environ["TRITON_INTERPRET"] = "1"   # before triton is imported anywhere in this process

import pytest
import torch

from forward_harness import Harness, PagedKV, Seq, tiny_llama_on_triton
from kvyard.attention import AttentionBackend
from kvyard.executor.cuda_graph_runner import CudaGraphConfig, EagerReplayCapture
from kvyard.executor.extend_graph_runner import ExtendGraphRunner, ExtendInputBuffers, ExtendLayout
from kvyard.forward_batch import FINAL_HIDDEN, ForwardMode


def extend_fb(kv: PagedKV, prefixes: list[int], counts: list[int], backend=None, rows=None):
    """An extend batch: request i has prefixes[i] cached tokens and counts[i] new ones."""
    h = Harness(model=None, backend=backend, kv=kv)
    seqs = []
    for i, (p, n) in enumerate(zip(prefixes, counts)):
        seq = Seq(rows[i] if rows else kv.new_row(), [10 * i + j for j in range(p + n)])
        if rows:
            kv.pages[seq.row] = []
        kv.allocate(seq.row, 0, p)
        seq.kv_len = p
        seqs.append(seq)
    return h.extend_batch(seqs, counts, all_logits=True), seqs


# -- layout and buffers ------------------------------------------------------------------------
def test_layout_pads_each_request_to_the_width_and_the_batch_to_the_bucket():
    kv = PagedKV(1, 1, 8, num_pages=64)
    fb, _ = extend_fb(kv, [5, 2], [3, 1])
    layout = ExtendLayout(fb, width=3, padded_bs=4)
    assert layout.dest == [0, 1, 2, 3]
    assert layout.prefix == [5, 2, 0, 0]
    assert layout.positions == [5, 6, 7, 2, 3, 4, 0, 1, 2, 0, 1, 2]
    assert layout.pad_entries == [(1, 3), (1, 4)]           # request 1's two padded positions
    with pytest.raises(ValueError, match="1..2 new tokens"):
        ExtendLayout(fb, width=2, padded_bs=4)
    with pytest.raises(ValueError, match="padded batch size"):
        ExtendLayout(fb, width=3, padded_bs=1)


def test_fill_scatters_real_rows_and_points_padding_at_the_dummy_slot():
    kv = PagedKV(1, 1, 8, num_pages=64)
    fb, seqs = extend_fb(kv, [5, 2], [3, 1])
    kv.req_to_token[seqs[1].row, 3:5] = 77                   # stale entries (e.g. a draft head's scratch)
    buffers = ExtendInputBuffers(max_bs=4, width=3, device="cpu")
    addresses = [t.data_ptr() for t in (buffers.input_ids, buffers.positions, buffers.seq_lens)]
    dest = buffers.fill(fb, ExtendLayout(fb, 3, 4), kv.req_to_token)
    assert dest.tolist() == [0, 1, 2, 3]
    assert buffers.input_ids[:12].tolist() == fb.input_ids.tolist()[:3] + [fb.input_ids[3].item(), 0, 0] + [0] * 6
    assert buffers.positions[:12].tolist() == [5, 6, 7, 2, 3, 4, 0, 1, 2, 0, 1, 2]
    slots = fb.out_cache_loc.tolist()
    assert buffers.out_cache_loc[:12].tolist() == slots[:3] + [slots[3], 0, 0] + [0] * 6
    assert buffers.req_pool_indices[:4].tolist() == [seqs[0].row, seqs[1].row, 0, 0]
    assert buffers.seq_lens[:4].tolist() == [8, 5, 3, 3]
    assert kv.req_to_token[seqs[1].row, 3:5].tolist() == [0, 0]      # padded rows read slot 0
    assert kv.req_to_token[seqs[1].row, 2].item() == slots[3]         # the real entry is kept
    assert [t.data_ptr() for t in (buffers.input_ids, buffers.positions, buffers.seq_lens)] == addresses


class RecordingBackend(AttentionBackend):
    name = "recording"
    supports_cuda_graph = True
    supports_extend_graph = True

    def __init__(self):
        self.calls = []

    def forward_extend(self, q, layer, fb):
        raise AssertionError("unused")

    def forward_decode(self, q, layer, fb):
        raise AssertionError("unused")

    def init_extend_graph_state(self, max_bs, tokens_per_req):
        self.calls.append(("state", max_bs, tokens_per_req))

    def init_forward_metadata_capture(self, fb):
        self.calls.append(("capture", fb.mode.name, fb.batch_size, list(fb.extend_seq_lens_cpu)))

    def init_forward_metadata_replay(self, fb):
        self.calls.append(("replay", fb.batch_size, fb.real_batch_size, list(fb.extend_prefix_lens_cpu)))


def toy_step(fb):
    """[T, 3] rows of (input id, slot, position): a 'model' reading only the buffers."""
    return torch.stack([fb.input_ids, fb.out_cache_loc, fb.positions], 1).float()


def test_runner_replays_padded_and_gathers_the_asked_rows():
    kv = PagedKV(1, 1, 8, num_pages=64)
    backend = RecordingBackend()
    runner = ExtendGraphRunner(CudaGraphConfig(max_bs=4), 3, toy_step, backend, kv.pool, kv.req_to_token, 16, "cpu")
    runner.capture()
    assert backend.calls == [("state", 4, 3), ("capture", "EXTEND", 4, [3] * 4), ("capture", "EXTEND", 2, [3] * 2),
                             ("capture", "EXTEND", 1, [3])]
    assert all(isinstance(g, EagerReplayCapture) for g in runner.graphs.values())
    fb, _ = extend_fb(kv, [5, 2, 4], [3, 1, 2], backend)
    assert runner.can_run(fb)
    out = runner.replay(fb)
    assert out.tolist() == toy_step(fb).tolist()             # every real row, in the batch's order
    assert backend.calls[-1] == ("replay", 4, 3, [5, 2, 4, 0])
    fb.logits_indices = torch.tensor([2, 3, 5])              # the last row of each request
    assert runner.replay(fb).tolist() == toy_step(fb)[[2, 3, 5]].tolist()


def test_a_batch_with_a_field_the_layout_does_not_place_runs_eagerly():
    """A ForwardBatch field added later (e.g. a tree attention mask) must not be replayed without
    it: the runner declines any field it does not know."""
    import dataclasses

    from kvyard.forward_batch import ForwardBatch

    @dataclasses.dataclass
    class WithTreeMask(ForwardBatch):
        tree_mask: object = None

    kv = PagedKV(1, 1, 8, num_pages=64)
    runner = ExtendGraphRunner(CudaGraphConfig(max_bs=2), 3, toy_step, RecordingBackend(), kv.pool,
                               kv.req_to_token, 16, "cpu")
    runner.capture()
    fb, _ = extend_fb(kv, [4], [3])
    tree = WithTreeMask(**{f.name: getattr(fb, f.name) for f in dataclasses.fields(fb)})
    assert runner.can_run(tree)
    tree.tree_mask = torch.ones(3, 3, dtype=torch.bool)
    assert not runner.can_run(tree)


def test_a_per_row_input_follows_the_layout_and_the_table_can_stay_untouched():
    kv = PagedKV(1, 1, 8, num_pages=64)
    backend = RecordingBackend()

    def step(fb):   # (the row input's first column, then the whole input)
        return fb.extras["row_input"][:, 0] * 1, fb.extras["row_input"] * 1
    runner = ExtendGraphRunner(CudaGraphConfig(max_bs=2), 3, step, backend, kv.pool, kv.req_to_token, 16, "cpu",
                               row_input=(2, torch.float32), pad_table_entries=False)
    runner.capture()
    fb, seqs = extend_fb(kv, [5, 2], [3, 1], backend)
    kv.req_to_token[seqs[1].row, 3:5] = 77                          # e.g. slots the owner frees next
    rows = torch.arange(8.0).view(4, 2)
    firsts, whole = runner.replay(fb, row_input=rows)
    assert firsts.tolist() == [0.0, 2.0, 4.0, 6.0] and torch.equal(whole, rows)
    assert runner.buffers.row_input[4:6].abs().sum() == 0           # padded rows read zeros
    assert kv.req_to_token[seqs[1].row, 3:5].tolist() == [77, 77]
    with pytest.raises(ValueError, match="needs row_input"):
        runner.replay(fb)


def test_runner_declines_what_it_cannot_replay():
    kv = PagedKV(1, 1, 8, num_pages=64, max_context=16)
    backend = RecordingBackend()
    runner = ExtendGraphRunner(CudaGraphConfig(max_bs=2), 3, toy_step, backend, kv.pool, kv.req_to_token, 16, "cpu")
    runner.capture()
    assert runner.can_run(extend_fb(kv, [4], [3], backend)[0])
    assert not runner.can_run(extend_fb(kv, [4], [4], backend)[0])                  # wider than captured
    assert not runner.can_run(extend_fb(kv, [2, 2, 2], [1, 1, 1], backend)[0])      # no bucket of 3
    assert not runner.can_run(extend_fb(kv, [14], [1], backend)[0])                 # padding past the row
    hidden = extend_fb(kv, [4], [2], backend)[0]
    hidden.capture_layers = (FINAL_HIDDEN,)
    assert not runner.can_run(hidden)                                               # captured without
    extra = extend_fb(kv, [4], [2], backend)[0]
    extra.extras["token_type_ids"] = torch.zeros(2, dtype=torch.int64)
    assert not runner.can_run(extra)                                                # model extras
    decode = extend_fb(kv, [4], [1], backend)[0]
    decode.mode = ForwardMode.DECODE
    assert not runner.can_run(decode)
    off = ExtendGraphRunner(CudaGraphConfig(disable=True), 3, toy_step, backend, kv.pool, kv.req_to_token, 16, "cpu")
    off.capture()
    assert not off.graphs and not off.can_run(extend_fb(kv, [4], [3], backend)[0])
    backend.supports_extend_graph = False
    with pytest.raises(ValueError, match="does not support CUDA graphs of extend steps"):
        ExtendGraphRunner(CudaGraphConfig(max_bs=2), 3, toy_step, backend, kv.pool, kv.req_to_token, 16, "cpu").capture()


# -- the triton backend's static metadata --------------------------------------------------------
def triton_backend(kv: PagedKV, num_heads: int = 4, head_dim: int = 16):
    pytest.importorskip("triton")
    from kvyard_plugins.attention.triton_backend import TritonAttnBackend

    return TritonAttnBackend(kv.backend_config(num_heads, head_dim))


def test_triton_extend_graph_metadata_equals_the_eager_metadata():
    kv = PagedKV(2, 2, 16, num_pages=64)
    backend = triton_backend(kv)
    buffers = ExtendInputBuffers(max_bs=4, width=3, device="cpu")
    backend.init_extend_graph_state(4, 3)
    graph_fb = buffers.batch(4, kv.pool, kv.req_to_token, backend)
    backend.init_forward_metadata_capture(graph_fb)
    captured = graph_fb.attn_metadata
    fb, _ = extend_fb(kv, [5, 2, 4, 7], [3, 3, 3, 3], backend)
    backend.init_forward_metadata(fb)
    eager = fb.attn_metadata
    buffers.fill(fb, ExtendLayout(fb, 3, 4), kv.req_to_token)
    graph_fb.extend_prefix_lens_cpu = list(fb.extend_prefix_lens_cpu)
    backend.init_forward_metadata_replay(graph_fb)
    assert graph_fb.attn_metadata is captured                       # the captured views, refilled
    assert captured.q_lens.tolist() == eager.q_lens.tolist()
    assert captured.prefix_lens.tolist() == eager.prefix_lens.tolist()
    assert captured.max_q_len == eager.max_q_len
    assert graph_fb.extend_start_loc.tolist() == fb.extend_start_loc.tolist()
    assert graph_fb.seq_lens.tolist() == fb.seq_lens.tolist()
    with pytest.raises(ValueError, match="requests of 3 tokens"):
        bad, _ = extend_fb(kv, [1], [2], backend)
        backend.init_forward_metadata_capture(bad)


# -- a real model through the runner -------------------------------------------------------------
def model_step(model):
    def step(fb):
        logits = model.compute_logits(model(fb.input_ids, fb.positions, fb)[fb.logits_indices])
        return (logits, *(fb.captured[i] for i in fb.capture_layers)) if fb.capture_layers else logits
    return step


@pytest.mark.parametrize("capture", [None, (0, FINAL_HIDDEN)], ids=["logits", "hidden"])
def test_tiny_llama_verify_extends_through_graphs_equal_eager(capture):
    pytest.importorskip("triton")
    model, backend, kv = tiny_llama_on_triton()
    harness = Harness(model, backend, kv)
    runner = ExtendGraphRunner(CudaGraphConfig(batch_sizes=(2, 4)), 4, model_step(model), backend, kv.pool,
                               kv.req_to_token, 4, "cpu", capture_layers=capture)
    runner.capture()
    seqs = harness.add([[5, 9, 2, 7], [1] * 19, [3, 3]])
    harness.prefill(seqs)
    # verify-shaped steps: 4, then mixed 1..4, then 2 rows per request after one finished
    for counts in ([4, 4, 4], [1, 4, 2], [3, 2]):
        seqs = seqs[:len(counts)]
        for seq, n in zip(seqs, counts):
            seq.tokens += [(7 * len(seq.tokens) + j) % 128 for j in range(n)]
        fb = harness.extend_batch(seqs, counts, all_logits=True)
        fb.capture_layers = capture
        assert runner.can_run(fb)
        out = runner.replay(fb)
        graph_logits, graph_hidden = (out[0], out[1:]) if capture else (out, ())
        graph_logits = graph_logits.clone()
        eager_logits = harness.run(fb, seqs)       # eager: same slots, same k/v written again
        torch.testing.assert_close(graph_logits, eager_logits, rtol=1e-5, atol=1e-5)
        for layer, hidden in zip(capture or (), graph_hidden):
            torch.testing.assert_close(hidden, fb.captured[layer], rtol=1e-5, atol=1e-5)
