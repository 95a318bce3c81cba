"""EAGLE and EAGLE-3 draft heads (tiny random heads saved in the published checkpoint layouts):
the head reads the target's hidden states at the right positions (an echo head drafts exactly the
target's own last prediction), a head that computes the target exactly is always accepted, and the
output equals plain decoding token for token, greedy and seeded sampling, through the randomized
scheduler workload (chunked prefill, radix hits, aborts, retraction, overlap on and off, KV
integrity after every step), at batch 1 and 16, on Llama and Qwen3 targets."""
from __future__ import annotations

import os

import pytest
import torch

from eagle_heads import save_eagle3_head, save_eagle_head, save_exact_head
from kvyard.scheduler.io_struct import TokenizedGenerateReq
from kvyard.scheduler.process import build_scheduler
from kvyard.server_args import ServerArgs
from test_scheduler_workload import assert_same_outputs, make_params, run_workload


@pytest.fixture(scope="module")
def heads(tiny_models, tmp_path_factory):
    """{name: head path} for the tiny Llama (and Qwen3) targets."""
    root = tmp_path_factory.mktemp("heads")
    llama = tiny_models["llama"][1]
    return {
        "eagle": save_eagle_head(root / "eagle", llama, seed=1),
        "eagle-echo": save_eagle_head(root / "eagle-echo", llama, echo=True),
        "eagle3": save_eagle3_head(root / "eagle3", llama, seed=2),
        "eagle3-echo": save_eagle3_head(root / "eagle3-echo", llama, echo=True, draft_vocab=256),
        "eagle3-qwen3": save_eagle3_head(root / "eagle3-qwen3", tiny_models["qwen3"][1], seed=3),
    }


def spec(algorithm: str, path: str, steps: int = 3) -> dict:
    return dict(speculative_algorithm=algorithm, speculative_draft_model_path=path, speculative_num_steps=steps)


def generate(path: str, prompts: list[list[int]], max_new: int = 16, **extra):
    """All prompts at once through one scheduler: ({rid: tokens}, the scheduler's speculation)."""
    args = ServerArgs(model_path=path, dtype="float32", skip_tokenizer_init=True, max_total_tokens=2048,
                      max_running_requests=16, log_level="warning", disable_overlap_schedule=True,
                      debug_kv_integrity=True, **extra)
    sched = build_scheduler(args)
    for i, ids in enumerate(prompts):
        sched.add_request(TokenizedGenerateReq(f"r{i}", ids, make_params(max_new)))
    outs = {}
    while sched.has_work():
        outs.update({u.rid: u.new_token_ids for u in sched.step() if u.finished_reason})
    sched.check_integrity()
    sched.close()
    return outs, sched.speculation


PROMPTS = [[(7 * i + 3 * j) % 250 + 1 for j in range(5 + i)] for i in range(16)]


# -- the head reads the right hidden states ---------------------------------------------------------
@pytest.mark.parametrize("algorithm, head", [("EAGLE", "eagle-echo"), ("EAGLE3", "eagle3-echo")])
def test_echo_head_drafts_the_targets_last_prediction(tiny_models, heads, algorithm, head):
    """An echo head's output at position p is the target's own prediction there (core/speculative.py
    pairs: target hidden at p with token p + 1), so its first draft is the request's last token
    (a greedy target sampled it from that very prediction) and so is every later one."""
    path, _ = tiny_models["llama"]
    args = ServerArgs(model_path=path, dtype="float32", skip_tokenizer_init=True, max_total_tokens=1024,
                      log_level="warning", disable_overlap_schedule=True, chunked_prefill_size=4,
                      **spec(algorithm, heads[head]))
    sched = build_scheduler(args)
    seen = []
    propose = sched.speculation.propose

    def record(reqs):
        drafts = propose(reqs)
        seen.extend((r.all_ids[-1], list(d.tokens)) for r, d in zip(reqs, drafts))
        return drafts

    sched.speculation.propose = record
    for i, ids in enumerate(PROMPTS[:4]):
        sched.add_request(TokenizedGenerateReq(f"r{i}", ids, make_params(12)))
    while sched.has_work():
        sched.step()
    sched.close()
    drafted = [(last, d) for last, d in seen if d]       # none where max_new_tokens leaves no room
    assert len(drafted) > 8
    assert all(d == [last] * len(d) for last, d in drafted), drafted[:5]


def test_a_head_that_computes_the_target_is_always_accepted(tmp_path):
    """A one-layer target whose attention adds nothing predicts from the current token alone; an
    EAGLE head with that layer's MLP reads the next token's embedding and so computes the target's
    next prediction exactly (up to the final norm's positive scale, which greedy ignores)."""
    target, head = save_exact_head(tmp_path)
    plain, _ = generate(target, PROMPTS[:4])
    out, speculation = generate(target, PROMPTS[:4], **spec("EAGLE", head, steps=4))
    assert out == plain
    stats = speculation.stats
    assert stats.drafted > 20 and stats.accepted == stats.drafted


