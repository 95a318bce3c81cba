"""Speculative decoding (NGRAM, STANDALONE): output equals plain decoding token for token, greedy
and seeded sampling, through the randomized scheduler workload (chunked prefill, radix hits,
aborts, retraction, overlap on and off, KV integrity after every step); the drafters' own rules;
the flags' parse-time errors; the sampled next-token distribution against transformers."""
from __future__ import annotations

import math
import random

import pytest
import torch

from kvyard.scheduler.io_struct import TokenizedGenerateReq
from kvyard.scheduler.process import build_scheduler
from kvyard.server_args import ServerArgs
from kvyard_plugins.speculative.ngram import NgramCache, match_in_context
from test_scheduler_workload import assert_same_outputs, make_params, run_workload


# -- the drafters' rules ---------------------------------------------------------------------------
def test_ngram_match_takes_the_longest_suffix_and_its_most_recent_occurrence():
    tokens = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    # suffix [2, 3] occurs at 1 and 6; the most recent earlier occurrence (6) continues 7 8
    assert match_in_context(tokens, range(1, 4), limit=2) == [7, 8]
    # a longer window wins over a more recent shorter one
    assert match_in_context([4, 5, 6, 1, 9, 5, 6, 2, 4, 5, 6], range(1, 4), limit=3) == [1, 9, 5]
    assert match_in_context([1, 2, 3], range(1, 3), limit=4) == []


def test_ngram_cache_is_bounded_and_answers_from_other_requests():
    cache = NgramCache(capacity=50, windows=range(1, 3), branch_length=3)
    cache.add([10, 11, 12, 13, 14])
    assert cache.lookup([99, 11, 12]) == (13, 14)
    cache.add(list(range(100, 200)))
    assert len(cache._map) <= 50


@pytest.mark.parametrize("flags, message", [
    (dict(speculative_algorithm="NGRAM", speculative_eagle_topk=4), "top-k tree drafts are for EAGLE and EAGLE3, not NGRAM"),
    (dict(speculative_algorithm="STANDALONE", speculative_draft_model_path="/x", speculative_eagle_topk=2),
     "top-k tree drafts are for EAGLE and EAGLE3, not STANDALONE"),
    (dict(speculative_algorithm="NGRAM", speculative_num_steps=2, speculative_num_draft_tokens=8,
          speculative_ngram_max_bfs_breadth=3), r"max_bfs_breadth \* speculative_num_steps \+ 1 \(3 \* 2 \+ 1\) = 7"),
    (dict(speculative_algorithm="NGRAM", speculative_ngram_min_bfs_breadth=4, speculative_ngram_max_bfs_breadth=2),
     "speculative_ngram_min_bfs_breadth"),
    (dict(speculative_algorithm="STANDALONE"), "speculative_draft_model_path is required"),
    (dict(speculative_algorithm="NGRAM", speculative_num_steps=2, speculative_num_draft_tokens=5,
          speculative_ngram_max_bfs_breadth=1), r"num_steps \+ 1"),
    (dict(speculative_algorithm="NGRAM", speculative_accept_threshold_single=0.5), "only 1.0"),
    (dict(speculative_algorithm="MEDUSA"), "unknown speculative algorithm .MEDUSA."),
    (dict(speculative_draft_model_path="/x"), "needs --speculative-algorithm"),
])
def test_invalid_combinations_are_one_line_errors(flags, message):
    with pytest.raises(ValueError, match=message):
        ServerArgs(**flags)


# -- exactness through the scheduler ---------------------------------------------------------------
NGRAM = dict(speculative_algorithm="NGRAM", speculative_num_steps=4, speculative_ngram_max_match_window_size=4)


