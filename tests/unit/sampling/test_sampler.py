"""Batched sampler, SamplingBatchInfo and penalties on tiny vocabularies (CPU)."""
from dataclasses import dataclass, field

import pytest
import torch

from kvyard.sampling.batch_info import SamplingBatchInfo
from kvyard.sampling.params import SamplingParams
from kvyard.sampling.sampler import Sampler, logprobs_of, top_logprobs, uniform_noise

V = 12
EOS = 11


@dataclass
class FakeReq:
    sampling_params: SamplingParams
    origin_input_ids: list = field(default_factory=lambda: [1, 2, 3])
    output_ids: list = field(default_factory=list)
    sampling_seed: int = 0


def req(seed=0, prompt=(1, 2, 3), output=(), **params) -> FakeReq:
    p = SamplingParams.from_dict(params)
    p.verify(V)
    return FakeReq(p.normalize(), list(prompt), list(output), seed)


def info_of(reqs, eos=(EOS,)) -> SamplingBatchInfo:
    return SamplingBatchInfo.from_reqs(reqs, V, "cpu", eos_token_ids=list(eos))


def sample(logits, reqs, positions=None, **kwargs):
    info = info_of(reqs)
    if positions is None:
        positions = torch.zeros(len(reqs), dtype=torch.int64)
    return Sampler()(logits, info, positions, **kwargs)


def repeat_req_rows(n, **params):
    """n requests with the same params and distinct seeds, for empirical distributions."""
    shared = req(**params).sampling_params
    return [FakeReq(shared, [1, 2, 3], [], s) for s in range(n)]


def empirical(next_ids) -> torch.Tensor:
    return torch.bincount(next_ids, minlength=V).float() / next_ids.numel()


LOGITS = torch.log(torch.tensor([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.01, 0.005, 0.003, 0.001, 0.0005, 0.0005]))
PROBS = torch.softmax(LOGITS, dim=-1)


# -- greedy and support restriction -----------------------------------------------------------
def test_greedy_is_argmax():
    logits = torch.randn(5, V, generator=torch.Generator().manual_seed(0))
    out = sample(logits, [req(seed=i, temperature=0.0) for i in range(5)])
    assert torch.equal(out.next_ids, logits.argmax(-1))


def test_greedy_rows_in_mixed_batch_take_argmax():
    logits = torch.randn(6, V, generator=torch.Generator().manual_seed(1))
    reqs = [req(seed=i, temperature=0.0 if i % 2 else 5.0) for i in range(6)]
    out = sample(logits, reqs, positions=torch.arange(6))
    assert torch.equal(out.next_ids[1::2], logits[1::2].argmax(-1))


def test_unrestricted_sampling_matches_distribution():
    n = 6000
    out = sample(LOGITS.expand(n, V), repeat_req_rows(n), positions=torch.arange(n))
    assert (empirical(out.next_ids) - PROBS).abs().max() < 0.025


def test_temperature_sharpens_and_flattens():
    n = 4000
    for temperature in (0.5, 2.0):
        out = sample(LOGITS.expand(n, V), repeat_req_rows(n, temperature=temperature))
        expected = torch.softmax(LOGITS / temperature, dim=-1)
        assert (empirical(out.next_ids) - expected).abs().max() < 0.03


def test_top_k_restricts_support_and_renormalizes():
    n = 4000
    out = sample(LOGITS.expand(n, V), repeat_req_rows(n, top_k=3))
    assert set(out.next_ids.tolist()) <= {0, 1, 2}
    expected = torch.zeros(V)
    expected[:3] = PROBS[:3] / PROBS[:3].sum()
    assert (empirical(out.next_ids) - expected).abs().max() < 0.03


def test_top_p_keeps_smallest_prefix_reaching_p():
    n = 3000
    out = sample(LOGITS.expand(n, V), repeat_req_rows(n, top_p=0.7))  # 0.4 + 0.25 < 0.7 -> 3 tokens
    assert set(out.next_ids.tolist()) == {0, 1, 2}
    out = sample(LOGITS.expand(n, V), repeat_req_rows(n, top_p=0.3))
    assert set(out.next_ids.tolist()) == {0}


def test_top_p_applies_to_top_k_renormalized_mass():
    n = 3000
    # top-2 renormalized: 0.615, 0.385; top_p 0.6 of that keeps only token 0
    out = sample(LOGITS.expand(n, V), repeat_req_rows(n, top_k=2, top_p=0.6))
    assert set(out.next_ids.tolist()) == {0}


def test_min_p_drops_tokens_below_fraction_of_top():
    n = 3000
    out = sample(LOGITS.expand(n, V), repeat_req_rows(n, min_p=0.2))  # threshold 0.08 -> 0..3
    assert set(out.next_ids.tolist()) == {0, 1, 2, 3}