# -- exactness ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm, head", [
    ("EAGLE3", "eagle3"),
    pytest.param("EAGLE", "eagle", marks=pytest.mark.slow),
    pytest.param("EAGLE3", "eagle3-echo", marks=pytest.mark.slow),
])
def test_greedy_batch_1_and_16_equal_plain_decoding(tiny_models, heads, algorithm, head):
    path, hf_model = tiny_models["llama"]
    plain, _ = generate(path, PROMPTS)
    out, speculation = generate(path, PROMPTS, **spec(algorithm, heads[head]))
    assert out == plain and speculation.stats.verify_steps > 0
    one, _ = generate(path, PROMPTS[3:4], **spec(algorithm, heads[head]))
    assert one["r0"] == plain["r3"]
    ids = PROMPTS[5]
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
    assert plain["r5"] == ref


@pytest.mark.slow
def test_qwen3_target_with_an_eagle3_head_equals_plain_decoding(tiny_models, heads):
    path, _ = tiny_models["qwen3"]
    plain, _ = generate(path, PROMPTS)
    out, speculation = generate(path, PROMPTS, **spec("EAGLE3", heads["eagle3-qwen3"], steps=2))
    assert out == plain and speculation.stats.verify_steps > 0


@pytest.mark.parametrize("algorithm, head, page_size, overlap, sampling", [
    pytest.param("EAGLE", "eagle-echo", 1, False, False, marks=pytest.mark.slow),
    pytest.param("EAGLE3", "eagle3-echo", 4, True, False, marks=pytest.mark.slow),
    pytest.param("EAGLE", "eagle", 1, True, True, marks=pytest.mark.slow),
    pytest.param("EAGLE3", "eagle3", 1, False, True, marks=pytest.mark.slow),
])
def test_workload_equals_plain_decoding(tiny_models, heads, algorithm, head, page_size, overlap, sampling):
    """200 requests with chunked prefill, radix hits, aborts and retraction; KV integrity checked
    after every step and nothing leaked at the end (run_workload)."""
    path, _ = tiny_models["llama"]
    _, _, plain, _ = run_workload(path, page_size, True, overlap=False, sampling=sampling)
    sched, _, out, _ = run_workload(path, page_size, True, overlap=overlap, sampling=sampling,
                                    **spec(algorithm, heads[head]))
    assert_same_outputs(plain, out)
    assert sched.speculation.stats.verify_steps > 0


def test_token_map_restricts_eagle_drafts(tiny_models, heads, tmp_path):
    """--speculative-token-map (FR-Spec): drafts only among the listed ids; output unchanged."""
    path, _ = tiny_models["llama"]
    torch.save(list(range(0, 256, 2)), tmp_path / "even.pt")
    plain, _ = generate(path, PROMPTS[:4])
    args = ServerArgs(model_path=path, dtype="float32", skip_tokenizer_init=True, max_total_tokens=1024,
                      log_level="warning", disable_overlap_schedule=True, debug_kv_integrity=True,
                      speculative_token_map=str(tmp_path / "even.pt"), **spec("EAGLE", heads["eagle-echo"]))
    sched = build_scheduler(args)
    drafts, propose = [], sched.speculation.propose

    def record(reqs):
        out = propose(reqs)
        for tree in out:
            drafts.extend(tree.tokens)
        return out

    sched.speculation.propose = record
    for i, ids in enumerate(PROMPTS[:4]):
        sched.add_request(TokenizedGenerateReq(f"r{i}", ids, make_params(16)))
    outs = {}
    while sched.has_work():
        outs.update({u.rid: u.new_token_ids for u in sched.step() if u.finished_reason})
    sched.close()
    assert outs == plain
    assert drafts and all(t % 2 == 0 for t in drafts)


# -- flags and checkpoints ----------------------------------------------------------------------------
@pytest.mark.parametrize("flags, message", [
    (dict(speculative_algorithm="EAGLE"), "speculative_draft_model_path is required"),
    (dict(speculative_algorithm="EAGLE3", speculative_draft_model_path="/x", speculative_eagle_topk=2,
          speculative_num_steps=2, speculative_num_draft_tokens=6), r"topk \* speculative_num_steps \+ 1 \(2 \* 2 \+ 1\) = 5"),
    (dict(speculative_algorithm="EAGLE", speculative_draft_model_path="/x", speculative_eagle_topk=0), "must be >= 1"),
])
def test_eagle_flag_errors(flags, message):
    with pytest.raises(ValueError, match=message):
        ServerArgs(**flags)


def test_bad_head_checkpoints_are_one_line_errors(tiny_models, tmp_path):
    path, llama = tiny_models["llama"]
    empty = tmp_path / "empty"
    empty.mkdir()
    wrong_layers = save_eagle3_head(tmp_path / "wrong", llama, layers=(0, 1, 5))
    for head, message in [(str(empty), "has no config.json"), (wrong_layers, r"reads target layers \[0, 1, 5\]")]:
        args = ServerArgs(model_path=path, dtype="float32", skip_tokenizer_init=True, max_total_tokens=256,
                          log_level="warning", **spec("EAGLE3", head))
        with pytest.raises(ValueError, match=message):
            build_scheduler(args)
