"""LoRA serving over HTTP: `kvyard serve --lora-paths ...` on a tiny random Llama with three PEFT
adapters and two slots. /generate's lora_path (one or a list), the OpenAI ``model`` field
("BASE:name" or "name"), /v1/models, metrics per adapter, bad adapters refused in one line while
the server keeps serving, and load/unload under load: no request fails, none uses the wrong
adapter, the KV integrity check holds."""
from __future__ import annotations

import threading

import httpx
import pytest

from conftest import free_port, start_server
from lora_fixtures import make_adapters, peft_greedy, peft_model, save_adapter, tiny_base
from tiny_tokenizer import build_tokenizer

BASE = "tiny"
PROMPT = [5, 17, 33, 2, 9, 41, 7]
STEPS = 5


@pytest.fixture(scope="module")
def lora_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-server")
    base = tiny_base("llama", str(root / "base"))
    build_tokenizer(("<s>", "</s>"), eos="</s>", bos="<s>").save_pretrained(root / "base")
    adapters = make_adapters(base, str(root))
    template = root / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    server = start_server([
        "--model-path", str(root / "base"), "--dtype", "float32", "--max-total-tokens", "4096",
        "--port", str(free_port()), "--served-model-name", BASE, "--enable-metrics", "--num-threads", "1",
        "--log-level", "warning", "--chat-template", str(template), "--debug-kv-integrity",
        "--enable-lora", "--lora-paths", *[f"{n}={p}" for n, p in adapters.items()],
        "--max-loras-per-batch", "2", "--max-lora-rank", "8", "--lora-target-modules", "all"])
    expected = {name: peft_greedy(peft_model(base, path), PROMPT, STEPS)[0] for name, path in adapters.items()}
    expected[None] = peft_greedy(base, PROMPT, STEPS)[0]
    yield server.url, base, root, expected
    assert server.stop() == 0, server.output()


def generate(url: str, lora, prompt=PROMPT, steps: int = STEPS) -> httpx.Response:
    batch = isinstance(lora, list)
    return httpx.post(f"{url}/generate", timeout=120, json={
        "input_ids": [prompt] * len(lora) if batch else prompt, "lora_path": lora,
        "sampling_params": {"max_new_tokens": steps, "temperature": 0, "ignore_eos": True}})


def test_generate_lora_path_per_batch_item(lora_server):
    url, _, _, expected = lora_server
    names = ["qv", "all", None, "mlp", "qv"]   # three adapters, two slots: the scheduler takes turns
    outs = generate(url, names).json()
    assert [o["output_ids"] for o in outs] == [expected[n] for n in names]
    assert generate(url, "all").json()["output_ids"] == expected["all"]


def test_openai_model_field_selects_the_adapter(lora_server):
    url, _, _, expected = lora_server
    body = {"prompt": PROMPT, "max_tokens": STEPS, "temperature": 0, "ignore_eos": True}
    for model, name in ((f"{BASE}:qv", "qv"), ("mlp", "mlp"), (BASE, None)):
        r = httpx.post(f"{url}/v1/completions", json={**body, "model": model}, timeout=120)
        assert r.status_code == 200, r.text
    missing = httpx.post(f"{url}/v1/completions", json={**body, "model": f"{BASE}:nope"}, timeout=60)
    assert missing.status_code == 404 and "unknown LoRA adapter 'nope'" in missing.json()["error"]["message"]
    chat = {"messages": [{"role": "user", "content": "ab12"}], "max_tokens": 4, "temperature": 0}
    texts = {m: httpx.post(f"{url}/v1/chat/completions", json={**chat, "model": m}, timeout=60).json()
             for m in (f"{BASE}:all", "all")}
    assert texts[f"{BASE}:all"]["choices"][0]["message"] == texts["all"]["choices"][0]["message"]
    models = httpx.get(f"{url}/v1/models").json()["data"]
    assert [m["id"] for m in models] == [BASE, "qv", "all", "mlp"] and models[1]["parent"] == BASE
    metrics = httpx.get(f"{url}/metrics").text
    assert 'kvyard:lora_requests_total{lora_name="mlp",model_name="tiny"}' in metrics
    assert expected   # the outputs themselves are checked against PEFT through /generate


