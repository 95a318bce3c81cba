"""kvyard.lang without a server: tracing, execution order, roles, forks, streaming, choices
methods and the errors of bad programs (a scripted FakeBackend stands in for the server)."""
from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

import kvyard.lang as sgl
from kvyard.lang.api import REGEX_INT
from kvyard.lang.chat_template import from_jinja
from kvyard.lang.tracing import trace_prefix
from lang_fake_backend import FakeBackend

SMOL_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                 "<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                 "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                 "{% endif %}")


def test_import_does_not_load_torch():
    code = "import sys, kvyard.lang; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_multi_turn_roles_text_and_messages():
    @sgl.function
    def multi_turn(s, q1, q2):
        s += sgl.system("You are terse.")
        s += sgl.user(q1)
        s += sgl.assistant(sgl.gen("a1", max_tokens=8))
        s += sgl.user(q2)
        s += sgl.assistant(sgl.gen("a2", max_tokens=8))

    backend = FakeBackend()
    state = multi_turn.run(q1="Hi?", q2="Bye?", backend=backend)
    assert state["a1"] == "gen1" and state["a2"] == "gen2"
    assert state.text() == ("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n"
                            "<|im_start|>assistant\ngen1<|im_end|>\n<|im_start|>user\nBye?<|im_end|>\n"
                            "<|im_start|>assistant\ngen2<|im_end|>\n")
    assert state.messages() == [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi?"},
                                {"role": "assistant", "content": "gen1"}, {"role": "user", "content": "Bye?"},
                                {"role": "assistant", "content": "gen2"}]
    # the second gen saw the whole conversation up to its own assistant turn
    assert backend.prompts[1].endswith("<|im_start|>user\nBye?<|im_end|>\n<|im_start|>assistant\n")
    assert backend.params[0].max_new_tokens == 8 and backend.params[0].temperature == 1.0


def test_chat_template_derived_from_jinja_inserts_default_system():
    template = from_jinja(SMOL_TEMPLATE, "<|im_start|>", "<|im_end|>")
    assert template.prefix_and_suffix("user") == ("<|im_start|>user\n", "<|im_end|>\n")
    assert template.default_system_prompt.startswith("You are a helpful AI assistant named SmolLM")

    @sgl.function
    def one(s):
        s += sgl.user("Hi") + sgl.assistant(sgl.gen("a", max_tokens=2))

    state = one.run(backend=FakeBackend(template=template))
    assert state.messages()[0] == {"role": "system", "content": template.default_system_prompt}
    assert state.text().startswith("<|im_start|>system\nYou are a helpful AI")


def test_chat_template_that_cannot_be_split_is_a_clear_error():
    with pytest.raises(sgl.LangError, match="chat_template: cannot derive role markers"):
        from_jinja("{{ messages | map(attribute='content') | reverse | join(',') }}")


def test_run_defaults_and_gen_overrides():
    @sgl.function
    def prog(s):
        s += "A" + sgl.gen("x", max_tokens=3, stop=["\n"], temperature=0.5, regex="[a-z]+")

    backend = FakeBackend()
    prog.run(backend=backend, max_new_tokens=50, temperature=0.0, top_p=0.9)
    p = backend.params[0]
    assert (p.max_new_tokens, p.temperature, p.top_p, p.regex) == (3, 0.5, 0.9, "[a-z]+")
    assert p.native() == {"max_new_tokens": 3, "stop": ["\n"], "temperature": 0.5, "top_p": 0.9, "regex": "[a-z]+"}


def test_gen_int_converts_and_gen_string_constrains():
    @sgl.function
    def prog(s):
        s += "n=" + sgl.gen_int("n") + " s=" + sgl.gen_string("t")

    backend = FakeBackend(answers={"n=": "42", " s=": '"ok"'})
    state = prog.run(backend=backend)
    assert state["n"] == 42 and state["t"] == '"ok"'
    assert backend.params[0].regex == REGEX_INT
    assert state.text() == 'n=42 s="ok"'


def test_select_uses_the_choices_method():
    backend = FakeBackend(option_logprobs={"A": [-1.0], "BB": [-0.1, -3.0], "C": [-2.0]},
                          unconditional={"A": [0.0], "BB": [0.0, -0.2], "C": [0.0]})

    @sgl.function
    def prog(s, method):
        s += "Pick: " + sgl.gen("pick", choices=["A", "BB", "C"], choices_method=method)

    assert prog.run(method=sgl.token_length_normalized, backend=backend)["pick"] == "A"  # -1.0 > -1.55
    assert prog.run(method=sgl.greedy_token_selection, backend=backend)["pick"] == "BB"  # -0.1 first
    state = prog.run(method=sgl.unconditional_likelihood_normalized, backend=backend)
    assert state["pick"] == "A"  # A: -1.0; BB: (-0.1 + -2.8)/2 = -1.45; C: -2.0
    assert state.get_meta_info("pick")["normalized_unconditional_prompt_logprobs"] == pytest.approx([-1.0, -1.45, -2.0])
    assert prog.run(method="greedy_token_selection", backend=backend).text() == "Pick: BB"


def test_greedy_token_selection_pads_short_options_with_their_mean():
    decision = sgl.greedy_token_selection(["ab", "abc"], [[-0.5, -0.5], [-0.5, -0.5, -0.1]])
    assert decision.decision == "abc"  # column 3: -0.5 (mean of "ab") < -0.1
    decision = sgl.greedy_token_selection(["ab", "abc"], [[-0.5, -0.5], [-0.5, -0.5, -0.9]])
    assert decision.decision == "ab"


