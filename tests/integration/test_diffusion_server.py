"""`kvyard serve` on tiny diffusers pipelines: the OpenAI images API returns exactly diffusers'
pixels, batches concurrent requests of two sizes, refuses bad fields with 400 naming them and
keeps serving; progress stream, URLs, auth, model info and metrics."""
from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import json

import numpy as np
import pytest
import requests

pytest.importorskip("diffusers")

from tiny_diffusion import build_sd, build_sd3, build_sd_img2img, red_image, reference_images  # noqa: E402

from conftest import assert_documented, free_port, start_server  # noqa: E402

KEY = "diffusion-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def sd_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusion")
    path = build_sd(str(root / "sd"))
    server = start_server(["--model-path", path, "--port", str(free_port()), "--api-key", KEY, "--enable-metrics",
                           "--output-path", str(root / "outputs"), "--max-batch-size", "8", "--log-level", "warning",
                           "--max-request-body-mb", "1"])
    yield server, path
    assert server.stop() == 0


def decode(item: dict) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).convert("RGB"))


def post(url: str, body: dict, path: str = "/v1/images/generations") -> requests.Response:
    return requests.post(url + path, json=body, headers=AUTH, timeout=120)


def test_generations_match_diffusers(sd_server):
    server, path = sd_server
    body = {"prompt": "a red bicycle", "size": "32x32", "n": 2, "seed": 11, "num_inference_steps": 2,
            "guidance_scale": 4.0, "negative_prompt": "blurry", "response_format": "b64_json"}
    r = post(server.url, body)
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    ref = reference_images(path, seed=11, n=2, prompt="a red bicycle", height=32, width=32, num_inference_steps=2,
                           guidance_scale=4.0, negative_prompt="blurry")
    assert [np.array_equal(decode(d), np.asarray(im)) for d, im in zip(data, ref)] == [True, True]


def test_concurrent_requests_of_two_sizes_and_bad_fields(sd_server):
    server, _ = sd_server

    def one(i):
        size = "32x32" if i % 2 else "48x32"
        r = post(server.url, {"prompt": f"prompt {i}", "size": size, "num_inference_steps": 2, "seed": i})
        return size, r
    with cf.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    from PIL import Image
    for size, r in results:
        assert r.status_code == 200, r.text
        img = Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))
        assert "%dx%d" % img.size == size
    for body, field in [({"size": "33x32"}, "width"), ({"num_inference_steps": 0}, "num_inference_steps"),
                        ({"num_inference_steps": -3}, "num_inference_steps"), ({"n": 100}, "n"),
                        ({"size": "huge"}, "size"), ({"num_frames": 3}, "num_frames")]:
        r = post(server.url, {"prompt": "p", "size": "32x32", **body})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == field and err["type"] == "invalid_request_error", err
    r = post(server.url, {"prompt": "x" * (2 << 20), "size": "32x32"})     # over --max-request-body-mb 1
    assert r.status_code == 413 and "max-request-body-mb" in r.json()["error"]["message"], r.text
    assert post(server.url, {"prompt": "still here", "size": "32x32", "num_inference_steps": 1}).status_code == 200
    metrics = requests.get(server.url + "/metrics", headers=AUTH, timeout=10).text
    calls = [float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("kvyard:pipeline_calls_total")]
    images = [float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("kvyard:images_generated_total")]
    assert images[0] >= 17 and calls[0] < images[0]   # concurrent requests shared pipeline calls
    assert "kvyard:seconds_per_step_bucket" in metrics