@pytest.mark.parametrize("overlap", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_ngram_greedy_workload_equals_plain_decoding(tiny_models, hf_greedy, overlap):
    path, hf_model = tiny_models["llama"]
    _, prompts, plain, _ = run_workload(path, 1, True, overlap=False)
    sched, _, spec, _ = run_workload(path, 1, True, overlap=overlap, **NGRAM)
    assert_same_outputs(plain, spec)
    stats = sched.speculation.stats
    assert stats.verify_steps > 0 and stats.accepted > 0, "the workload was meant to accept drafts"
    for rid in random.Random(3).sample(sorted(spec), 10):
        ids = list(spec[rid].new_token_ids)
        assert ids == hf_greedy(hf_model, prompts[rid], len(ids)), rid


@pytest.mark.slow
def test_ngram_seeded_sampling_workload_equals_plain_decoding(tiny_models):
    path, _ = tiny_models["llama"]
    _, _, plain, _ = run_workload(path, 4, True, overlap=False, sampling=True)
    sched, _, spec, _ = run_workload(path, 4, True, overlap=False, sampling=True, **NGRAM)
    assert_same_outputs(plain, spec)
    assert sched.speculation.stats.verify_steps > 0


@pytest.mark.slow
def test_standalone_self_draft_accepts_everything_and_a_different_draft_stays_exact(tiny_models):
    path, _ = tiny_models["llama"]
    _, _, plain, _ = run_workload(path, 1, True, overlap=False, sampling=True)
    own = dict(speculative_algorithm="STANDALONE", speculative_draft_model_path=path, speculative_num_steps=3)
    sched, _, spec, _ = run_workload(path, 1, True, overlap=False, sampling=True, **own)
    assert_same_outputs(plain, spec)
    stats = sched.speculation.stats
    assert stats.drafted > 0 and stats.accepted == stats.drafted   # same model, same draws: all accepted
    other = dict(own, speculative_draft_model_path=tiny_models["qwen2"][0])
    _, _, plain, _ = run_workload(path, 1, False, overlap=False, sampling=True)   # the workload depends on radix
    sched, _, spec, _ = run_workload(path, 1, False, overlap=True, sampling=True, **other)
    assert_same_outputs(plain, spec)
    assert sched.speculation.stats.accepted < sched.speculation.stats.drafted


def test_meta_counts_verify_steps(tiny_models):
    path, _ = tiny_models["llama"]
    args = ServerArgs(model_path=path, dtype="float32", skip_tokenizer_init=True, max_total_tokens=512,
                      log_level="warning", disable_overlap_schedule=True, speculative_algorithm="STANDALONE",
                      speculative_draft_model_path=path, speculative_num_steps=3)
    sched = build_scheduler(args)
    sched.add_request(TokenizedGenerateReq("a", [5, 6, 7, 8], make_params(13)))
    final = None
    while sched.has_work():
        for u in sched.step():
            final = u if u.finished_reason else final
    assert len(final.new_token_ids) == 13
    # 1 token from the prefill, 12 in verify steps of 4 (3 drafts + the bonus): 3 steps
    assert final.spec_verify_ct == 3 and final.spec_accepted_tokens == 9
    assert sched.load_info()["spec_accept_length"] == pytest.approx(4.0)
    sched.close()


# -- the sampled distribution ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def peaked_model(tiny_models, tmp_path_factory):
    """The tiny Llama with its LM head scaled up, so its next-token distributions are peaked
    enough for a chi-square test on a few thousand samples."""
    _, hf_model = tiny_models["llama"]
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM(hf_model.config).eval()
    model.load_state_dict(hf_model.state_dict())
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    path = tmp_path_factory.mktemp("peaked") / "llama"
    model.save_pretrained(path)
    return str(path), model


@pytest.mark.parametrize("settings", [
    pytest.param(dict(temperature=1.0, top_k=6), id="top_k"),
    pytest.param(dict(temperature=1.0), id="temperature", marks=pytest.mark.slow),
    pytest.param(dict(temperature=2.0, top_p=0.9), id="top_p", marks=pytest.mark.slow),
])
def test_sampled_next_token_distribution_matches_transformers(peaked_model, tiny_models, settings):
    """1,500 seeded samples of two tokens after a fixed prompt, drafted by a different model (often
    wrong): the second token, given the most frequent first one, follows transformers' softmax
    filtered as the sampler filters (chi-square over tokens with expected count >= 5, the rest pooled)."""
    stats = check_second_token_distribution(peaked_model, settings, speculative_algorithm="STANDALONE",
                                            speculative_draft_model_path=tiny_models["qwen2"][0],
                                            speculative_num_steps=2)
    assert 0 < stats.accepted < stats.drafted          # drafts were both accepted and rejected


def check_second_token_distribution(peaked_model, settings: dict, **spec):
    """Samples 1,500 seeded two-token continuations with speculation ``spec`` and checks the
    chi-square of the second token (module test above); returns the speculation's stats."""
    from kvyard.sampling.batch_info import SamplingBatchInfo
    from kvyard.sampling.sampler import filter_probs

    path, hf_model = peaked_model
    args = ServerArgs(model_path=path, dtype="float32", skip_tokenizer_init=True, max_total_tokens=8192,
                      max_running_requests=64, log_level="warning", disable_overlap_schedule=True, **spec)
    sched = build_scheduler(args)
    prompt = [3, 17, 42, 8]
    for i in range(1500):
        sched.add_request(TokenizedGenerateReq(f"s{i}", prompt, make_params(3, **settings), sampling_seed=1000 + i))
    outs = []
    while sched.has_work():
        outs += [u.new_token_ids for u in sched.step() if u.finished_reason]
    stats = sched.speculation.stats
    sched.close()
    first = max(set(o[0] for o in outs), key=lambda t: sum(o[0] == t for o in outs))
    seconds = [o[1] for o in outs if o[0] == first]
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt + [first]])).logits[0, -1].float()
    params = make_params(3, **settings)
    row = type("Row", (), {"sampling_params": params, "output_ids": [], "origin_input_ids": prompt,
                           "sampling_seed": 0})()
    info = SamplingBatchInfo.from_reqs([row], logits.numel())
    probs = filter_probs(torch.softmax(logits / params.temperature, dim=-1).view(1, -1), info)[0].double()
    probs /= probs.sum()
    n = len(seconds)
    counts = torch.bincount(torch.tensor(seconds), minlength=probs.numel()).double()
    big = probs * n >= 5
    observed = torch.cat([counts[big], counts[~big].sum().view(1)])
    expected = torch.cat([probs[big] * n, (probs[~big] * n).sum().view(1)])
    keep = expected > 0
    chi2 = float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    dof = int(keep.sum()) - 1
    from scipy.stats import chi2 as chi2_dist
    assert n >= 200, n
    if dof == 0:   # the filters keep one token: every sample must be it
        assert (counts > 0).sum() == 1 and probs[int(counts.argmax())] == 1.0
        return stats
    assert chi2_dist.sf(chi2, dof) > 1e-3, (chi2, dof, n)
    return stats


