"""Grammars through the in-process Scheduler with a tiny random Llama and a tiny tokenizer:
constrained and unconstrained requests share batches, chunked prefill and a KV pool small
enough to force retractions; every constrained output is in its language and ends with "stop".
A request whose grammar still compiles waits while others run; a failed compile aborts it."""
from __future__ import annotations

import random
import re
import threading

import pytest

from kvyard.scheduler.io_struct import TokenizedGenerateReq
from kvyard.sampling.params import SamplingParams
from kvyard.scheduler.process import build_scheduler
from kvyard.server_args import ServerArgs
from tiny_tokenizer import build_tokenizer

EOS = 2  # the tiny Llama config's eos_token_id; the tokenizer puts "</s>" there too
MODEL_VOCAB = 256
LANGUAGES = {  # kind -> (spec, Python regex of the language)
    "regex": ("[abc]{2,6}(12|a1)?", r"[abc]{2,6}(12|a1)?"),
    "ebnf": ('root ::= ("ab" | "ba") ("ab" | "ba")? "c"', r"(ab|ba){1,2}c"),
    "json_schema": ('{"type": "string", "enum": ["ab", "ba1", "c"]}', r'"(ab|ba1|c)"'),
}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(("<unk>", "<s>", "</s>"), eos="</s>", bos="<s>")


def make_scheduler(tiny_models, tokenizer, backend="xgrammar", **overrides):
    path, _ = tiny_models["llama"]
    settings = dict(model_path=path, dtype="float32", max_total_tokens=300, chunked_prefill_size=16,
                    schedule_conservativeness=0.05,  # admit eagerly, so decode runs short and retracts
                    max_running_requests=16, debug_kv_integrity=True, grammar_backend=backend,
                    random_seed=0, log_level="warning")
    return build_scheduler(ServerArgs(**{**settings, **overrides}), tokenizer_factory=lambda: tokenizer)


def params(max_new: int, **extra) -> SamplingParams:
    p = SamplingParams.from_dict({"max_new_tokens": max_new, "temperature": 1.0, **extra})
    p.verify(MODEL_VOCAB)
    return p.normalize(None)


def run_to_end(scheduler, max_steps: int = 3000) -> dict[str, dict]:
    done, outputs = {}, {}
    for _ in range(max_steps):
        for u in scheduler.step():
            outputs.setdefault(u.rid, []).extend(u.new_token_ids)
            if u.finished_reason is not None:
                done[u.rid] = {"reason": u.finished_reason, "ids": outputs[u.rid]}
        if not scheduler.has_work():
            return done
    raise AssertionError("the scheduler did not drain")