def test_progress_stream_url_output_auth_and_info(sd_server):
    server, _ = sd_server
    r = requests.post(server.url + "/generate_image", json={"prompt": "p", "size": "32x32", "num_inference_steps": 3,
                                                              "stream": True, "response_format": "url"},
                      headers=AUTH, stream=True, timeout=60)
    events = [line[6:] for line in r.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    progress = [json.loads(e) for e in events[:-2]]
    assert [(p["step"], p["total_steps"]) for p in progress] == [(1, 3), (2, 3), (3, 3)]
    url = json.loads(events[-2])["data"][0]["url"]
    image = requests.get(url, headers=AUTH, timeout=10)
    assert image.status_code == 200 and image.content[:4] == b"\x89PNG"
    assert requests.get(url, timeout=10).status_code == 401
    assert requests.get(server.url + "/v1/images/files/..%2Fx", headers=AUTH, timeout=10).status_code == 404
    assert requests.get(server.url + "/health", timeout=10).status_code == 200
    info = requests.get(server.url + "/get_model_info", headers=AUTH, timeout=10).json()
    assert info["is_generation"] is True and info["model_type"] == "diffusion"
    r = post(server.url, {"prompt": "p", "size": "32x32"}, "/v1/images/edits")
    assert r.status_code == 400 and r.json()["error"]["param"] == "image"


def test_edits_on_img2img_pipeline_match_diffusers(tmp_path):
    path = build_sd_img2img(str(tmp_path / "img2img"))
    server = start_server(["--model-path", path, "--port", str(free_port()), "--log-level", "warning"])
    try:
        buf = io.BytesIO()
        red_image().save(buf, format="PNG")
        r = requests.post(server.url + "/v1/images/edits", files={"image": ("in.png", buf.getvalue(), "image/png")},
                          data={"prompt": "a cat", "seed": "5", "num_inference_steps": "3", "strength": "0.8"},
                          timeout=60)
        assert r.status_code == 200, r.text
        ref = reference_images(path, seed=5, prompt="a cat", image=red_image(), strength=0.8, num_inference_steps=3)
        assert np.array_equal(decode(r.json()["data"][0]), np.asarray(ref[0]))
        r = requests.post(server.url + "/v1/images/generations", json={"prompt": "p"}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "image"
    finally:
        assert server.stop() == 0


@pytest.mark.slow
def test_generations_on_sd3_match_diffusers(tmp_path):
    """The DiT / flow-matching pipeline through HTTP, batched with a second request."""
    path = build_sd3(str(tmp_path / "sd3"))
    server = start_server(["--model-path", path, "--port", str(free_port()), "--log-level", "warning"])
    try:
        bodies = [{"prompt": p, "size": "32x32", "seed": s, "num_inference_steps": 2, "guidance_scale": 3.0}
                  for p, s in (("a red bicycle", 3), ("a blue car", 9))]
        refs = [reference_images(path, seed=b["seed"], prompt=b["prompt"], height=32, width=32,
                                 num_inference_steps=2, guidance_scale=3.0)[0] for b in bodies]
        alone = requests.post(server.url + "/v1/images/generations", json=bodies[0], timeout=60)
        assert np.array_equal(decode(alone.json()["data"][0]), np.asarray(refs[0]))
        with cf.ThreadPoolExecutor(2) as pool:
            responses = list(pool.map(lambda b: requests.post(server.url + "/v1/images/generations", json=b,
                                                                timeout=60), bodies))
        for ref, r in zip(refs, responses):
            assert r.status_code == 200, r.text
            # possibly batched with the other request: equal up to the rounding of batched kernels
            assert np.abs(decode(r.json()["data"][0]).astype(int) - np.asarray(ref).astype(int)).max() <= 1
    finally:
        assert server.stop() == 0


def test_openai_client_images_generate(sd_server):
    openai = pytest.importorskip("openai")
    server, path = sd_server
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY)
    result = client.images.generate(model=path, prompt="a red bicycle", size="32x32", n=1, response_format="b64_json",
                                    extra_body={"seed": 21, "num_inference_steps": 2})
    ref = reference_images(path, seed=21, prompt="a red bicycle", height=32, width=32, num_inference_steps=2)
    assert np.array_equal(decode({"b64_json": result.data[0].b64_json}), np.asarray(ref[0]))
    with pytest.raises(openai.BadRequestError) as exc:
        client.images.generate(prompt="p", size="31x32", extra_body={"num_inference_steps": 1})
    assert exc.value.body["param"] == "width"


def test_answers_are_the_documented_shapes(sd_server):
    """/openapi.json of the diffusion server documents each answer, errors included."""
    server, _ = sd_server
    spec = requests.get(server.url + "/openapi.json", headers=AUTH, timeout=30).json()
    small = '"prompt": "p", "size": "32x32", "num_inference_steps": 1'
    calls = [("post", "/v1/images/generations", "{%s}" % small, 200),
             ("post", "/v1/images/generations", '{"prompt": "p", "guidance_scale": 1e400}', 400),  # not finite
             ("post", "/generate_image", '{%s, "response_format": "url"}' % small, 200),
             ("get", "/get_model_info", None, 200), ("get", "/v1/models", None, 200)]
    for method, path, body, status in calls:
        r = requests.request(method, server.url + path, data=body, timeout=120,
                             headers={**AUTH, "Content-Type": "application/json"})
        assert r.status_code == status, r.text
        assert_documented(spec, method, path, r)
    assert "security" in spec["paths"]["/v1/models"]["get"] and "security" not in spec["paths"]["/health"]["get"]
