"""Multi-node launch on one machine: two `kvyard serve` processes, ``--nnodes 2 --node-rank 0/1
--dist-init-addr 127.0.0.1:PORT --tp-size 2`` (one rank each, gloo over loopback); node 0 serves
HTTP with the greedy output of transformers (and so of one rank). Bad flags fail fast with one
line naming the flag; a node whose rendezvous never answers fails within --dist-timeout."""
from __future__ import annotations

import os
import subprocess
import sys
import threading

import httpx
import pytest
import torch
import transformers

from conftest import free_port, start_server
from kvyard.distributed.init import free_local_addr

NEW = 12


def kvyard_serve(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "kvyard.cli", "serve", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_nnodes_without_an_address_is_refused_at_parse_time():
    done = kvyard_serve("--tp-size", "2", "--nnodes", "2")
    assert done.returncode != 0
    assert "dist_init_addr: --nnodes > 1 needs the HOST:PORT of node 0" in done.stderr + done.stdout


def test_unreachable_dist_init_addr_is_a_clear_error_within_the_timeout(smollm2_path):
    done = kvyard_serve("--model-path", smollm2_path, "--tp-size", "2", "--nnodes", "2", "--node-rank", "1",
                        "--dist-init-addr", free_local_addr(), "--dist-timeout", "3", "--log-level", "error")
    assert done.returncode == 1
    assert "could not join the group at 127.0.0.1:" in done.stderr + done.stdout
    assert "within --dist-timeout 3 s" in done.stderr + done.stdout


@pytest.mark.slow
def test_two_nodes_serve_the_greedy_output_of_one(tmp_path, hf_greedy):
    from tiny_tokenizer import build_tokenizer   # tests/unit's byte-level BPE (the warmup sends text)

    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                      max_position_embeddings=512, initializer_range=0.1, eos_token_id=2,
                                      bos_token_id=1, pad_token_id=None)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    path = str(tmp_path / "llama")
    hf.save_pretrained(path)
    build_tokenizer(("<s>", "</s>"), eos="</s>", bos="<s>").save_pretrained(path)
    common = ["--model-path", path, "--dtype", "float32", "--tp-size", "2", "--nnodes", "2",
              "--dist-init-addr", free_local_addr(), "--dist-timeout", "120", "--max-total-tokens", "2048",
              "--attention-backend", "torch_native", "--log-level", "warning"]
    node1 = subprocess.Popen([sys.executable, "-m", "kvyard.cli", "serve", *common, "--node-rank", "1"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(node1.stdout), daemon=True).start()
    try:
        node0 = start_server([*common, "--node-rank", "0", "--port", str(free_port())])
        try:
            ids = [[5, 6, 7, 8, 9, 10, 11] * 3, [100, 3, 4]]
            for prompt in ids:
                r = httpx.post(f"{node0.url}/generate", timeout=120, json={
                    "input_ids": prompt, "sampling_params": {"max_new_tokens": NEW, "temperature": 0,
                                                             "ignore_eos": True}})
                assert r.status_code == 200, r.text
                assert r.json()["output_ids"] == hf_greedy(hf, prompt, NEW)
            assert any(line.startswith("kvyard node 1 ready") for line in lines), lines
        finally:
            assert node0.stop() == 0, node0.output()
        assert node1.wait(60) == 0, "".join(lines)       # node 1 ends with node 0
    finally:
        if node1.poll() is None:
            node1.kill()