def test_fork_runs_branches_in_parallel_and_hints_the_prefix():
    @sgl.function
    def tips(s):
        s += "Two tips:\n"
        forks = s.fork(2)
        for i, f in enumerate(forks):
            f += f"Tip {i + 1}: " + sgl.gen("tip", max_tokens=4)
        s += "1) " + forks[0]["tip"] + " 2) " + forks[1]["tip"]
        forks.join()

    backend = FakeBackend(answers={"Tip 1: ": "eat", "Tip 2: ": "walk"}, delay=0.3)
    state = tips.run(backend=backend)
    assert state.text() == "Two tips:\n1) eat 2) walk"
    assert backend.cached == ["Two tips:\n"]
    assert state["tip"] == ["eat", "walk"]  # join gathers the forks' variables


def test_fork_join_concatenates_texts():
    @sgl.function
    def prog(s):
        s += "Q."
        forks = s.fork(2)
        for i, f in enumerate(forks):
            f += f" [{i}]" + sgl.gen("x")
        forks.join(mode="concate_and_append")

    state = prog.run(backend=FakeBackend(answers={"[0]": "a", "[1]": "b"}))
    assert state.text() == "Q. [0]a [1]b"


def test_run_batch_keeps_order_and_sends_the_traced_prefix_once():
    @sgl.function
    def qa(s, question):
        s += sgl.system("Answer briefly.")
        s += sgl.user("Question: " + question)
        s += sgl.assistant(sgl.gen("answer", max_tokens=4))

    backend = FakeBackend(answers={f"Q{i}<|im_end|>\n<|im_start|>assistant\n": f"A{i}" for i in range(6)})
    states = qa.run_batch([{"question": f"Q{i}"} for i in range(6)], backend=backend, num_threads=3)
    assert [s["answer"] for s in states] == [f"A{i}" for i in range(6)]
    assert backend.cached == ["<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nQuestion: "]
    assert trace_prefix(qa, backend) == backend.cached[0]


def test_streaming_text_iter_and_async():
    @sgl.function
    def prog(s):
        s += "Say: " + sgl.gen("x") + "!"

    backend = FakeBackend(answers={"Say: ": "hello world"})
    state = prog.run(backend=backend, stream=True)
    assert "".join(state.text_iter()) == "Say: hello world!"
    assert "".join(prog.run(backend=backend, stream=True).text_iter("x")) == "hello world"

    async def collect():
        return [p async for p in prog.run(backend=backend, stream=True).text_async_iter()]
    assert "".join(asyncio.run(collect())) == "Say: hello world!"


def test_get_meta_info_and_default_backend():
    @sgl.function
    def prog(s):
        s += "x" + sgl.gen("y")

    sgl.set_default_backend(FakeBackend())
    try:
        state = prog.run()
    finally:
        sgl.set_default_backend(None)
    assert state.get_meta_info("y")["finish_reason"] == {"type": "length"}


# -- bad programs --------------------------------------------------------------------------
def test_gen_name_used_twice_is_an_error():
    @sgl.function
    def prog(s):
        s += sgl.gen("answer", max_tokens=2)
        s += sgl.gen("answer", max_tokens=2)

    with pytest.raises(sgl.LangError, match="gen: the variable name 'answer' is used twice"):
        prog.run(backend=FakeBackend())


def test_unknown_choices_method_is_an_error():
    with pytest.raises(sgl.LangError, match="choices_method: unknown method 'most_likely'; valid: "
                                           "token_length_normalized, greedy_token_selection"):
        sgl.gen("x", choices=["a", "b"], choices_method="most_likely")
    with pytest.raises(sgl.LangError, match="choices_method"):
        sgl.select("x", ["a"], choices_method=object())


def test_bad_arguments_are_errors():
    with pytest.raises(sgl.LangError, match="choices: must be a non-empty list"):
        sgl.select("x", choices=[])
    with pytest.raises(sgl.LangError, match="dtype: must be int or str"):
        sgl.gen("x", dtype=float)
    with pytest.raises(sgl.NotSupportedError, match="num_api_spec_tokens"):
        sgl.function(num_api_spec_tokens=64)(lambda s: None)

    @sgl.function
    def prog(s, q):
        s += q

    with pytest.raises(sgl.LangError, match="missing a required argument: 'q'"):
        prog.run(backend=FakeBackend())
    with pytest.raises(sgl.LangError, match="backend: none given"):
        prog.run(q="x")


def test_image_is_refused_and_the_error_does_not_hang_readers():
    @sgl.function
    def prog(s):
        s += sgl.user(sgl.image("cat.png") + "What is this?")
        s += sgl.assistant(sgl.gen("a"))

    with pytest.raises(sgl.NotSupportedError, match="image: .* no vision support"):
        prog.run(backend=FakeBackend())


def test_backend_errors_reach_the_program_and_run_batch_keeps_them():
    class Broken(FakeBackend):
        def generate(self, prompt, params):
            raise sgl.BackendError("cannot reach the server at http://x")

    @sgl.function
    def prog(s, q):
        s += q + sgl.gen("a")
        s += s["a"]

    with pytest.raises(sgl.BackendError, match="cannot reach"):
        prog.run(q="hi", backend=Broken())
    states = prog.run_batch([{"q": "a"}, {"q": "b"}], backend=Broken())
    assert all(isinstance(s.error(), sgl.BackendError) for s in states)
    with pytest.raises(sgl.BackendError):
        states[0].text()


def test_unreachable_runtime_endpoint_fails_fast():
    with pytest.raises(sgl.BackendError, match="cannot reach the server at http://127.0.0.1:9"):
        sgl.RuntimeEndpoint("http://127.0.0.1:9", connect_timeout=2)
