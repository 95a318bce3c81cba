"""Tiny random base models and random PEFT adapters saved into tmp folders, PEFT's greedy
reference (float32, CPU), and a driver of the in-process scheduler — shared by the LoRA tests."""
from __future__ import annotations

import copy
import os

import torch

from kvyard.sampling.params import SamplingParams
from kvyard.scheduler.io_struct import TokenizedGenerateReq

ADAPTER_SPECS = {   # name: (rank, alpha, target modules, rslora)
    "qv": (4, 8, ["q_proj", "v_proj"], False),
    "all": (8, 16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], True),
    "mlp": (2, 4, ["gate_proj", "up_proj", "down_proj", "o_proj"], False),
}


def tiny_base(kind: str, path: str):
    """A tiny random Llama or Qwen2 saved to ``path``; returns the HF model (float32, eval)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=512)
    cfg_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[kind]
    torch.manual_seed(0)
    model = model_cls(cfg_cls(**common, tie_word_embeddings=kind == "qwen2")).eval()
    model.save_pretrained(path)
    return model


def save_adapter(base, path: str, rank: int, alpha: int, modules: list[str], rslora: bool = False,
                 seed: int = 1, scale: float = 0.5) -> None:
    """A PEFT LoRA adapter of ``base`` with random A and B (B is zero at PEFT's init: randomized
    so the adapter changes the output)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=modules, use_rslora=rslora, lora_dropout=0.0,
        init_lora_weights=False))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * scale / param.shape[-1] ** 0.5)
    peft_model.save_pretrained(path)


def peft_model(base, path: str):
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(base), path).eval()


def peft_greedy(model, prompt: list[int], steps: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and their logprobs (PEFT or plain HF model, batch 1, no cache)."""
    ids, tokens, logprobs = list(prompt), [], []
    with torch.inference_mode():
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            token = int(logits.argmax())
            tokens.append(token)
            logprobs.append(float(torch.log_softmax(logits, -1)[token]))
            ids.append(token)
    return tokens, logprobs


def make_adapters(base, root: str, specs: dict = ADAPTER_SPECS) -> dict[str, str]:
    paths = {}
    for i, (name, (rank, alpha, modules, rslora)) in enumerate(specs.items()):
        paths[name] = os.path.join(root, name)
        save_adapter(base, paths[name], rank, alpha, modules, rslora, seed=10 + i)
    return paths


def greedy_params(max_new: int) -> SamplingParams:
    p = SamplingParams.from_dict({"max_new_tokens": max_new, "temperature": 0, "ignore_eos": True})
    p.verify(256)
    return p.normalize(None)


def run(scheduler, reqs: list[tuple[str, list[int], str | None]], steps: int = 6) -> dict:
    """Adds every (rid, prompt, adapter) at once, steps until done; {rid: (tokens, logprobs)}."""
    for rid, prompt, lora in reqs:
        rejected = scheduler.add_request(TokenizedGenerateReq(rid, prompt, greedy_params(steps), return_logprob=True,
                                                              lora_name=lora))
        assert rejected is None, rejected.finished_reason
    out = {rid: ([], []) for rid, _, _ in reqs}
    for _ in range(500):
        for u in scheduler.step():
            assert u.finished_reason is None or u.finished_reason["type"] != "abort", u.finished_reason
            out[u.rid][0].extend(u.new_token_ids)
            out[u.rid][1].extend(lp for lp, _ in u.output_token_logprobs)
        if not scheduler.has_work():
            break
    scheduler.check_integrity()
    return out