# -- NGRAM tries -------------------------------------------------------------------------------------
def test_ngram_trie_merges_continuations_breadth_first():
    from kvyard_plugins.speculative.ngram import build_trie, matches_in_context

    tokens = [1, 2, 3, 4, 9, 1, 2, 5, 6, 1, 2, 3, 7, 1, 2]
    # suffix [1, 2] occurred at 9 (-> 3 7 1), 5 (-> 5 6 1) and 0 (-> 3 4 9): most recent first
    branches = matches_in_context(tokens, range(1, 3), limit=3, breadth=3)
    assert branches == [[3, 7, 1], [5, 6, 1], [3, 4, 9]]
    trie = build_trie(branches, breadth=[3, 3, 3], max_nodes=10)
    # depth 1: 3, 5; depth 2: 7, 4 (under 3), 6 (under 5); depth 3: 1, 9, 1
    assert trie.tokens == (3, 5, 7, 4, 6, 1, 9, 1) and trie.parents == (-1, -1, 0, 0, 1, 2, 3, 4)
    # breadth caps: one child per node past depth 1; max_nodes cuts breadth-first
    assert build_trie(branches, breadth=[2, 1, 1], max_nodes=10).tokens == (3, 5, 7, 6, 1, 1)
    assert build_trie(branches, breadth=[3, 3, 3], max_nodes=3).tokens == (3, 5, 7)
    # PROB: the continuation most branches share comes first
    assert build_trie([[5, 1], [3, 2], [3, 4]], breadth=[3, 3], max_nodes=3, by_count=True).tokens == (3, 5, 2)


NGRAM_TREE = dict(speculative_algorithm="NGRAM", speculative_num_steps=3, speculative_num_draft_tokens=8,
                  speculative_ngram_max_bfs_breadth=4, speculative_ngram_min_bfs_breadth=2,
                  speculative_ngram_max_match_window_size=4)


@pytest.mark.parametrize("overlap, sampling, page_size", [
    pytest.param(False, False, 1, marks=pytest.mark.slow),
    pytest.param(True, True, 4, marks=pytest.mark.slow),
])
def test_ngram_trie_workload_equals_plain_decoding(tiny_models, overlap, sampling, page_size):
    path, _ = tiny_models["llama"]
    _, _, plain, _ = run_workload(path, page_size, True, overlap=False, sampling=sampling)
    sched, _, spec, _ = run_workload(path, page_size, True, overlap=overlap, sampling=sampling, **NGRAM_TREE)
    assert_same_outputs(plain, spec)
    stats = sched.speculation.stats
    assert stats.verify_steps > 0 and stats.accepted > 0


