"""Tree drafts through the scheduler: EAGLE / EAGLE-3 top-k trees (random heads on the tiny
Llama) and NGRAM tries give the plain-decoding output token for token, greedy and seeded
sampling, at batch 1 and 16, through the randomized workload (chunked prefill, radix hits,
aborts, retraction, KV integrity after every step, overlap on and off), with the torch_native
and triton (CPU interpreter) tree masks; the drafts really branch."""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"   # the triton case runs its kernels in the CPU interpreter

import pytest

from kvyard.scheduler.io_struct import TokenizedGenerateReq
from kvyard.scheduler.process import build_scheduler
from kvyard.server_args import ServerArgs
from test_scheduler_workload import assert_same_outputs, make_params, run_workload
from test_speculative import check_second_token_distribution, peaked_model  # noqa: F401  (a fixture)
from test_speculative_eagle import PROMPTS, generate, heads  # noqa: F401  (heads: a fixture)


def tree(algorithm: str, path: str, topk: int, steps: int, tokens: int) -> dict:
    return dict(speculative_algorithm=algorithm, speculative_draft_model_path=path, speculative_num_steps=steps,
                speculative_eagle_topk=topk, speculative_num_draft_tokens=tokens)


def record_drafts(sched) -> list:
    """Wraps the scheduler's propose to keep every DraftTree it verifies."""
    seen, propose = [], sched.speculation.propose

    def wrapped(reqs):
        out = propose(reqs)
        seen.extend(t for t in out if len(t))
        return out

    sched.speculation.propose = wrapped
    return seen


@pytest.mark.parametrize("algorithm, head, topk, steps, tokens", [
    ("EAGLE", "eagle", 2, 3, 6),
    pytest.param("EAGLE3", "eagle3", 4, 2, 8, marks=pytest.mark.slow),
    pytest.param("EAGLE", "eagle-echo", 3, 3, 4, marks=pytest.mark.slow),
    pytest.param("EAGLE3", "eagle3-echo", 2, 4, 8, marks=pytest.mark.slow),
])
def test_eagle_trees_greedy_equal_plain_decoding(tiny_models, heads, algorithm, head, topk, steps, tokens):
    path, _ = tiny_models["llama"]
    plain, _ = generate(path, PROMPTS)
    out, speculation = generate(path, PROMPTS, **tree(algorithm, heads[head], topk, steps, tokens))
    assert out == plain and speculation.stats.verify_steps > 0
    one, _ = generate(path, PROMPTS[3:4], **tree(algorithm, heads[head], topk, steps, tokens))
    assert one["r0"] == plain["r3"]


def test_echo_head_trees_branch_and_are_accepted(tiny_models, heads):
    """An echo head's best child is the target's own prediction (its last token): the trees
    branch (top-3 at every step), hold num_draft_tokens - 1 nodes, siblings differ, and some
    drafts are accepted."""
    path, _ = tiny_models["llama"]
    args = ServerArgs(model_path=path, dtype="float32", skip_tokenizer_init=True, max_total_tokens=2048,
                      log_level="warning", disable_overlap_schedule=True, debug_kv_integrity=True,
                      **tree("EAGLE", heads["eagle-echo"], 3, 3, 7))
    sched = build_scheduler(args)
    seen = record_drafts(sched)
    for i, ids in enumerate(PROMPTS[:6]):
        sched.add_request(TokenizedGenerateReq(f"r{i}", ids, make_params(24)))
    while sched.has_work():
        sched.step()
    sched.check_integrity()
    stats = sched.speculation.stats
    sched.close()
    assert seen and any(not t.is_chain for t in seen)
    assert max(len(t) for t in seen) == 6 and 2 <= max(max(t.depths()) for t in seen) <= 3
    assert all(len(set(zip(t.parents, t.tokens))) == len(t) for t in seen)
    assert 0 < stats.accepted < stats.drafted