def test_bad_adapters_are_refused_and_the_server_keeps_serving(lora_server, tmp_path):
    url, base, root, expected = lora_server
    from transformers import LlamaConfig, LlamaForCausalLM
    wide = LlamaForCausalLM(LlamaConfig(hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=256))
    save_adapter(wide, str(tmp_path / "wide"), 2, 4, ["q_proj"])
    save_adapter(base, str(tmp_path / "big"), 16, 16, ["q_proj"])
    (tmp_path / "junk").mkdir()
    cases = {"wide": "a different base model", "big": "exceeds --max-lora-rank 8",
             "junk": "no adapter_config.json", "gone": "is not a folder"}
    for name, words in cases.items():
        r = httpx.post(f"{url}/load_lora_adapter", json={"lora_name": name, "lora_path": str(tmp_path / name)})
        message = r.json()["error"]["message"]
        assert r.status_code == 400 and words in message and "\n" not in message, message
    r = httpx.post(f"{url}/unload_lora_adapter", json={"lora_name": "nope"})
    assert r.status_code == 404 and "'nope'" in r.json()["error"]["message"]
    r = generate(url, "nope")
    assert r.status_code == 404 and "unknown LoRA adapter 'nope'" in r.json()["error"]["message"]
    assert generate(url, "qv").json()["output_ids"] == expected["qv"]


def test_load_unload_under_load(lora_server, tmp_path):
    url, base, _, expected = lora_server
    save_adapter(base, str(tmp_path / "new1"), 4, 8, ["q_proj", "o_proj"], seed=101)
    save_adapter(base, str(tmp_path / "new2"), 8, 8, ["down_proj", "k_proj"], seed=102)
    want = {**expected, "new1": peft_greedy(peft_model(base, str(tmp_path / "new1")), PROMPT, STEPS)[0],
            "new2": peft_greedy(peft_model(base, str(tmp_path / "new2")), PROMPT, STEPS)[0]}
    stop, failures, served = threading.Event(), [], []

    def load_traffic(names):
        while not stop.is_set():
            for name in names:
                r = generate(url, name)
                if r.status_code != 200 or r.json()["output_ids"] != want[name]:
                    failures.append((name, r.status_code, r.text[:200]))
                served.append(name)
    threads = [threading.Thread(target=load_traffic, args=(n,)) for n in (["qv", None], ["all", "mlp"])]
    for t in threads:
        t.start()
    try:
        for new in ("new1", "new2"):   # the same name, loaded again with other weights
            r = httpx.post(f"{url}/load_lora_adapter", json={"lora_name": "fresh", "lora_path": str(tmp_path / new)})
            assert r.status_code == 200 and "fresh" in r.json()["loaded_adapters"], r.text
            pending = [threading.Thread(target=lambda: served.append(("fresh", generate(url, "fresh"))))
                       for _ in range(3)]
            for t in pending:
                t.start()
            outs = generate(url, ["fresh", "qv", None]).json()
            assert [o["output_ids"] for o in outs] == [want[new], want["qv"], want[None]]
            r = httpx.post(f"{url}/unload_lora_adapter", json={"lora_name": "fresh"}, timeout=120)
            assert r.status_code == 200 and "fresh" not in r.json()["loaded_adapters"], r.text
            for t in pending:
                t.join()
            for item in served:
                if isinstance(item, tuple):
                    assert item[1].status_code in (200, 404), item[1].text   # 404 only if sent after the unload began
                    if item[1].status_code == 200:
                        assert item[1].json()["output_ids"] == want[new]
            served[:] = [s for s in served if not isinstance(s, tuple)]
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not failures, failures[:3]
    check = httpx.get(f"{url}/debug/kv_integrity").json()
    assert check["ok"], check