def test_rows_with_different_filters_in_one_batch():
    n = 600
    reqs = ([req(seed=s, top_k=2) for s in range(n)] + [req(seed=s, top_p=0.3) for s in range(n)]
            + [req(seed=s) for s in range(n)])
    out = sample(LOGITS.expand(3 * n, V), reqs, positions=torch.arange(3 * n))
    assert set(out.next_ids[:n].tolist()) == {0, 1}
    assert set(out.next_ids[n:2 * n].tolist()) == {0}
    assert len(set(out.next_ids[2 * n:].tolist())) > 4


# -- reproducibility --------------------------------------------------------------------------
def test_same_seed_and_position_same_token_regardless_of_batch():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, V, generator=gen) * 0.3          # flat: many plausible tokens
    kinds = [dict(), dict(top_k=5), dict(top_p=0.8, temperature=1.3), dict(min_p=0.1)]
    reqs = [req(seed=100 + i, **k) for i, k in enumerate(kinds)]
    positions = torch.tensor([7, 8, 9, 10])
    together = sample(logits, reqs, positions).next_ids
    for i in range(4):
        alone = sample(logits[i:i + 1], [reqs[i]], positions[i:i + 1]).next_ids
        assert alone.item() == together[i].item()
    order = torch.tensor([2, 0, 3, 1])
    shuffled = sample(logits[order], [reqs[i] for i in order], positions[order]).next_ids
    assert torch.equal(shuffled, together[order])
    greedy_mix = sample(torch.cat([logits, logits[:1]]), reqs + [req(temperature=0)],
                        torch.cat([positions, positions[:1]])).next_ids
    assert torch.equal(greedy_mix[:4], together)


def test_different_seeds_or_positions_vary():
    logits = torch.zeros(200, V)
    by_seed = sample(logits, repeat_req_rows(200)).next_ids
    by_position = sample(logits, [req(seed=5)] * 200, positions=torch.arange(200)).next_ids
    assert len(set(by_seed.tolist())) == V and len(set(by_position.tolist())) == V


def test_uniform_noise_is_open_interval_and_large_seeds_work():
    seeds = torch.tensor([0, (1 << 63) - 1, 123456789])
    u = uniform_noise(seeds, torch.tensor([0, 1 << 40, 5]), 4096)
    assert 0 < u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01
    info = info_of([req(seed=(1 << 64) + 3), req(seed=-1)])
    assert info.seeds.min() >= 0


# -- logit bias and penalties -----------------------------------------------------------------
def test_logit_bias_forces_token_only_in_its_row():
    logits = torch.zeros(2, V)
    logits[:, 0] = 5.0
    out = sample(logits, [req(logit_bias={"7": 100.0}), req(temperature=0)], positions=torch.arange(2))
    assert out.next_ids.tolist() == [7, 0]
    assert info_of([req(), req()]).logit_bias is None


def test_min_new_tokens_blocks_eos_and_stop_ids_until_reached():
    logits = torch.zeros(2, V)
    logits[:, EOS] = 50.0
    logits[:, 4] = 40.0
    reqs = [req(temperature=0, min_new_tokens=2, stop_token_ids=[4]),
            req(temperature=0, min_new_tokens=2, ignore_eos=True)]
    info = info_of(reqs)
    sampler = Sampler()
    pos = torch.zeros(2, dtype=torch.int64)
    first = sampler(logits, info, pos).next_ids
    assert first[0].item() not in (EOS, 4) and first[1].item() == EOS  # ignore_eos: eos not ending
    info.update_after_step(first)
    info.update_after_step(first)
    assert sampler(logits, info, pos).next_ids.tolist() == [EOS, EOS]


def test_eos_outside_model_vocab_is_ignored():
    info = info_of([req(min_new_tokens=1)], eos=(EOS, V + 3))
    assert info.penalties.stop_mask[0].nonzero().flatten().tolist() == [EOS]


def reference_penalties(logits, reqs):
    """Row-by-row, token-by-token reference: repetition (HF), then frequency/presence (OpenAI)."""
    out = logits.clone()
    for row, r in enumerate(reqs):
        p = r.sampling_params
        for token in set(r.origin_input_ids + r.output_ids):
            x = out[row, token]
            out[row, token] = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
        for token in set(r.output_ids):
            count = r.output_ids.count(token)
            out[row, token] -= p.frequency_penalty * count + p.presence_penalty
    return out


def test_penalties_match_reference_through_steps():
    gen = torch.Generator().manual_seed(4)
    reqs = [req(prompt=[1, 2], output=[3, 3, 5], frequency_penalty=0.5, presence_penalty=0.3),
            req(prompt=[0, 6], output=[6], repetition_penalty=1.5),
            req(prompt=[2], output=[2, 9, 9], frequency_penalty=-1.0, repetition_penalty=0.8),
            req(prompt=[4], output=[4])]
    info = info_of(reqs)
    for step in range(3):
        logits = torch.randn(4, V, generator=gen) * 3
        got = info.penalties.apply(logits)
        torch.testing.assert_close(got, reference_penalties(logits, reqs))
        next_ids = torch.tensor([3, 7, 9, step])
        info.update_after_step(next_ids)
        for r, t in zip(reqs, next_ids.tolist()):
            r.output_ids.append(t)
    assert info.penalties.out_lens.tolist() == [len(r.output_ids) for r in reqs]