def test_an_exact_head_tree_accepts_its_best_path(tmp_path):
    """A head that computes the target's prediction exactly: the tree's most likely child at
    every level is the target's token, so each verify step accepts at least one draft (the best
    depth-1 node is always kept) and the siblings are rejected."""
    from eagle_heads import save_exact_head

    target, head = save_exact_head(tmp_path)
    plain, _ = generate(target, PROMPTS[:4], max_new=24)
    out, speculation = generate(target, PROMPTS[:4], max_new=24, **tree("EAGLE", head, 3, 3, 8))
    assert out == plain
    stats = speculation.stats
    assert stats.verify_steps > 5 and stats.accepted >= stats.verify_steps
    assert stats.accepted < stats.drafted


@pytest.mark.parametrize("algorithm, head, page_size, overlap, sampling", [
    ("EAGLE", "eagle-echo", 4, False, False),
    pytest.param("EAGLE3", "eagle3-echo", 1, True, False, marks=pytest.mark.slow),
    pytest.param("EAGLE", "eagle", 1, True, True, marks=pytest.mark.slow),
    pytest.param("EAGLE3", "eagle3", 4, False, True, marks=pytest.mark.slow),
])
def test_tree_workload_equals_plain_decoding(tiny_models, heads, algorithm, head, page_size, overlap, sampling):
    """200 requests with chunked prefill, radix hits, aborts and retraction under tree drafts;
    KV integrity checked after every step (the accepted path's KV moved, the rest freed) and
    nothing leaked at the end (run_workload)."""
    path, _ = tiny_models["llama"]
    _, _, plain, _ = run_workload(path, page_size, True, overlap=False, sampling=sampling)
    sched, _, out, _ = run_workload(path, page_size, True, overlap=overlap, sampling=sampling,
                                    **tree(algorithm, heads[head], 3, 3, 6))
    assert_same_outputs(plain, out)
    stats = sched.speculation.stats
    assert stats.verify_steps > 0 and stats.accepted > 0


@pytest.mark.parametrize("settings", [
    pytest.param(dict(temperature=1.0, top_k=6), id="top_k"),
    pytest.param(dict(temperature=1.0), id="temperature", marks=pytest.mark.slow),
    pytest.param(dict(temperature=2.0, top_p=0.9), id="top_p", marks=pytest.mark.slow),
])
def test_tree_sampled_next_token_distribution_matches_transformers(peaked_model, heads, settings):
    """The chi-square test of the sampled second token (test_speculative.py) under EAGLE top-3
    trees drafted by a random head: the tree walk keeps the target's distribution."""
    stats = check_second_token_distribution(peaked_model, settings, **tree("EAGLE", heads["eagle-echo"], 3, 2, 6))
    assert 0 < stats.accepted < stats.drafted


def test_triton_tree_verify_equals_plain_decoding(tiny_models, heads):
    """The triton extend kernel's tree mask (CPU interpreter) through the scheduler."""
    pytest.importorskip("triton")
    path, _ = tiny_models["llama"]
    plain, _ = generate(path, PROMPTS[:3], max_new=8)
    out, speculation = generate(path, PROMPTS[:3], max_new=8, attention_backend="triton",
                                **tree("EAGLE3", heads["eagle3"], 2, 2, 5))
    assert out == plain and speculation.stats.verify_steps > 0