def text_of(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode([t for t in ids if t != EOS])


@pytest.mark.parametrize("backend", ["xgrammar", "outlines"])
def test_mixed_batches_with_chunking_and_retraction(tiny_models, tokenizer, backend):
    scheduler = make_scheduler(tiny_models, tokenizer, backend)
    rng = random.Random(7)
    kinds = [k for k in LANGUAGES if k in scheduler.grammar._get_backend().supports]
    expected = {}
    for i in range(36):
        prompt = [rng.randrange(3, MODEL_VOCAB) for _ in range(rng.randrange(10, 40))]
        if i % 3 == 2:
            sampling = params(rng.randrange(4, 20), ignore_eos=True)
        else:
            kind = kinds[i % len(kinds)]
            sampling = params(32, **{kind: LANGUAGES[kind][0]})
            expected[f"r{i}"] = LANGUAGES[kind][1]
        assert scheduler.add_request(TokenizedGenerateReq(f"r{i}", prompt, sampling, sampling_seed=i)) is None
    done = run_to_end(scheduler)
    assert len(done) == 36
    assert scheduler.stats["retractions"] > 0, "the pool was meant to force retractions"
    for rid, out in done.items():
        if rid in expected:
            assert out["reason"] == {"type": "stop", "matched": EOS}, (rid, out)
            assert re.fullmatch(expected[rid], text_of(tokenizer, out["ids"])), (rid, out)
        else:
            assert out["reason"]["type"] == "length"
    scheduler.cache.reset()
    assert scheduler.allocator.available() == scheduler.runner.max_total_tokens  # nothing leaked


def test_compiling_grammar_waits_while_others_run(tiny_models, tokenizer):
    scheduler = make_scheduler(tiny_models, tokenizer)
    gate = threading.Event()
    compile_now = scheduler.grammar._compile
    scheduler.grammar._compile = lambda kind, spec: (gate.wait(30), compile_now(kind, spec))[1]
    scheduler.add_request(TokenizedGenerateReq("slow", [5, 6, 7], params(32, regex="[abc]{3}")))
    scheduler.add_request(TokenizedGenerateReq("free", [5, 6, 8], params(3, ignore_eos=True)))
    finished = set()
    for _ in range(10):
        finished |= {u.rid for u in scheduler.step() if u.finished_reason}
    assert finished == {"free"} and [r.rid for r in scheduler.waiting] == ["slow"]
    gate.set()
    done = run_to_end(scheduler)
    assert done["slow"]["reason"]["type"] == "stop"
    assert re.fullmatch("[abc]{3}", text_of(tokenizer, done["slow"]["ids"]))


def test_n_samples_share_one_compile(tiny_models, tokenizer):
    scheduler = make_scheduler(tiny_models, tokenizer)
    p = params(32, regex="(ab|c){1,3}")
    for i in range(4):
        scheduler.add_request(TokenizedGenerateReq(f"s{i}", [9, 10, 11], p, sampling_seed=i))
    reqs = list(scheduler.waiting)
    assert len({id(r.grammar.compiled) for r in reqs}) == 1
    done = run_to_end(scheduler)
    texts = [text_of(tokenizer, done[f"s{i}"]["ids"]) for i in range(4)]
    assert all(re.fullmatch("(ab|c){1,3}", t) for t in texts)
    assert len({id(r.grammar.matcher) for r in reqs}) == 4  # one matcher per request


def test_failed_compile_aborts_the_request_only(tiny_models, tokenizer):
    scheduler = make_scheduler(tiny_models, tokenizer)
    scheduler.add_request(TokenizedGenerateReq("bad", [5, 6], params(8, regex="[a-")))
    scheduler.add_request(TokenizedGenerateReq("good", [5, 6], params(4, ignore_eos=True)))
    done = run_to_end(scheduler)
    assert done["bad"]["reason"]["type"] == "abort"
    assert done["bad"]["reason"]["message"].startswith("regex: ") and "Unclosed" in done["bad"]["reason"]["message"]
    assert done["good"]["reason"]["type"] == "length"


def test_grammar_with_backend_none_is_rejected(tiny_models, tokenizer):
    scheduler = make_scheduler(tiny_models, tokenizer, backend="none")
    assert scheduler.grammar is None
    update = scheduler.add_request(TokenizedGenerateReq("x", [5, 6], params(8, regex="a")))
    assert update.finished_reason["type"] == "abort"
    assert "structured output is disabled" in update.finished_reason["message"]


def test_masked_tokens_are_never_drawn_even_on_a_zero_noise_draw():
    """Seed 396 at position 0 draws uniform 1.0 (in float32) for token 15578: its exponential
    noise must not be 0, or the masked token's 0 / 0 = NaN wins the argmax."""
    import torch
    from types import SimpleNamespace

    from kvyard.sampling.batch_info import SamplingBatchInfo
    from kvyard.sampling.sampler import Sampler, uniform_noise

    vocab, seed, token = 49152, 396, 15578
    positions = torch.zeros(1, dtype=torch.int64)
    assert uniform_noise(torch.tensor([seed]), positions, vocab)[0, token] == 1.0  # the premise
    req = SimpleNamespace(sampling_params=params(8), output_ids=[], origin_input_ids=[1], sampling_seed=seed)
    info = SamplingBatchInfo.from_reqs([req], vocab)
    info.vocab_mask = torch.zeros(1, vocab, dtype=torch.bool)
    info.vocab_mask[0, 5] = True
    assert Sampler()(torch.zeros(1, vocab), info, positions).next_ids.tolist() == [5]
