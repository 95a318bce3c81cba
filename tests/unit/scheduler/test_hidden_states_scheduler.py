"""return_hidden_states through the in-process Scheduler: SGLang's shape (the prompt's rows as one
entry, then one row per output token fed back), equal to transformers' last output_hidden_states
entry (after the final norm) in float32, whatever the chunking, prefix-cache hits, mixed chunks,
overlap or retractions."""
from __future__ import annotations

import pytest
import torch

from kvyard.sampling.params import SamplingParams
from kvyard.scheduler.io_struct import TokenizedGenerateReq
from kvyard.scheduler.process import build_scheduler
from kvyard.server_args import ServerArgs


def greedy(max_new: int) -> SamplingParams:
    p = SamplingParams.from_dict({"max_new_tokens": max_new, "temperature": 0, "ignore_eos": True})
    p.verify(256)
    return p.normalize(None)


def run(scheduler, reqs: list[TokenizedGenerateReq]) -> dict:
    """rid -> (output ids, hidden-state entries) once every request finished."""
    for r in reqs:
        scheduler.add_request(r)
    out = {r.rid: ([], []) for r in reqs}
    while scheduler.has_work():
        for u in scheduler.step():
            out[u.rid][0].extend(u.new_token_ids)
            out[u.rid][1].extend(u.hidden_states)
    return out


def reference(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]


def check(model, prompt: list[int], output: list[int], entries: list) -> None:
    assert len(entries) == len(output)                  # the prompt block + one per fed output token
    assert len(entries[0]) == len(prompt) and all(isinstance(x, float) for x in entries[1])
    rows = torch.tensor(entries[0] + entries[1:])
    ref = reference(model, prompt + output[:-1])
    assert rows.shape == ref.shape
    torch.testing.assert_close(rows, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("overlap, mixed", [(False, False), (True, True)])
def test_hidden_states_equal_transformers(tiny_models, overlap, mixed):
    path, model = tiny_models["llama"]
    args = ServerArgs(model_path=path, dtype="float32", skip_tokenizer_init=True, max_total_tokens=512,
                      chunked_prefill_size=8, disable_overlap_schedule=not overlap, enable_mixed_chunk=mixed,
                      debug_kv_integrity=True, log_level="warning")
    scheduler = build_scheduler(args)
    stem = list(range(3, 23))
    first = run(scheduler, [TokenizedGenerateReq("warm", stem + [40], greedy(3))])   # caches the stem
    prompts = {"a": stem + [41, 42], "b": [7, 8, 9], "c": stem + [50] * 11}
    reqs = [TokenizedGenerateReq(rid, ids, greedy(6), return_hidden_states=rid != "b") for rid, ids in prompts.items()]
    out = run(scheduler, reqs)
    assert out["b"][1] == [] and first["warm"][1] == []   # only when asked
    for rid in ("a", "c"):
        check(model, prompts[rid], *out[rid])
    scheduler.close()


def test_hidden_states_survive_a_retraction(tiny_models):
    path, model = tiny_models["llama"]
    args = ServerArgs(model_path=path, dtype="float32", skip_tokenizer_init=True, max_total_tokens=60,
                      chunked_prefill_size=-1, disable_overlap_schedule=True, debug_kv_integrity=True,
                      schedule_conservativeness=0.01, max_running_requests=4,
                      log_level="warning")
    scheduler = build_scheduler(args)
    prompts = {f"r{i}": [5 + i, 6, 7, 8, 9, 10] for i in range(3)}
    out = run(scheduler, [TokenizedGenerateReq(rid, ids, greedy(18), return_hidden_states=True)
                          for rid, ids in prompts.items()])
    assert scheduler.stats["retractions"] > 0
    for rid, ids in prompts.items():
        check(model, ids, *out[rid])
    scheduler.close()