def test_standalone_drafts_reach_the_host_only_after_the_verify_forward(tiny_models, hf_greedy, monkeypatch):
    """The cycle's one host sync: the verify batch is built and its forward runs with the drafts
    still on the device (its input ids filled there); the drafts come to the host afterwards, for
    acceptance. The verify forward's device input ids are the last token and the drafts."""
    from kvyard.speculative import DeviceDrafts
    from kvyard.sampling.params import SamplingParams

    path, hf_model = tiny_models["llama"]
    sched = build_scheduler(ServerArgs(
        model_path=path, dtype="float32", skip_tokenizer_init=True, max_total_tokens=512, log_level="warning",
        disable_overlap_schedule=True, debug_kv_integrity=True, speculative_algorithm="STANDALONE",
        speculative_draft_model_path=path, speculative_num_steps=3))
    read, verified, host = [], [], DeviceDrafts.host    # DeviceDrafts read on the host / verified
    monkeypatch.setattr(DeviceDrafts, "host", lambda self: read.append(self) or host(self))
    runner, prepare = sched.runner, sched.runner.prepare

    def checked_prepare(batch):
        fb = prepare(batch)
        if batch.is_verify:
            source = batch.draft_tokens[0].device_tokens()[0]
            assert batch.draft_fill is not None and not any(d is source for d in read)
            verified.append(source)
            ids = [batch.reqs[0].output_ids[-1], *batch.draft_tokens[0].tokens]
            assert fb.input_ids.tolist() == ids and batch.input_ids[1:] == [0] * (len(ids) - 1)
        return fb
    monkeypatch.setattr(runner, "prepare", checked_prepare)
    prompt = [5, 6, 7, 8, 9]
    p = SamplingParams.from_dict({"max_new_tokens": 12, "temperature": 0, "ignore_eos": True})
    p.verify(sched.vocab_size)
    sched.add_request(TokenizedGenerateReq("r", prompt, p.normalize(None)))
    out = []
    while sched.has_work():
        for u in sched.step():
            out += u.new_token_ids
    assert out == hf_greedy(hf_model, prompt, 12)
    assert len(verified) >= 2
    sched.close()


def host_chains(chains) -> list[list[int]]:
    """A DraftModel's chains (DeviceChains, or [] for none) as host lists."""
    return [list(getattr(c, "tokens", c)) for c in chains]


def test_draft_model_chains_of_different_lengths_in_one_cycle(tiny_models, hf_greedy):
    """The draft model's cycle (one KV allocation per request, drafts kept on the device between
    steps, one host sync): requests whose chains end at different steps leave the batch and the
    rest keep drafting; a second cycle after accepted and rejected drafts trims and catches up; a
    cycle failing midway gives its slots back; release gives every slot back. A self-draft's greedy chains are the target's continuations."""
    from kvyard.speculative import DraftInput

    path, hf_model = tiny_models["llama"]
    sched = build_scheduler(ServerArgs(
        model_path=path, dtype="float32", skip_tokenizer_init=True, max_total_tokens=512, log_level="warning",
        disable_overlap_schedule=True, speculative_algorithm="STANDALONE", speculative_draft_model_path=path,
        speculative_num_steps=4))
    draft = sched.speculation.algorithm.draft
    free = draft.allocator.available()
    prompts = {"a": [5, 6, 7, 8], "b": [9, 10, 11, 12, 13, 14], "c": [20, 21], "d": [30, 31, 32]}
    depth = {"a": 4, "b": 2, "c": 0, "d": 3}
    full = {rid: hf_greedy(hf_model, p, 8) for rid, p in prompts.items()}

    def inputs(tokens):
        return [DraftInput(rid=rid, token_ids=ids, max_draft_len=4, seed=0, sampling_params=make_params(8))
                for rid, ids in tokens.items()]

    chains = host_chains(draft.propose(inputs(prompts), list(depth.values())))
    assert chains == [full[rid][:n] for rid, n in depth.items()]
    # the target accepted a's four drafts (+ its bonus), rejected b's second, d's first
    gained = {"a": full["a"][:5], "b": full["b"][:1] + [99], "c": full["c"][:1], "d": [98]}
    tokens = {rid: prompts[rid] + g for rid, g in gained.items()}
    chains = host_chains(draft.propose(inputs(tokens), [3, 1, 2, 4]))
    expect = {rid: hf_greedy(hf_model, ids, n) for (rid, ids), n in zip(tokens.items(), [3, 1, 2, 4])}
    assert chains == list(expect.values())
    # a cycle that fails midway gives its slots back and leaves the draft KV consistent
    real, calls = draft.runner.sample_on_device, []

    def failing(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("a failed draft step")
        return real(*args)
    draft.runner.sample_on_device = failing
    with pytest.raises(RuntimeError, match="a failed draft step"):
        draft.propose(inputs(tokens), [4, 4, 4, 4])
    del draft.runner.sample_on_device
    assert host_chains(draft.propose(inputs(tokens), [3, 1, 2, 4])) == list(expect.values())
    for rid in prompts:
        draft.release(rid)
    assert draft.allocator.available() == free
    sched.close()
