"""LoRA batches through the decode-graph mechanism (the CPU's eager record-and-replay capture,
the Triton LoRA kernels and Triton attention under the interpreter): the adapter slots are graph
inputs, refilled per replay, padded rows take no adapter — outputs still equal PEFT's, with
overlap scheduling on."""
import os

os.environ["TRITON_INTERPRET"] = "1"   # before triton is imported anywhere in this process

import pytest

pytest.importorskip("triton")

from lora_fixtures import greedy_params, make_adapters, peft_greedy, peft_model, tiny_base
from kvyard.executor.cuda_graph_runner import CudaGraphConfig, CudaGraphRunner, EagerReplayCapture
from kvyard.scheduler.io_struct import TokenizedGenerateReq
from kvyard.scheduler.process import build_scheduler
from kvyard.server_args import ServerArgs


def test_decode_buffers_carry_the_adapter_slots():
    """The graph's LoRA inputs are views of the buffers: a fill writes each row's slot and -1 for
    padded rows; without LoRA in the step every row is the base model."""
    import torch

    from kvyard.forward_batch import ForwardBatch, ForwardMode
    from kvyard.executor.cuda_graph_runner import DecodeInputBuffers
    from kvyard.lora.batch import build_batch_info

    buffers = DecodeInputBuffers(8, "cpu", with_lora=True)
    graph_fb = buffers.batch(4, None, None, None)
    long = dict(dtype=torch.int64)
    fb = ForwardBatch(mode=ForwardMode.DECODE, batch_size=3, input_ids=torch.tensor([1, 2, 3]),
                      positions=torch.tensor([4, 5, 6]), out_cache_loc=torch.tensor([7, 8, 9]),
                      req_pool_indices=torch.tensor([1, 2, 3]), seq_lens=torch.tensor([5, 6, 7]),
                      seq_lens_cpu=[5, 6, 7], extend_prefix_lens_cpu=[4, 5, 6], extend_seq_lens_cpu=[1, 1, 1],
                      extend_start_loc=torch.arange(3, **long), logits_indices=torch.arange(3, **long),
                      req_to_token=None, kv_pool=None, attn_backend=None,
                      lora=build_batch_info([2, -1, 0], [1, 1, 1], "cpu"))
    buffers.fill(fb, 4)
    assert graph_fb.lora.seg_slots.tolist() == [2, -1, 0, -1]
    assert graph_fb.lora.seg_indptr.tolist() == [0, 1, 2, 3, 4] and graph_fb.lora.max_seg_len == 1
    assert [(s, (r.start, r.stop)) for s, r in graph_fb.lora.slot_groups()] == [(2, (0, 1)), (0, (2, 3))]
    fb.lora = None
    buffers.fill(fb, 4)
    assert graph_fb.lora.seg_slots.tolist() == [-1, -1, -1, -1]


@pytest.mark.slow
def test_graph_replays_with_adapter_slots_match_peft(tmp_path):
    base = tiny_base("llama", str(tmp_path / "base"))
    adapters = make_adapters(base, str(tmp_path))
    scheduler = build_scheduler(ServerArgs(
        model_path=str(tmp_path / "base"), dtype="float32", skip_tokenizer_init=True, max_total_tokens=256,
        max_running_requests=4, attention_backend="triton", lora_backend="triton", log_level="warning",
        lora_paths=[f"{n}={p}" for n, p in adapters.items()], disable_overlap_schedule=False,
        debug_kv_integrity=True))
    runner = scheduler.runner
    graphs = CudaGraphRunner(CudaGraphConfig(), runner._logits_step, runner.attn_backend, runner.kv_pool,
                             runner.req_to_token.table, runner.max_running_requests, "cpu",
                             capture_factory=EagerReplayCapture, with_lora=True)
    graphs.capture()
    runner.decode_graphs = graphs
    prompt = [5, 17, 33, 2, 9]
    steps = {"qv": 5, "all": 3, None: 4, "mlp": 2}     # the batch shrinks: padded replays
    for name, n in steps.items():
        scheduler.add_request(TokenizedGenerateReq(f"r-{name}", prompt, greedy_params(n), lora_name=name))
    got = {f"r-{name}": [] for name in steps}
    while scheduler.has_work():
        for u in scheduler.step():
            got[u.rid] += u.new_token_ids
    for name, n in steps.items():
        ref = base if name is None else peft_model(base, adapters[name])
        assert got[f"r-{name}"] == peft_greedy(ref, prompt, n)[0], name
    assert sum(g.replays for g in graphs.graphs.values()) >= 4
    assert graphs.buffers.lora_slots.tolist()[3] == -1     # the padded row took no adapter
    scheduler.close()
