"""Overlap scheduling on a CUDA device (skipped elsewhere): the worker's own stream, events
instead of syncs, future tokens resolved on the device, decode through the CUDA-graph runner;
a randomized workload with aborts gives the same tokens with overlap on and off and keeps the
KV integrity check; the future map on a side stream.
"""
from __future__ import annotations

import random

import pytest
import torch

from gpu_guard import require_gpu

require_gpu()

from kvyard.scheduler.future_tokens import FutureTokenMap  # noqa: E402
from kvyard.scheduler.io_struct import TokenizedGenerateReq  # noqa: E402
from kvyard.sampling.params import SamplingParams  # noqa: E402
from kvyard.scheduler.process import build_scheduler  # noqa: E402
from kvyard.server_args import ServerArgs  # noqa: E402

BACKENDS = ["triton", "torch_native"]   # triton decodes through CUDA graphs, torch_native eagerly


def params(max_new: int, sampled: bool) -> SamplingParams:
    extra = {"temperature": 0.8, "top_p": 0.9} if sampled else {"temperature": 0.0}
    p = SamplingParams.from_dict({"max_new_tokens": max_new, "ignore_eos": True, **extra})
    p.verify(256)
    return p.normalize(None)


def make(path: str, overlap: bool, backend: str):
    args = ServerArgs(model_path=path, device="cuda", dtype="float32", skip_tokenizer_init=True,
                      attention_backend=backend, max_total_tokens=320, chunked_prefill_size=24,
                      max_running_requests=12, debug_kv_integrity=True, log_level="warning",
                      disable_overlap_schedule=not overlap)
    scheduler = build_scheduler(args)
    assert scheduler.config.enable_overlap == overlap
    return scheduler


def workload(scheduler, seed: int = 0, sampled: bool = False) -> dict:
    rng = random.Random(seed)
    stems = [[rng.randrange(1, 256) for _ in range(rng.randrange(8, 40))] for _ in range(6)]
    finished, next_id = {}, 0
    for _ in range(3000):
        if next_id < 120 and rng.random() < 0.5:
            ids = rng.choice(stems) + [rng.randrange(1, 256) for _ in range(rng.randrange(1, 30))]
            scheduler.add_request(TokenizedGenerateReq(f"r{next_id}", ids, params(rng.randrange(1, 24), sampled),
                                                       sampling_seed=next_id))
            next_id += 1
        updates = scheduler.step()
        if rng.random() < 0.05 and next_id:
            updates += scheduler.abort(f"r{rng.randrange(next_id)}")
        for u in updates:
            if u.finished_reason is not None and u.finished_reason["type"] != "abort":
                finished[u.rid] = list(u.new_token_ids)
        if next_id >= 120 and not scheduler.has_work():
            break
    assert not scheduler.has_work()
    scheduler.check_integrity()
    scheduler.cache.reset()
    assert scheduler.allocator.available() == scheduler.runner.max_total_tokens   # nothing leaked
    return finished


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
def test_workload_with_aborts_is_the_same_with_and_without_overlap(tiny_models, backend, sampled):
    path, _ = tiny_models["llama"]
    plain = workload(make(path, False, backend), sampled=sampled)
    scheduler = make(path, True, backend)
    launched = []
    submit = scheduler.executor.submit
    scheduler.executor.submit = lambda step: (launched.append(step), submit(step))[1]
    overlapped = workload(scheduler, sampled=sampled)
    scheduler.close()
    both = set(plain) & set(overlapped)
    assert len(both) >= 80
    assert {r: plain[r] for r in both} == {r: overlapped[r] for r in both}
    # the worker ran on events (no host sync to launch), decode batches fed future tokens
    assert all(isinstance(s.ready, torch.cuda.Event) and isinstance(s.copy_done, torch.cuda.Event)
               for s in launched)
    assert any(s.has_futures for s in launched)


def test_decode_replays_cuda_graphs_on_the_worker_stream(tiny_models):
    path, _ = tiny_models["llama"]
    scheduler = make(path, True, "triton")
    graphs = scheduler.runner.decode_graphs
    assert graphs is not None, "triton on CUDA captures decode graphs"
    streams, replay = [], graphs.replay

    def spy(fb):
        streams.append(torch.cuda.current_stream())
        return replay(fb)

    graphs.replay = spy
    for i in range(4):
        scheduler.add_request(TokenizedGenerateReq(f"r{i}", [5 + i, 6, 7, 8], params(8, False)))
    while scheduler.has_work():
        scheduler.step()
    assert streams and all(s == scheduler.executor.stream for s in streams)
    scheduler.close()


def test_future_map_on_a_side_stream():
    fmap = FutureTokenMap(max_batch=4, device="cuda")
    side = torch.cuda.Stream()
    start = fmap.allocate(3)
    ids = torch.tensor([FutureTokenMap.placeholder(start, 1), 9, FutureTokenMap.placeholder(start, 0)],
                       device="cuda")
    with torch.cuda.stream(side):
        fmap.store(start, torch.tensor([100, 101, 102], device="cuda"))
        fmap.resolve_(ids)
    side.synchronize()
    assert ids.tolist() == [101, 9, 100]