def test_sampled_requests_keep_their_coupled_chain_in_the_tree(tiny_models, heads):
    """For a sampled request the chain the head would draft (its own coupled draws) is a path
    of its tree, so a head that agrees with the target is accepted under sampling as with chains;
    the output still equals plain decoding."""
    path, _ = tiny_models["llama"]
    settings = dict(temperature=0.8, top_p=0.95)
    args = ServerArgs(model_path=path, dtype="float32", skip_tokenizer_init=True, max_total_tokens=2048,
                      log_level="warning", disable_overlap_schedule=True, debug_kv_integrity=True,
                      **tree("EAGLE", heads["eagle"], 2, 3, 6))
    sched = build_scheduler(args)
    algo, checked = sched.speculation.algorithm, []
    propose = algo.propose

    def wrapped(inputs):
        trees = propose(inputs)
        chains = algo.runner.propose(inputs, [min(i.depth_limit, 3) for i in inputs])
        checked.extend((t, c) for t, c in zip(trees, chains) if c)
        return trees

    algo.propose = wrapped
    outs = run_sampled(sched, settings)
    assert len(checked) > 5 and all(has_path(t, c) for t, c in checked)
    plain = build_scheduler(ServerArgs(model_path=path, dtype="float32", skip_tokenizer_init=True,
                                       max_total_tokens=2048, log_level="warning", disable_overlap_schedule=True))
    assert outs == run_sampled(plain, settings)


def run_sampled(sched, settings: dict) -> dict:
    """PROMPTS[:4] with seeded sampling through ``sched`` (closed after): {rid: tokens}."""
    for i, ids in enumerate(PROMPTS[:4]):
        sched.add_request(TokenizedGenerateReq(f"r{i}", ids, make_params(16, **settings), sampling_seed=i))
    outs = {}
    while sched.has_work():
        outs.update({u.rid: u.new_token_ids for u in sched.step() if u.finished_reason})
    sched.close()
    return outs


def has_path(tree, chain) -> bool:
    """Whether ``chain`` is a path of ``tree`` from its root."""
    node = -1
    for tok in chain:
        kids = [i for i, (p, t) in enumerate(zip(tree.parents, tree.tokens)) if p == node and t == tok]
        if not kids:
            return False
        node = kids[0]
    return True


def test_ngram_tries_branch_and_equal_plain_decoding(tiny_models):
    """Prompts that repeat a phrase with different continuations: the NGRAM trie branches (one
    child per earlier continuation) and the output equals plain decoding (the workload variant,
    with chunked prefill, radix hits, aborts and retraction, is in test_speculative.py)."""
    path, _ = tiny_models["llama"]
    prompts = [[9, 8, 7, 1 + i, 9, 8, 7, 20 + i, 9, 8, 7, 40 + i, 9, 8, 7, 60, 61, 9, 8, 7] for i in range(4)]
    trie = dict(speculative_algorithm="NGRAM", speculative_num_steps=3, speculative_num_draft_tokens=8,
                speculative_ngram_max_bfs_breadth=4)
    plain, _ = generate(path, prompts)
    args = ServerArgs(model_path=path, dtype="float32", skip_tokenizer_init=True, max_total_tokens=2048,
                      log_level="warning", disable_overlap_schedule=True, debug_kv_integrity=True, **trie)
    sched = build_scheduler(args)
    seen = record_drafts(sched)
    for i, ids in enumerate(prompts):
        sched.add_request(TokenizedGenerateReq(f"r{i}", ids, make_params(16)))
    outs = {}
    while sched.has_work():
        outs.update({u.rid: u.new_token_ids for u in sched.step() if u.finished_reason})
    sched.check_integrity()
    sched.close()
    assert outs == plain and seen
    # the algorithm on one of those contexts: the 4 earlier continuations of "9 8 7" at the root
    # (breadth 4 at depth 1 falling to min_bfs_breadth 1 at depth 3), 7 nodes at most
    from kvyard.speculative import DraftInput
    from kvyard_plugins.speculative.ngram import NgramAlgorithm
    algo = NgramAlgorithm(args.speculative_config(), None)
    t = algo.propose([DraftInput(rid="x", token_ids=prompts[0], max_draft_len=7, seed=0, max_depth=3)])[0]
    assert t.tokens[:4] == (60, 40, 20, 1) and t.parents[:4] == (-1, -1, -1, -1)
    assert len(t) == 7 and max(t.depths()) <= 3