def test_penalty_state_only_allocated_when_used():
    plain = info_of([req(), req(temperature=0)]).penalties
    assert plain.counts is None and plain.seen is None and plain.stop_mask is None
    used = info_of([req(frequency_penalty=0.1), req()]).penalties
    assert used.counts is not None and used.seen is None


# -- filter / merge ---------------------------------------------------------------------------
def assert_same_info(a: SamplingBatchInfo, b: SamplingBatchInfo):
    for name in ("temperatures", "top_ps", "top_ks", "min_ps", "seeds", "greedy", "logit_bias"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert torch.equal(x, y), name
    for name in ("out_lens", "frequency", "presence", "counts", "repetition", "seen",
                 "min_new_tokens", "stop_mask"):
        x, y = getattr(a.penalties, name), getattr(b.penalties, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert torch.equal(x, y), name
    flags = ("need_top_k", "need_top_p", "need_min_p", "is_all_greedy")
    assert [getattr(a, f) for f in flags] == [getattr(b, f) for f in flags]


def test_filter_then_merge_equals_fresh_build():
    a = req(seed=1, output=[3, 3], frequency_penalty=0.4, top_k=3)
    b = req(seed=2, output=[5], repetition_penalty=1.3, logit_bias={"2": 1.0}, min_p=0.1)
    c = req(seed=3, output=[7], top_p=0.9, temperature=0.7)
    d = req(seed=4, prompt=[8, 9], min_new_tokens=3, stop_token_ids=[6], temperature=0)
    info = info_of([a, b, c])
    info.update_after_step(torch.tensor([3, 5, 7]))
    for r, t in zip((a, b, c), (3, 5, 7)):
        r.output_ids.append(t)
    info.filter([0, 2])
    info.merge(info_of([d]))
    assert_same_info(info, info_of([a, c, d]))
    assert info.penalties.seen is None and info.logit_bias is None and not info.need_min_p


def test_filter_with_tensor_reorders_and_merge_zero_fills():
    a, b = req(seed=1, logit_bias={"1": 2.0}), req(seed=2, presence_penalty=1.0, output=[4])
    info = info_of([a])
    info.merge(info_of([b]))
    assert_same_info(info, info_of([a, b]))
    info.filter(torch.tensor([1, 0]))
    assert_same_info(info, info_of([b, a]))


def test_merge_keeps_vocab_mask_aligned():
    info = info_of([req(), req()])
    info.vocab_mask = torch.zeros(2, V, dtype=torch.bool)
    info.vocab_mask[:, 5] = True
    info.merge(info_of([req()]))
    assert info.vocab_mask.shape == (3, V) and bool(info.vocab_mask[2].all())
    out = Sampler()(torch.randn(3, V), info, torch.arange(3))
    assert out.next_ids[:2].tolist() == [5, 5]
    info.filter([2, 0])
    assert info.vocab_mask[1].sum().item() == 1


# -- logprobs ---------------------------------------------------------------------------------
def test_logprobs_are_raw_log_softmax_of_chosen_tokens():
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(5))
    reqs = [req(temperature=0.5, logit_bias={"3": 10.0}), req(top_k=2), req(temperature=0)]
    out = sample(logits, reqs, return_logprob=True, top_logprobs_nums=[2, 0, 4])
    expected = torch.log_softmax(logits, dim=-1)
    torch.testing.assert_close(out.logprobs, expected.gather(1, out.next_ids[:, None]).squeeze(1))
    values, ids = out.top_logprobs
    assert values.shape == (3, 4) and ids.shape == (3, 4)
    ref_values, ref_ids = expected.topk(4, dim=-1)
    torch.testing.assert_close(values, ref_values)
    assert torch.equal(ids, ref_ids)


def test_no_logprobs_unless_asked():
    out = sample(torch.randn(2, V), [req(), req()], return_logprob=True, top_logprobs_nums=[0, 0])
    assert out.logprobs is not None and out.top_logprobs is None
    assert sample(torch.randn(2, V), [req(), req()]).logprobs is None


def test_logprob_helpers():
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(6))
    targets = torch.tensor([0, 3, 11, 5])
    expected = torch.log_softmax(logits, dim=-1)
    torch.testing.assert_close(logprobs_of(logits, targets), expected[torch.arange(4), targets])
    values, ids = top_logprobs(logits, 3)
    torch.testing.assert_close(values, expected.topk(3).values)
    assert torch.equal(ids, expected.topk(3).indices)
    assert top_logprobs(logits, 50)[0].shape == (4, V)
